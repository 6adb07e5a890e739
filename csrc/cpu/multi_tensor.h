// Shared pieces of fusedopt's CPU kernels (torch-free): element conversions, stochastic rounding,
// the buckets (dtype combinations) the kernels are compiled for, the step prologue's group-lr loop
// (the scalar math is in fusedopt/step_math.h, shared with CUDA), and the target list for runtime
// ISA dispatch.
//
// Rounding follows torch's CPU kernels, so that fp32 results agree to an ulp or two: an explicit
// fmaf where torch's vectorized kernels fuse (add with alpha, addcmul, lerp) and nowhere else
// (the build uses -ffp-contract=off), IEEE division and square root, bf16/fp16 stored with
// round-to-nearest-even.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fusedopt/layout.h"
#include "fusedopt/element_math.h"
#include "fusedopt/master.h"
#include "fusedopt/step_math.h"

namespace fusedopt::cpu {

// bf16 <-> float by bit manipulation (vectorizes; NaN kept quiet, ties to even as torch rounds).
static inline float load_elem(const uint16_t* p, int64_t i, std::integral_constant<int, 1>) {
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
static inline void store_elem(uint16_t* p, int64_t i, float x, std::integral_constant<int, 1>) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  p[i] = static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);  // torch's NaN
}
static inline float load_elem(const _Float16* p, int64_t i, std::integral_constant<int, 2>) {
  return static_cast<float>(p[i]);
}
static inline void store_elem(_Float16* p, int64_t i, float x, std::integral_constant<int, 2>) {
  p[i] = static_cast<_Float16>(x);
}
static inline float load_elem(const float* p, int64_t i, std::integral_constant<int, 0>) {
  return p[i];
}
static inline void store_elem(float* p, int64_t i, float x, std::integral_constant<int, 0>) {
  p[i] = x;
}

template <int D>
struct Storage;
template <>
struct Storage<DTYPE_FLOAT32> {
  using type = float;
};
template <>
struct Storage<DTYPE_BFLOAT16> {
  using type = uint16_t;
};
template <>
struct Storage<DTYPE_FLOAT16> {
  using type = _Float16;
};
template <>
struct Storage<DTYPE_UINT8> {  // 8-bit state: codes (update_loops.h's update_run_8bit)
  using type = uint8_t;
};

template <int D>
static inline float ld(const typename Storage<D>::type* p, int64_t i) {
  return load_elem(p, i, std::integral_constant<int, D>{});
}
template <int D>
static inline void st(typename Storage<D>::type* p, int64_t i, float x) {
  store_elem(p, i, x, std::integral_constant<int, D>{});
}

template <int D>
static inline typename Storage<D>::type* addr(int64_t a) {
  return reinterpret_cast<typename Storage<D>::type*>(a);
}

// float -> bf16 rounded up with probability equal to the dropped fraction: 16 noise bits, a hash
// of the element's offset in the tensor and the seed, added below the kept bits (as
// kernels/multi_tensor.py's stochastic_bf16, bit for bit). NaN converts as store_elem does.
static inline void store_bf16_stochastic(uint16_t* p, int64_t i, float x, uint32_t seed) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint32_t noise = mix32(static_cast<uint32_t>(i) ^ seed) & 0xFFFFu;
  p[i] = static_cast<uint16_t>(x != x ? 0x7FC0u : (bits + noise) >> 16);
}

// A bucket (layout.h's BUCKET_*) as compile-time constants: the dtype of the parameter the update
// reads and writes (the fp32 master when there is one), of the grads (and of the model's parameter
// a master is rounded into: the shadow), of the three state slots; whether the shadow is written;
// whether the (bf16) parameter is stored with stochastic rounding.
template <int P, int G, int S, bool SHADOW = false, bool SR = false, int ERR = 0>
struct Bucket {
  static_assert(ERR == 0 || (P == DTYPE_BFLOAT16 && G == P && !SHADOW && !SR),
                "a compressed master's error term: bf16 parameters, no shadow, no SR");
  static_assert(SHADOW ? (P == DTYPE_FLOAT32 && G != DTYPE_FLOAT32) : P == G,
                "a shadow exactly when an fp32 master is updated for low-precision grads");
  static_assert(!SR || (P == DTYPE_BFLOAT16 && !SHADOW), "stochastic rounding: bf16 parameters");
  static constexpr int param = P, grad = G, state = S;
  static constexpr bool shadow = SHADOW, stochastic = SR;
  static constexpr int error = ERR;  // the error term's bits (fusedopt/master.h), 0: none
  static constexpr int64_t code = P | G << BUCKET_GRAD_SHIFT | S << BUCKET_STATE_SHIFT |
                                  int64_t{SHADOW} << BUCKET_SHADOW_BIT |
                                  int64_t{SR} << BUCKET_STOCHASTIC_BIT |
                                  int64_t{ERR / 8} << BUCKET_ERROR_SHIFT;
  using ET = std::conditional_t<ERR == 16, int16_t, int8_t>;  // the error term
  using PT = typename Storage<P>::type;  // parameter
  using GT = typename Storage<G>::type;  // grad and shadow
  using ST = typename Storage<S>::type;  // state
};

