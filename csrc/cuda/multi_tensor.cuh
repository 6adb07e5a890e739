// What the fused multi-tensor CUDA kernels share: typed loads and stores (128-bit packs or single
// elements), the chunk loop, torch.maximum, and the prologue's group-lr loop (the scalar math is
// in fusedopt/step_math.h, shared with the CPU kernels). Torch-free: CUDA's headers and
// fusedopt/*.h only.
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

// ---- step prologue (one block) ----------------------------------------------------------------
// Writes each group's lr for this step to glr (float64). Call from every thread of the block,
// then __syncthreads() before reading glr.
__device__ __forceinline__ void resolve_group_lrs(const double* hyper, const int64_t* gptr,
                                                  double* glr, int64_t n_groups) {
  for (int64_t g = threadIdx.x; g < n_groups; g += blockDim.x) {
    glr[g] = group_lr(hyper + g * HYPER_WIDTH, gptr + g * GPTR_WIDTH);
  }
}

}  // namespace cuda
}  // namespace fusedopt
