// What the fused multi-tensor CUDA kernels share: typed loads and stores (vector packs or single
// elements), the buckets (the dtypes of parameter, grads and state; fp32 masters, stochastic
// rounding, compressed masters) and their dispatch, the parameter's load and store, the chunk
// loop, GradScaler's skipped steps and in-kernel unscaling, and the prologue's kernels (the scalar
// math is in fusedopt/step_math.h, the per-element arithmetic in fusedopt/element_math.h, each
// optimizer's in fusedopt/optim/: shared with the CPU kernels). Torch-free: CUDA's headers and
// fusedopt/*.h only. Compiled with -fmad=false (element_math.h says why), never --use_fast_math
// (which would also flush denormals to zero).
#pragma once

#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fusedopt/layout.h"
#include "fusedopt/element_math.h"
#include "fusedopt/master.h"
#include "fusedopt/step_math.h"

namespace fusedopt {
namespace cuda {

constexpr int kBlock = 256;          // threads per main-kernel block (one block per chunk)
constexpr int kPrologueBlock = 256;  // threads per prologue block (and clip-stage block)

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

// N consecutive elements of T, moved in naturally aligned accesses of min(16, N * sizeof(T))
// bytes (N * sizeof(T) >= 16: as many 128-bit accesses as that takes). __ldca / __stwb are plain
// loads and stores (default caching, .ca / .wb) in the global space: the addresses come from
// tables in memory, so plain dereferences would compile to generic ld / st.
template <int N, typename T>
constexpr int kAccessBytes = N * sizeof(T) < 16 ? N * sizeof(T) : 16;

template <int N, typename T>
__device__ __forceinline__ void load_raw(const T* src, T (&dst)[N]) {
  constexpr int bytes = N * sizeof(T);
  if constexpr (N == 1) {
    dst[0] = __ldca(src);  // typed: for 16-bit types, fewer registers than through an integer
  } else if constexpr (bytes >= 16) {
    static_assert(bytes % 16 == 0, "whole 128-bit accesses");
#pragma unroll
    for (int k = 0; k < bytes / 16; ++k) {
      const uint4 raw = __ldca(reinterpret_cast<const uint4*>(src) + k);
      memcpy(reinterpret_cast<char*>(dst) + 16 * k, &raw, 16);
    }
  } else if constexpr (bytes == 8) {
    const uint2 raw = __ldca(reinterpret_cast<const uint2*>(src));
    memcpy(dst, &raw, 8);
  } else {
    static_assert(bytes == 4, "one element, 4, 8 or a multiple of 16 bytes");
    const unsigned raw = __ldca(reinterpret_cast<const unsigned*>(src));
    memcpy(dst, &raw, 4);
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_raw(T* dst, const T (&src)[N]) {
  constexpr int bytes = N * sizeof(T);
  if constexpr (N == 1) {
    __stwb(dst, src[0]);
  } else if constexpr (bytes >= 16) {
    static_assert(bytes % 16 == 0, "whole 128-bit accesses");
#pragma unroll
    for (int k = 0; k < bytes / 16; ++k) {
      uint4 raw;
      memcpy(&raw, reinterpret_cast<const char*>(src) + 16 * k, 16);
      __stwb(reinterpret_cast<uint4*>(dst) + k, raw);
    }
  } else if constexpr (bytes == 8) {
    uint2 raw;
    memcpy(&raw, src, 8);
    __stwb(reinterpret_cast<uint2*>(dst), raw);
  } else {
    static_assert(bytes == 4, "one element, 4, 8 or a multiple of 16 bytes");
    unsigned raw;
    memcpy(&raw, src, 4);
    __stwb(reinterpret_cast<unsigned*>(dst), raw);
  }
}

// N consecutive elements of T, as float.
template <int N, typename T>
__device__ __forceinline__ void load(const T* src, float (&dst)[N]) {
  T elems[N];
  load_raw(src, elems);
#pragma unroll
  for (int k = 0; k < N; ++k) dst[k] = to_float(elems[k]);
}

template <int N, typename T>
__device__ __forceinline__ void store(T* dst, const float (&src)[N]) {
  T elems[N];
#pragma unroll
  for (int k = 0; k < N; ++k) elems[k] = from_float<T>(src[k]);
  store_raw(dst, elems);
}

// Whether load / store of N elements of T may start at p (accesses naturally aligned).
template <int N, typename T>
__device__ __forceinline__ bool aligned_for(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & (kAccessBytes<N, T> - 1)) == 0;
}

// ---- buckets ------------------------------------------------------------------------------------

template <typename T>
constexpr int dtype_code();
template <>
constexpr int dtype_code<float>() {
  return DTYPE_FLOAT32;
}
template <>
constexpr int dtype_code<__nv_bfloat16>() {
  return DTYPE_BFLOAT16;
}
template <>
constexpr int dtype_code<__half>() {
  return DTYPE_FLOAT16;
}
template <>
constexpr int dtype_code<uint8_t>() {  // 8-bit state: codes (update_kernels.cuh's main_kernel_8bit)
  return DTYPE_UINT8;
}

// layout.h's bucket code (fusedopt/_layout.py's bucket_code); error_bits: a compressed master's
// error term, 8 (code 1) or 16 (code 2), 0 without.
constexpr int bucket_code(int param, int grad, int state, bool shadow, bool stochastic,
                          int error_bits = 0) {
  return param | grad << BUCKET_GRAD_SHIFT | state << BUCKET_STATE_SHIFT |
         static_cast<int>(shadow) << BUCKET_SHADOW_BIT |
         static_cast<int>(stochastic) << BUCKET_STOCHASTIC_BIT |
         (error_bits / 8) << BUCKET_ERROR_SHIFT;
}

// One bucket as types (fusedopt.optimizer.Bucket): the updated parameter P (the fp32 master when
// there is one), the grads G, the state S. A master (P != G: a grad always has its model
// parameter's dtype) is rounded into the model's parameter, the shadow (tmeta's T_SHADOW, of
// type G); STOCHASTIC: the (bf16) parameter is stored with stochastic rounding; ERR (8 or 16): a
// compressed master (fusedopt/master.h), the bf16 parameter plus an error term of type Error
// (int8 / int16, tmeta's T_ERR) stands for the fp32 master the update reads and writes.
// kVec: elements per thread and step of the vector path, one 128-bit access of the narrowest type
// (8 for a bucket with any 16-bit array), so every array moves 16 bytes per access; an fp32 array
// beside bf16 ones takes two. Sized by the widest type instead, a bf16 array beside fp32 ones
// moved 8 bytes per access, for 8 to 20 fewer registers (ptxas, sm_90: 38-66 now, no spills;
// benchmarks/results/kernel_report_*). The error term does not count: an int8 one would make kVec
// 16, 64 bytes of each fp32 state slot per thread and access; it moves kVec * sizeof(Error)
// bytes, 8 (int8) or 16 (int16), beside the bf16 arrays' 16.
template <typename P, typename G, typename S, bool STOCHASTIC = false, int ERR = 0>
struct Bucket {
  using Param = P;
  using Grad = G;
  using State = S;
  using Error = std::conditional_t<ERR == 16, int16_t, int8_t>;  // (kError only)
  static constexpr bool kShadow = !std::is_same<P, G>::value;
  static constexpr bool kStochastic = STOCHASTIC;
  static constexpr int kError = ERR;  // the error term's bits, 0: no compressed master
  static constexpr int kCode = bucket_code(dtype_code<P>(), dtype_code<G>(), dtype_code<S>(),
                                           kShadow, STOCHASTIC, ERR);
  static constexpr size_t kNarrowest = sizeof(P) < sizeof(G)
                                           ? (sizeof(P) < sizeof(S) ? sizeof(P) : sizeof(S))
                                           : (sizeof(G) < sizeof(S) ? sizeof(G) : sizeof(S));
  static constexpr int kVec = 16 / kNarrowest;
  static_assert(!STOCHASTIC || std::is_same<P, __nv_bfloat16>::value,
                "stochastic rounding stores bf16 parameters");
  static_assert(!kShadow || std::is_same<P, float>::value, "a master is fp32");
  static_assert(ERR == 0 || ERR == 8 || ERR == 16, "an int8 or int16 error term");
  static_assert(ERR == 0 || (std::is_same<P, __nv_bfloat16>::value && !kShadow && !STOCHASTIC),
                "a compressed master's error term: bf16 parameters, no shadow, no SR");
};

using f32 = float;
using bf16 = __nv_bfloat16;
using f16 = __half;
// The buckets the main kernels are compiled for; any other code is cudaErrorInvalidValue.
using SupportedBuckets = std::tuple<
    Bucket<f32, f32, f32>, Bucket<bf16, bf16, bf16>, Bucket<f16, f16, f16>,  // one dtype
    Bucket<f32, f32, bf16>, Bucket<f32, f32, f16>,                           // low-precision state
    Bucket<f32, bf16, f32>, Bucket<f32, f16, f32>, Bucket<f32, bf16, bf16>,  // fp32 master
    Bucket<bf16, bf16, f32>,                                                 // fp32 state
    Bucket<bf16, bf16, bf16, true>, Bucket<bf16, bf16, f32, true>,           // stochastic
    // 8-bit state (csrc/cpu/multi_tensor.h's U8 buckets, the same four)
    Bucket<f32, f32, uint8_t>, Bucket<f32, bf16, uint8_t>, Bucket<bf16, bf16, uint8_t>,
    Bucket<bf16, bf16, uint8_t, true>,
    // compressed masters, int8 / int16 error term (the CPU's, the same four)
    Bucket<bf16, bf16, f32, false, 8>, Bucket<bf16, bf16, f32, false, 16>,
    Bucket<bf16, bf16, uint8_t, false, 8>, Bucket<bf16, bf16, uint8_t, false, 16>>;

template <typename... B>
constexpr bool distinct_codes(std::tuple<B...>*) {
  const int codes[] = {B::kCode...};
  for (size_t i = 0; i < sizeof...(B); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (codes[i] == codes[j]) return false;
    }
  }
  return true;
}
static_assert(distinct_codes(static_cast<SupportedBuckets*>(nullptr)), "one kernel per bucket");

template <typename F, typename... B>
cudaError_t dispatch_in(int code, F& f, std::tuple<B...>*) {
  cudaError_t err = cudaErrorInvalidValue;
  static_cast<void>(((code == B::kCode ? (err = f(B{}), true) : false) || ...));
  return err;
}

// f(Bucket<...>{}) for the bucket `code` encodes, or cudaErrorInvalidValue (f not called) when
// no kernel is compiled for it.
template <typename F>
cudaError_t dispatch_bucket(int code, F&& f) {
  return dispatch_in(code, f, static_cast<SupportedBuckets*>(nullptr));
}

inline bool bucket_supported(int code) {
  return dispatch_bucket(code, [](auto) { return cudaSuccess; }) == cudaSuccess;
}

// The grad dtype code of a bucket code.
constexpr int bucket_grad(int code) { return (code >> BUCKET_GRAD_SHIFT) & 3; }

// ---- storing the parameter --------------------------------------------------------------------

// float -> bf16, rounded up with probability equal to the dropped fraction (kernels/
// multi_tensor.py's stochastic_bf16, bit for bit): 16 noise bits hashed from the element's offset
// in its tensor (its low 32 bits) and the seed. A NaN is converted as from_float converts it.
__device__ __forceinline__ __nv_bfloat16 stochastic_bf16(float x, uint32_t offset, uint32_t seed) {
  if (x != x) return from_float<__nv_bfloat16>(x);
  const uint32_t noise = mix32(offset ^ seed) & 0xFFFFu;
  return __ushort_as_bfloat16(static_cast<unsigned short>((__float_as_uint(x) + noise) >> 16));
}

// The parameter an update reads and where the updated one goes (kernels/multi_tensor.py's
// load_param / store_param): p, rounded to nearest even or (kStochastic) stochastically; with a
// master (kShadow), the model's parameter too, rounded to nearest even; with a compressed master
// (kError), the master b + e * s(b) that the bf16 p and the error term err stand for is read, and
// the new one is stored as its bf16 rounding to nearest even and the error term of that rounding
// (master.h's rebuild and error; b is the rounding as stored, not read back). master::error's
// division by the power of two s(b) stays a division: two multiplies by powers of two instead
// (kernels/multi_tensor.py's master_error; exact too) were no better on the whole (ptxas, most
// registers of a kernel: SGD's at sm_90 62 against 46, Adam's 8-bit int8 at sm_90 118 against
// 113, but Adam's at sm_80 64 against 71), and neither spills.
template <typename B>
struct ParamOut {
  using P = typename B::Param;
  using G = typename B::Grad;
  using E = typename B::Error;
  P* p;
  G* shadow;      // kShadow only
  E* err;         // kError only
  uint32_t seed;  // kStochastic only

