// What the fused multi-tensor CUDA kernels share: typed loads and stores (128-bit packs or single
// elements), the chunk loop, torch.maximum, GradScaler's skipped steps and in-kernel unscaling,
// and the prologue's group-lr loop and clip coefficient (the scalar math is in
// fusedopt/step_math.h, shared with the CPU kernels). Torch-free: CUDA's headers and fusedopt/*.h
// only.
//
// Rounding follows torch's kernels, which is what makes fp32 parity "close to rounding": a
// multiply-add is one FMA exactly where torch fuses it (add(alpha=), addcmul, lerp) and two
// rounded operations everywhere else; division and square root are the correctly rounded
// __fdiv_rn / __fsqrt_rn whatever -prec-div / -prec-sqrt say. This holds only if nvcc contracts
// nothing by itself, so these files are compiled with -fmad=false (and never --use_fast_math,
// which would also flush denormals to zero). The Triton kernels in kernels/ are the reference.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fusedopt/layout.h"
#include "fusedopt/step_math.h"

namespace fusedopt {
namespace cuda {

constexpr int kBlock = 256;          // threads per main-kernel block (one block per chunk)
constexpr int kPrologueBlock = 256;  // threads of the single prologue block

// gridDim.x holds at most 2^31 - 1 blocks.
inline bool chunk_grid_fits(int64_t n_chunks) { return n_chunks >= 0 && n_chunks <= INT32_MAX; }

template <typename T>
__device__ __forceinline__ T* ptr_at(int64_t addr) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(addr));
}

// ---- element types ------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// float -> T, round to nearest even as torch rounds.
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// Elements per 128-bit access: 4 floats, 8 bf16 or fp16.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

// N = 1 or kVec<T> consecutive elements, as float. __ldca / __stwb are plain loads and stores
// (default caching, .ca / .wb) in the global space: the addresses come from tables in memory, so
// plain dereferences would compile to generic ld / st.
template <int N, typename T>
__device__ __forceinline__ void load(const T* src, float (&dst)[N]) {
  if constexpr (N == 1) {
    dst[0] = to_float(__ldca(src));
  } else {
    static_assert(N == kVec<T>, "one 128-bit access");
    const uint4 raw = __ldca(reinterpret_cast<const uint4*>(src));
    T elems[N];
    memcpy(elems, &raw, sizeof(raw));
#pragma unroll
    for (int k = 0; k < N; ++k) dst[k] = to_float(elems[k]);
  }
}

template <int N, typename T>
__device__ __forceinline__ void store(T* dst, const float (&src)[N]) {
  if constexpr (N == 1) {
    __stwb(dst, from_float<T>(src[0]));
  } else {
    static_assert(N == kVec<T>, "one 128-bit access");
    T elems[N];
#pragma unroll
    for (int k = 0; k < N; ++k) elems[k] = from_float<T>(src[k]);
    uint4 raw;
    memcpy(&raw, elems, sizeof(raw));
    __stwb(reinterpret_cast<uint4*>(dst), raw);
  }
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// ---- main pass ----------------------------------------------------------------------------------

// Calls op.apply<N>(i), which updates elements [i, i + N), over [start, end) of one chunk. With
// `vector` (every pointer op touches is 16-byte aligned and start is a multiple of VEC) it goes
// VEC elements at a time and then finishes the tensor's tail one by one; otherwise one by one
// throughout, which is correct for any alignment. Offsets are 64-bit: tensors may exceed 2^31.
template <int VEC, typename Op>
__device__ __forceinline__ void for_each_in_chunk(const Op& op, int64_t start, int64_t end,
                                                  bool vector) {
  int64_t scalar_start = start;
  if (vector) {
    const int64_t n_vec = (end - start) / VEC;
#pragma unroll 1
    for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) {
      op.template apply<VEC>(start + j * VEC);
    }
    scalar_start = start + n_vec * VEC;
  }
#pragma unroll 1
  for (int64_t i = scalar_start + threadIdx.x; i < end; i += blockDim.x) op.template apply<1>(i);
}

// torch.maximum: NaN in either operand propagates (fmaxf would drop it).
__device__ __forceinline__ float maximum(float a, float b) {
  return a != a ? a : (b != b ? b : fmaxf(a, b));
}

// ---- GradScaler and clipping --------------------------------------------------------------------

