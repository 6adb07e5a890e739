// The per-element arithmetic every optimizer's update (fusedopt/optim/*.h) is written in, for
// the CPU and the CUDA kernels alike (torch-free; host and device), and the interface through
// which an update reads and writes memory.
//
// Rounding follows torch's kernels, which is what makes fp32 parity "close to rounding": a
// multiply-add is one FMA (fma_rn) exactly where torch fuses it (add(alpha=), addcmul, lerp) and
// two rounded operations everywhere else; division and square root are correctly rounded. This
// holds only if the compilers contract nothing by themselves: the CPU files are compiled with
// -ffp-contract=off, the CUDA ones with -fmad=false (setup.py).
//
// An update is `template <unsigned ON, class Io> static void update(const Args&, const Io&)`:
// - Io::N elements at a time (the CUDA kernels: a vector of N; the CPU loops: 1, the loop over
//   elements vectorized by the compiler), through Io's param(x), grad(x) (GradScaler's unscaling
//   and the clip coefficient already applied), load<K>(x) / store<K>(x) of state slot K and
//   store_param(x), x a float[N];
// - ON: the per-tensor options (Args::on bits) the variant is compiled for. is_on<ON, BIT>(on)
//   is false at compile time for a bit outside ON; else it reads the runtime bit. The CUDA
//   kernels compile one variant per set of state slots in use and test the other options at
//   run time (uniform branches); the CPU loops compile one variant per set of options and pin
//   `on` to it, so that the loop has no branches and vectorizes.
#pragma once
#include <cmath>
#include <cstdint>

#include "fusedopt/step_math.h"

#ifdef __CUDACC__
#define FUSEDOPT_UNROLL _Pragma("unroll")
#else
#define FUSEDOPT_UNROLL
#endif

namespace fusedopt {

FUSEDOPT_HD float fma_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return fmaf(a, b, c);
#endif
}

FUSEDOPT_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);  // whatever -prec-div says
#else
  return a / b;
#endif
}

FUSEDOPT_HD float sqrt_rn(float a) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(a);  // whatever -prec-sqrt says
#else
  return std::sqrt(a);
#endif
}

// torch.maximum: a NaN in either operand propagates (fmaxf would drop it). This form, not
// fmaxf's, is the one the CPU loops vectorize.
FUSEDOPT_HD float maximum(float a, float b) { return (a != a || a > b) ? a : b; }

// torch.lerp(a, b, w) as torch computes it (CUDA, and CPU vectorized): one FMA from the nearer
// end. The choice of end is made once, for a weight the whole tensor shares: the loop body then
// holds a select only (computing w - 1 in the loop left the larger CPU loops with control flow
// that the AVX2 clone did not vectorize).
struct Lerp {
  bool from_a;
  float w;
  FUSEDOPT_HD explicit Lerp(float weight)
      : from_a(weight < 0.5f), w(weight < 0.5f ? weight : weight - 1.0f) {}
  FUSEDOPT_HD float operator()(float a, float b) const { return fma_rn(w, b - a, from_a ? a : b); }
};

// See the top of this file: whether option BIT is on for a tensor in a variant compiled for ON.
template <unsigned ON, unsigned BIT>
FUSEDOPT_HD bool is_on(unsigned on) {
  return (ON & BIT) != 0 && (on & BIT) != 0;
}

// murmur3's 32-bit finalizer: the stochastic-rounding noise (kernels/multi_tensor.py's _mix32).
FUSEDOPT_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}

// Stochastic rounding's per-(tensor, step) seed: t is the tensor's row in tmeta, step the
// prologue's step (the scal column Opt::kSeed, a float holding a whole number).
FUSEDOPT_HD uint32_t stochastic_seed(int64_t t, float step) {
  return mix32(mix32(static_cast<uint32_t>(t)) ^
               static_cast<uint32_t>(static_cast<int64_t>(step)));
}

}  // namespace fusedopt