  // row: the tensor's row t of tmeta; seed_step: its scal[t][Opt::kSeed].
  __device__ __forceinline__ static ParamOut read(const int64_t* row, int64_t t,
                                                  const float* seed_step) {
    ParamOut out;
    out.p = ptr_at<P>(row[T_PARAM]);
    out.shadow = B::kShadow ? ptr_at<G>(row[T_SHADOW]) : nullptr;
    out.err = B::kError != 0 ? ptr_at<E>(row[T_ERR]) : nullptr;
    out.seed = B::kStochastic ? stochastic_seed(t, *seed_step) : 0u;
    return out;
  }

  template <int N>
  __device__ __forceinline__ bool aligned() const {
    return aligned_for<N, P>(p) && (!B::kShadow || aligned_for<N, G>(shadow)) &&
           (B::kError == 0 || aligned_for<N, E>(err));
  }

  // rp: the N parameter elements [i, i + N), as float32 (a compressed master rebuilt).
  template <int N>
  __device__ __forceinline__ void load(int64_t i, float (&rp)[N]) const {
    cuda::load(p + i, rp);
    if constexpr (B::kError != 0) {
      E e[N];
      load_raw(err + i, e);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        rp[k] = master::rebuild<B::kError>(rp[k], static_cast<float>(e[k]));
      }
    }
  }