// True when GradScaler found an inf/NaN (found_inf != 0; null: no GradScaler): the step then
// changes nothing. found_inf lives in device memory, so every block reads it itself (no host
// sync); the prologue then treats the group and tensor counts, the main and sum-of-squares passes
// each chunk's length, as 0 (kernels/multi_tensor.py's live_count).
__device__ __forceinline__ bool step_skipped(const float* found_inf) {
  return found_inf != nullptr && *found_inf != 0.0f;
}

// What the update passes do to a gradient first (kernels/multi_tensor.py's grad_in): with
// HAS_SCALE (grad_scale given), divide by GradScaler's scale and write the unscaled gradient back
// (in its dtype, round to nearest even), as torch's fused optimizers do; then multiply by the clip
// coefficient, which is 1 without clipping (exact: x * 1 == x). Then the caller applies
// maximize's sign. HAS_SCALE is a template flag: the unscaling costs registers that the common
// case, without GradScaler, should not pay.
template <bool HAS_SCALE>
struct GradIn {
  float scale;  // GradScaler's scale (HAS_SCALE only)
  float coef;   // clip[CLIP_COEF], or 1

  // grad_scale, clip: device pointers, null when absent (grad_scale is not null with HAS_SCALE).
  __device__ __forceinline__ static GradIn read(const float* grad_scale, const float* clip) {
    GradIn in;
    in.scale = HAS_SCALE ? *grad_scale : 1.0f;
    in.coef = clip != nullptr ? clip[CLIP_COEF] : 1.0f;
    return in;
  }

  // rg: the N gradient elements just loaded from g.
  template <int N, typename T>
  __device__ __forceinline__ void apply(T* g, float (&rg)[N]) const {
    if constexpr (HAS_SCALE) {
#pragma unroll
      for (int k = 0; k < N; ++k) rg[k] = __fdiv_rn(rg[k], scale);
      store(g, rg);
    }
#pragma unroll
    for (int k = 0; k < N; ++k) rg[k] = rg[k] * coef;
  }
};

// The clipping arguments of a prologue: per-chunk sums of squares (written by the sum-of-squares
// pass, sumsq.cu) and where the prologue writes (coefficient, norm). clip == null: no clipping.
struct ClipArgs {
  const float* partials;
  int64_t n_partials;
  float max_norm;
  float* clip;
};

// ---- step prologue (one block) ----------------------------------------------------------------
// Writes each group's lr for this step to glr (float64). Call from every thread of the block,
// then __syncthreads() before reading glr.
__device__ __forceinline__ void resolve_group_lrs(const double* hyper, const int64_t* gptr,
                                                  double* glr, int64_t n_groups) {
  for (int64_t g = threadIdx.x; g < n_groups; g += blockDim.x) {
    glr[g] = group_lr(hyper + g * HYPER_WIDTH, gptr + g * GPTR_WIDTH);
  }
}

// The global grad norm from the per-chunk sums of squares, added in float64 in a fixed order
// (thread k sums partials k, k + kPrologueBlock, ...; then a fixed tree over the threads), so the
// result does not depend on scheduling; then torch's clip coefficient (clip_from_sumsq). Call
// from every thread of a kPrologueBlock-thread block.
__device__ __forceinline__ void resolve_clip(const ClipArgs& a) {
  __shared__ double sums[kPrologueBlock];
  double acc = 0.0;
  for (int64_t c = threadIdx.x; c < a.n_partials; c += kPrologueBlock) {
    acc += static_cast<double>(a.partials[c]);
  }
  sums[threadIdx.x] = acc;
  __syncthreads();
#pragma unroll
  for (int stride = kPrologueBlock / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) sums[threadIdx.x] += sums[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) clip_from_sumsq(sums[0], a.max_norm, a.clip);
}

// The optimizer-independent half of a prologue (kernels/multi_tensor.py's prologue_common): group
// lrs and Noam counters, then the clip coefficient when clipping. Returns false, having written
// nothing, when GradScaler found an inf (the caller then returns too: no step advances). Call from
// every thread of the kPrologueBlock-thread block; on true, what it wrote is visible to all.
__device__ __forceinline__ bool prologue_common(const double* hyper, const int64_t* gptr,
                                                double* glr, int64_t n_groups,
                                                const float* found_inf, const ClipArgs& clip) {
  if (step_skipped(found_inf)) return false;  // uniform over the block
  resolve_group_lrs(hyper, gptr, glr, n_groups);
  if (clip.clip != nullptr) resolve_clip(clip);
  __syncthreads();  // the group lrs just written are read next by other threads
  return true;
}

}  // namespace cuda
}  // namespace fusedopt
