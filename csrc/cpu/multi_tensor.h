// Shared pieces of fusedopt's CPU kernels (torch-free): element conversions, the step prologue's
// group-lr loop (the scalar math is in fusedopt/step_math.h, shared with CUDA), and the target
// list for runtime ISA dispatch.
//
// Rounding follows torch's CPU kernels, so that fp32 results agree to an ulp or two: an explicit
// fmaf where torch's vectorized kernels fuse (add with alpha, addcmul, lerp) and nowhere else
// (the build uses -ffp-contract=off), IEEE division and square root, bf16/fp16 stored with
// round-to-nearest-even.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "fusedopt/layout.h"
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
// supports is picked at load time (GCC function multi-versioning).
#define FUSEDOPT_CPU_TARGETS \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