  // rp: the N updated elements [i, i + N).
  template <int N>
  __device__ __forceinline__ void write(int64_t i, const float (&rp)[N]) const {
    if constexpr (B::kStochastic) {
      const uint32_t offset = static_cast<uint32_t>(i);  // the low bits are all the hash reads
      __nv_bfloat16 elems[N];
#pragma unroll
      for (int k = 0; k < N; ++k) elems[k] = stochastic_bf16(rp[k], offset + k, seed);
      store_raw(p + i, elems);
    } else if constexpr (B::kError != 0) {
      __nv_bfloat16 b[N];
      E e[N];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        b[k] = from_float<__nv_bfloat16>(rp[k]);
        e[k] = static_cast<E>(static_cast<int>(master::error<B::kError>(rp[k], to_float(b[k]))));
      }
      store_raw(p + i, b);
      store_raw(err + i, e);
    } else {
      store(p + i, rp);
    }
    if constexpr (B::kShadow) store(shadow + i, rp);
  }
};

// ---- main pass ----------------------------------------------------------------------------------

// Calls op.apply<N>(i), which updates elements [i, i + N), over [start, end) of one chunk. With
// `vector` (every pointer op touches is aligned for VEC-element accesses, aligned_for, and start
// is a multiple of VEC) it goes VEC elements at a time and then finishes the tensor's tail one by
// one; otherwise one by one throughout, which is correct for any alignment. Offsets are 64-bit:
// tensors may exceed 2^31.
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

