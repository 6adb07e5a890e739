// The clipping pre-pass (port of kernels/multi_tensor.py's _sumsq_main): each chunk's float32 sum
// of squares of the (unscaled) gradient, read in the bucket's grad dtype, into partials[chunk];
// then the reduction's first stage (clip_stage_kernel: float64 sums of CLIP_PER_BLOCK chunks, in
// a fixed order). The prologue adds those and writes the clip coefficient (multi_tensor.cuh's
// resolve_clip); the main passes multiply the gradients by it.
//
// Per element: g = g / scale (GradScaler; correctly rounded, not written back here: the main pass
// does that), acc = fma(g, g, acc). Each thread accumulates its elements in order, then the block
// adds the threads' sums in a fixed order (warp shuffles, then one warp over the warp sums): the
// result does not depend on scheduling.
#include "launchers.h"
#include "multi_tensor.cuh"

namespace fusedopt {
namespace cuda {
namespace {

constexpr int kWarps = kBlock / 32;

// One thread's share of a chunk's sum of squares.
template <typename T>
struct SumSquares {
  const T* g;
  float scale;
  bool unscale;
  mutable float acc;  // for_each_in_chunk takes the op as const

  template <int N>
  __device__ __forceinline__ void apply(int64_t i) const {
    float rg[N];
    load(g + i, rg);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float gk = unscale ? __fdiv_rn(rg[k], scale) : rg[k];
      acc = __fmaf_rn(gk, gk, acc);
    }
  }
};

// The sum of x over the block, in a fixed order; valid in thread 0.
__device__ __forceinline__ float block_sum(float x) {
  __shared__ float warp_sums[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < kWarps ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset >>= 1) {
      x += __shfl_down_sync(0xffffffffu, x, offset);
    }
  }
  return x;
}

// One block per chunk; partials is indexed by the chunk's position in `chunks`.
template <typename T>
__global__ void __launch_bounds__(kBlock)
    sumsq_kernel(const int64_t* __restrict__ tmeta, const int64_t* __restrict__ grads,
                 const int64_t* __restrict__ chunks, int64_t chunk_size,
                 const float* __restrict__ grad_scale, const float* __restrict__ found_inf,
                 float* __restrict__ partials) {
  const int64_t chunk = blockIdx.x;
  if (step_skipped(found_inf)) {  // the chunk counts as empty (its partial is never read)
    if (threadIdx.x == 0) partials[chunk] = 0.0f;
    return;
  }
  const int64_t t = chunks[2 * chunk];
  const int64_t start = chunks[2 * chunk + 1];
  SumSquares<T> op;
  op.g = ptr_at<const T>(grads[t]);
  op.unscale = grad_scale != nullptr;
  op.scale = op.unscale ? *grad_scale : 1.0f;
  op.acc = 0.0f;
  constexpr int VEC = 16 / sizeof(T);  // one 128-bit access
  const bool vector = start % VEC == 0 && aligned_for<VEC, T>(op.g);
  const int64_t end = min(start + chunk_size, tmeta[t * TMETA_WIDTH + T_NUMEL]);
  for_each_in_chunk<VEC>(op, start, end, vector);
  const float sum = block_sum(op.acc);
  if (threadIdx.x == 0) partials[chunk] = sum;
}

// The clipping reduction's first stage (kernels/multi_tensor.py's _clip_partials): block b adds
// the chunk sums [b * CLIP_PER_BLOCK, (b + 1) * CLIP_PER_BLOCK) in float64 in a fixed order
// (multi_tensor.cuh's fixed_order_sum) into stage[b]; the prologue adds those. A grid, so that
// 300,000 chunk sums are not one block's serial work.
__global__ void __launch_bounds__(kPrologueBlock)
    clip_stage_kernel(const float* __restrict__ partials, int64_t n_partials,
                      double* __restrict__ stage, const float* __restrict__ found_inf) {
  if (step_skipped(found_inf)) return;  // the prologue then reads nothing
  const int64_t first = static_cast<int64_t>(blockIdx.x) * CLIP_PER_BLOCK;
  const int64_t n = min(static_cast<int64_t>(CLIP_PER_BLOCK), n_partials - first);
  const double sum = fixed_order_sum(partials + first, n);
  if (threadIdx.x == 0) stage[blockIdx.x] = sum;
}

template <typename T>
cudaError_t launch(const int64_t* tmeta, const int64_t* grads, const int64_t* chunks,
                   int64_t n_chunks, int64_t chunk_size, const float* grad_scale,
                   const float* found_inf, float* partials, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(n_chunks));
  sumsq_kernel<T><<<grid, kBlock, 0, stream>>>(tmeta, grads, chunks, chunk_size, grad_scale,
                                               found_inf, partials);
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda
}  // namespace fusedopt

extern "C" int fusedopt_cuda_sumsq(const int64_t* tmeta, const int64_t* grads,
                                   const int64_t* chunks, int64_t n_chunks, int64_t chunk_size,
                                   int bucket, const float* grad_scale, const float* found_inf,
                                   float* partials, void* stream) {
  using namespace fusedopt;
  using namespace fusedopt::cuda;
  if (!chunk_grid_fits(n_chunks) || !bucket_supported(bucket)) return cudaErrorInvalidValue;
  if (n_chunks == 0) return cudaSuccess;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (bucket_grad(bucket)) {  // the grads' dtype is all this pass reads
    case DTYPE_FLOAT32:
      return launch<float>(tmeta, grads, chunks, n_chunks, chunk_size, grad_scale, found_inf,
                           partials, s);
    case DTYPE_BFLOAT16:
      return launch<__nv_bfloat16>(tmeta, grads, chunks, n_chunks, chunk_size, grad_scale,
                                   found_inf, partials, s);
    case DTYPE_FLOAT16:
      return launch<__half>(tmeta, grads, chunks, n_chunks, chunk_size, grad_scale, found_inf,
                            partials, s);
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" int fusedopt_cuda_clip_stage(float* partials, int64_t n_partials,
                                        const float* found_inf, void* stream) {
  using namespace fusedopt;
  using namespace fusedopt::cuda;
  const int64_t blocks = clip_stage_blocks(n_partials);
  if (n_partials < 0 || !chunk_grid_fits(blocks)) return cudaErrorInvalidValue;
  double* stage = reinterpret_cast<double*>(partials + clip_stage_offset(n_partials));
  clip_stage_kernel<<<static_cast<unsigned>(blocks), kPrologueBlock, 0,
                      static_cast<cudaStream_t>(stream)>>>(partials, n_partials, stage, found_inf);
  return cudaGetLastError();
}

// The one list of buckets the main kernels are compiled for (multi_tensor.cuh's
// SupportedBuckets), for the binding's up-front check.
extern "C" int fusedopt_cuda_bucket_supported(int bucket) {
  return fusedopt::cuda::bucket_supported(bucket) ? 1 : 0;
}