// Calls f(Bucket<...>{}) for the bucket `code` encodes; false (f not called) for a bucket the CPU
// kernels have no variant of. The same list as csrc/cuda's (fusedopt/backends/native.py's
// NATIVE_BUCKETS): each dtype alone; fp32 parameters with bf16 or fp16 state; an fp32 master for
// bf16/fp16 parameters (fp32 state, or bf16 for bf16); bf16 parameters with fp32 state;
// stochastic rounding of bf16 parameters (bf16 or fp32 state); 8-bit state (U8) for fp32
// parameters, fp32 masters of bf16 parameters, bf16 parameters (rounded to nearest or
// stochastically).
template <typename F>
inline bool with_bucket(int64_t code, F&& f) {
  constexpr int F32 = DTYPE_FLOAT32, BF16 = DTYPE_BFLOAT16, F16 = DTYPE_FLOAT16, U8 = DTYPE_UINT8;
  switch (code) {
#define FUSEDOPT_BUCKET(...)      \
  case Bucket<__VA_ARGS__>::code: \
    f(Bucket<__VA_ARGS__>{});     \
    return true;
    FUSEDOPT_BUCKET(F32, F32, F32)
    FUSEDOPT_BUCKET(BF16, BF16, BF16)
    FUSEDOPT_BUCKET(F16, F16, F16)
    FUSEDOPT_BUCKET(F32, F32, BF16)
    FUSEDOPT_BUCKET(F32, F32, F16)
    FUSEDOPT_BUCKET(F32, BF16, F32, true)
    FUSEDOPT_BUCKET(F32, F16, F32, true)
    FUSEDOPT_BUCKET(F32, BF16, BF16, true)
    FUSEDOPT_BUCKET(BF16, BF16, F32)
    FUSEDOPT_BUCKET(BF16, BF16, BF16, false, true)
    FUSEDOPT_BUCKET(BF16, BF16, F32, false, true)
    FUSEDOPT_BUCKET(F32, F32, U8)
    FUSEDOPT_BUCKET(F32, BF16, U8, true)
    FUSEDOPT_BUCKET(BF16, BF16, U8)
    FUSEDOPT_BUCKET(BF16, BF16, U8, false, true)
    FUSEDOPT_BUCKET(BF16, BF16, F32, false, false, 8)
    FUSEDOPT_BUCKET(BF16, BF16, F32, false, false, 16)
    FUSEDOPT_BUCKET(BF16, BF16, U8, false, false, 8)
    FUSEDOPT_BUCKET(BF16, BF16, U8, false, false, 16)
#undef FUSEDOPT_BUCKET
    default:
      return false;
  }
}

// Stores the updated parameter x (float32) at element i: stochastically rounded or rounded to
// nearest even; with a master, also rounded to nearest even into the shadow (in the grad dtype).
template <class K>
static inline void write_param(typename K::PT* p, typename K::GT* shadow, int64_t i, float x,
                               uint32_t seed, typename K::ET* err = nullptr) {
  if constexpr (K::stochastic) store_bf16_stochastic(p, i, x, seed);
  else st<K::param>(p, i, x);
  if constexpr (K::shadow) st<K::grad>(shadow, i, x);
  if constexpr (K::error != 0) {  // the master's new error term against its bf16 rounding
    uint32_t bits;  // x rounded to bf16 as store_elem rounds it, without reading p back
    std::memcpy(&bits, &x, 4);
    const uint32_t rounded = x != x ? 0x7FC00000u : ((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16) << 16;
    float b;
    std::memcpy(&b, &rounded, 4);
    err[i] = static_cast<typename K::ET>(static_cast<int32_t>(master::error<K::error>(x, b)));
  }
}

// The parameter an update reads: with a compressed master, the master it stands for.
template <class K>
static inline float read_param(const typename K::PT* p, int64_t i, const typename K::ET* err) {
  const float b = ld<K::param>(p, i);
  if constexpr (K::error != 0) return master::rebuild<K::error>(b, static_cast<float>(err[i]));
  else return b;
}

// The gradient an update uses (see GradIn): unscaled and written back when UNSCALE, then times
// the clip coefficient (1 without clipping: exact).
template <int D, bool UNSCALE>
static inline float grad_at(typename Storage<D>::type* g, int64_t i, float scale, float coef) {
  float gi = ld<D>(g, i);
  if constexpr (UNSCALE) {
    gi = gi / scale;
    st<D>(g, i, gi);
  }
  return gi * coef;
}

// Each group's lr for this step (float64, into glr); advances the Noam counters.
static inline void resolve_group_lrs(const double* hyper, const int64_t* gptr, double* glr,
                                     int64_t n_groups) {
  for (int64_t g = 0; g < n_groups; ++g) {
    glr[g] = group_lr(hyper + g * HYPER_WIDTH, gptr + g * GPTR_WIDTH);
  }
}

}  // namespace fusedopt::cpu

// Runtime ISA dispatch: each kernel body is compiled for these targets and the best one the CPU
// supports is picked at load time (GCC function multi-versioning). flatten: everything the body
// calls is inlined into each clone, so that it too is compiled for the clone's ISA; without it the
// inliner's unit-growth limit leaves some of the many per-variant loops out of line, compiled for
// the default ISA only (no FMA: not vectorized).
#define FUSEDOPT_CPU_TARGETS \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