// The sum of x[0, n) in float64, in a fixed order whatever the scheduling: thread k adds x[k],
// x[k + kPrologueBlock], ... in turn, then a fixed tree over the threads. Call from every thread
// of a kPrologueBlock-thread block; the result is valid in thread 0.
template <typename T>
__device__ __forceinline__ double fixed_order_sum(const T* x, int64_t n) {
  __shared__ double sums[kPrologueBlock];
  double acc = 0.0;
  for (int64_t c = threadIdx.x; c < n; c += kPrologueBlock) acc += static_cast<double>(x[c]);
  sums[threadIdx.x] = acc;
  __syncthreads();
#pragma unroll
  for (int stride = kPrologueBlock / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) sums[threadIdx.x] += sums[threadIdx.x + stride];
    __syncthreads();
  }
  return sums[0];
}

// The clipping arguments of a prologue: the first stage's float64 sums (layout.h's partials
// tail, written by sumsq.cu's clip_stage_kernel from the per-chunk sums of squares) and where the
// prologue writes (coefficient, norm). clip == null: no clipping.
struct ClipArgs {
  const double* stage;
  int64_t n_stage;
  float max_norm;
  float* clip;
};

// The first stage's sums of the partials buffer of n_chunks chunks (layout.h).
inline const double* clip_stage_of(const float* partials, int64_t n_chunks) {
  return reinterpret_cast<const double*>(partials + clip_stage_offset(n_chunks));
}

// ---- step prologue --------------------------------------------------------------------------
// Two kernels: the groups' half, one block (group lrs and Noam counters, then the clip
// coefficient), and the tensors' half, a grid of one thread per tensor (step counts and the
// scalars the main pass reads, from the group lrs). With at most kPrologueBlock tensors the
// groups' block does the tensors too: one launch, as before the grid (10,000 tensors were 40
// rounds of that block). Opt::scalars(hyper row, lr, step, scal row) is the optimizer's part
// (fusedopt/optim/*.h).

// Writes each group's lr for this step to glr (float64). Call from every thread of the block,
// then __syncthreads() before reading glr.
__device__ __forceinline__ void resolve_group_lrs(const double* hyper, const int64_t* gptr,
                                                  double* glr, int64_t n_groups) {
  for (int64_t g = threadIdx.x; g < n_groups; g += blockDim.x) {
    glr[g] = group_lr(hyper + g * HYPER_WIDTH, gptr + g * GPTR_WIDTH);
  }
}

// The global grad norm from the first stage's sums (fixed_order_sum: the result does not depend
// on scheduling); then torch's clip coefficient (clip_from_sumsq). Call from every thread of a
// kPrologueBlock-thread block.
__device__ __forceinline__ void resolve_clip(const ClipArgs& a) {
  const double sumsq = fixed_order_sum(a.stage, a.n_stage);
  if (threadIdx.x == 0) clip_from_sumsq(sumsq, a.max_norm, a.clip);
}

// One tensor's step and scalars (t: its row of tmeta), once glr holds this step's group lrs.
template <class Opt>
__device__ __forceinline__ void tensor_prologue(const int64_t* tmeta, int64_t t,
                                                const double* hyper, const double* glr,
                                                float* scal) {
  const int64_t* row = tmeta + t * TMETA_WIDTH;
  const int64_t step = advance_step(row);
  const int64_t grp = row[T_GROUP];
  Opt::scalars(hyper + grp * HYPER_WIDTH, glr[grp], step, scal + t * SCAL_WIDTH);
}

// The groups' half (kernels/multi_tensor.py's _groups_prologue), and the tensors [0, n_here):
// n_here is n_tensors when no grid follows, else 0. Nothing when GradScaler found an inf/NaN
// (found_inf != 0): no step advances. minBlocks 1: without it ptxas kept Adam's at 40 registers
// and spilled 16 bytes around the schedules' float64 cos (sm_80); with it 56, no spills.
template <class Opt>
__global__ void __launch_bounds__(kPrologueBlock, 1)
    prologue_kernel(const int64_t* tmeta, int64_t n_here, const double* hyper,
                    const int64_t* gptr, double* glr, int64_t n_groups, float* scal,
                    const float* found_inf, ClipArgs clip) {
  if (step_skipped(found_inf)) return;  // uniform over the block
  resolve_group_lrs(hyper, gptr, glr, n_groups);
  if (clip.clip != nullptr) resolve_clip(clip);
  __syncthreads();  // the group lrs just written are read next by other threads
  for (int64_t t = threadIdx.x; t < n_here; t += blockDim.x) {
    tensor_prologue<Opt>(tmeta, t, hyper, glr, scal);
  }
}

// The tensors' half (kernels/*.py's per-tensor prologues): one thread per tensor,
// after prologue_kernel on the same stream.
template <class Opt>
__global__ void __launch_bounds__(kPrologueBlock)
    tensor_prologue_kernel(const int64_t* tmeta, int64_t n_tensors, const double* hyper,
                           const double* glr, float* scal, const float* found_inf) {
  if (step_skipped(found_inf)) return;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kPrologueBlock + threadIdx.x;
  if (t < n_tensors) tensor_prologue<Opt>(tmeta, t, hyper, glr, scal);
}

// Launches a step's prologue (launchers.h's fusedopt_cuda_prologue); with clipping, after
// sumsq.cu's clip stage (partials: the buffer of n_partials chunks, layout.h).
template <class Opt>
cudaError_t launch_prologue(const int64_t* tmeta, int64_t n_tensors, const double* hyper,
                            const int64_t* gptr, double* glr, int64_t n_groups, float* scal,
                            const float* found_inf, const float* partials, int64_t n_partials,
                            float max_norm, bool clip, float* clip_buf, cudaStream_t stream) {
  const ClipArgs clip_args{clip_stage_of(partials, n_partials), clip_stage_blocks(n_partials),
                           max_norm, clip ? clip_buf : nullptr};
  const bool grid = n_tensors > kPrologueBlock;
  prologue_kernel<Opt><<<1, kPrologueBlock, 0, stream>>>(
      tmeta, grid ? 0 : n_tensors, hyper, gptr, glr, n_groups, scal, found_inf, clip_args);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !grid) return err;
  const int64_t blocks = (n_tensors + kPrologueBlock - 1) / kPrologueBlock;
  if (!chunk_grid_fits(blocks)) return cudaErrorInvalidValue;
  tensor_prologue_kernel<Opt><<<static_cast<unsigned>(blocks), kPrologueBlock, 0, stream>>>(
      tmeta, n_tensors, hyper, glr, scal, found_inf);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fusedopt
