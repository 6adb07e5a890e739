// Adam and AdamW: the step prologue and the fused multi-tensor pass (port of kernels/adam.py).
//
// Per element, in float32 (torch.optim's math, in its order of operations):
// g = -g (maximize); p *= 1 - lr*wd (decoupled) or g += wd*p (L2); m = lerp(m, g, 1-b1);
// v = b2*v + (1-b2)*g*g; vmax = max(vmax, v) (amsgrad);
// p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
// amsgrad, maximize and decoupled decay are per-tensor runtime values, so groups that differ in
// them share one launch; the HAS_AMSGRAD template flag only compiles the AMSGrad code in or out.
// GradScaler's unscaling (HAS_SCALE: divide, write the grad back) is a template flag too; skipped
// steps (found_inf) and the clip coefficient are runtime values (multi_tensor.cuh's step_skipped,
// GradIn).
// One kernel per bucket (multi_tensor.cuh's Bucket: the dtypes of parameter, grads and state; a
// shadow when the parameter is an fp32 master; stochastic rounding) and template flags; the
// math runs in float32 whatever the dtypes.
#include "launchers.h"
#include "multi_tensor.cuh"

namespace fusedopt {
namespace cuda {
namespace {

// The optimizer's part of the prologue (multi_tensor.cuh's launch_prologue).
struct AdamScalars {
  __device__ __forceinline__ static void write(const double* h, double lr, int64_t step,
                                               float* s) {
    adam_scalars(h, lr, step, s);
  }
};

// One tensor's update over a chunk: its pointers and the prologue's scalars.
template <typename B, bool HAS_AMSGRAD, bool HAS_SCALE>
struct AdamUpdate {
  using G = typename B::Grad;
  using S = typename B::State;
  ParamOut<B> out;  // the parameter: read from out.p, written through out
  G* g;             // written back unscaled with HAS_SCALE
  S* m;
  S* v;
  S* vmax;  // touched only when amsgrad
  float neg_step_size, bc2_sqrt, p_mul, g_wd, w1, beta2, w2, eps, sign;
  bool l2, amsgrad;
  GradIn<HAS_SCALE> grad_in;

  template <int N>
  __device__ __forceinline__ void apply(int64_t i) const {
    float rp[N], rg[N], rm[N], rv[N], rmax[N];
    load(out.p + i, rp);
    load(g + i, rg);
    grad_in.apply(g + i, rg);
    load(m + i, rm);
    load(v + i, rv);
    if (HAS_AMSGRAD && amsgrad) load(vmax + i, rmax);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float gk = rg[k] * sign;
      const float pk = rp[k] * p_mul;
      if (l2) gk = __fmaf_rn(pk, g_wd, gk);
      rm[k] = lerp(rm[k], gk, w1);
      rv[k] = __fmaf_rn(w2 * gk, gk, rv[k] * beta2);
      float v_used = rv[k];
      if (HAS_AMSGRAD && amsgrad) {
        rmax[k] = maximum(rmax[k], rv[k]);
        v_used = rmax[k];
      }
      const float denom = __fdiv_rn(__fsqrt_rn(v_used), bc2_sqrt) + eps;
      rp[k] = pk + __fdiv_rn(neg_step_size * rm[k], denom);
    }
    out.write(i, rp);
    store(m + i, rm);
    store(v + i, rv);
    if (HAS_AMSGRAD && amsgrad) store(vmax + i, rmax);
  }
};

// One block per chunk.
template <typename B, bool HAS_AMSGRAD, bool HAS_SCALE>
__global__ void __launch_bounds__(kBlock)
    adam_main_kernel(const int64_t* __restrict__ tmeta, const int64_t* __restrict__ grads,
                     const float* __restrict__ scal, const int64_t* __restrict__ chunks,
                     int64_t chunk_size, const float* __restrict__ grad_scale,
                     const float* __restrict__ found_inf, const float* __restrict__ clip) {
  using G = typename B::Grad;
  using S = typename B::State;
  constexpr int VEC = B::kVec;
  if (step_skipped(found_inf)) return;
  const int64_t chunk = blockIdx.x;
  const int64_t t = chunks[2 * chunk];
  const int64_t start = chunks[2 * chunk + 1];
  const int64_t* row = tmeta + t * TMETA_WIDTH;
  const float* s = scal + t * SCAL_WIDTH;
  AdamUpdate<B, HAS_AMSGRAD, HAS_SCALE> op;
  op.out = ParamOut<B>::read(row, t, s + adam_scal::seed);
  op.g = ptr_at<G>(grads[t]);
  op.m = ptr_at<S>(row[T_S0]);
  op.v = ptr_at<S>(row[T_S1]);
  op.vmax = ptr_at<S>(row[T_S2]);
  op.neg_step_size = -s[adam_scal::step_size];
  op.bc2_sqrt = s[adam_scal::bc2_sqrt];
  op.p_mul = s[adam_scal::p_mul];
  op.g_wd = s[adam_scal::g_wd];
  op.w1 = s[adam_scal::w1];
  op.beta2 = s[adam_scal::beta2];
  op.w2 = s[adam_scal::w2];
  op.eps = s[adam_scal::eps];
  op.sign = s[adam_scal::sign];
  op.l2 = op.g_wd != 0.0f;
  op.amsgrad = s[adam_scal::amsgrad] != 0.0f;
  op.grad_in = GradIn<HAS_SCALE>::read(grad_scale, clip);
  const bool vector = start % VEC == 0 && op.out.template aligned<VEC>() &&
                      aligned_for<VEC, G>(op.g) && aligned_for<VEC, S>(op.m) &&
                      aligned_for<VEC, S>(op.v) &&
                      (!(HAS_AMSGRAD && op.amsgrad) || aligned_for<VEC, S>(op.vmax));
  const int64_t end = min(start + chunk_size, row[T_NUMEL]);
  for_each_in_chunk<VEC>(op, start, end, vector);
}

template <typename B>
cudaError_t launch_main(const int64_t* tmeta, const int64_t* grads, const float* scal,
                        const int64_t* chunks, int64_t n_chunks, int64_t chunk_size,
                        bool has_amsgrad, const float* grad_scale, const float* found_inf,
                        const float* clip, cudaStream_t stream) {
  if (n_chunks == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(n_chunks));
  const bool scaled = grad_scale != nullptr;
  const auto kernel = has_amsgrad ? (scaled ? adam_main_kernel<B, true, true>
                                            : adam_main_kernel<B, true, false>)
                                  : (scaled ? adam_main_kernel<B, false, true>
                                            : adam_main_kernel<B, false, false>);
  kernel<<<grid, kBlock, 0, stream>>>(tmeta, grads, scal, chunks, chunk_size, grad_scale,
                                      found_inf, clip);
  return cudaGetLastError();
}

cudaError_t adam_main(const int64_t* tmeta, const int64_t* grads, const float* scal,
                      const int64_t* chunks, int64_t n_chunks, int64_t chunk_size, int bucket,
                      bool has_amsgrad, const float* grad_scale, const float* found_inf,
                      const float* clip, cudaStream_t stream) {
  if (!chunk_grid_fits(n_chunks)) return cudaErrorInvalidValue;
  return dispatch_bucket(bucket, [&](auto b) {
    return launch_main<decltype(b)>(tmeta, grads, scal, chunks, n_chunks, chunk_size,
                                    has_amsgrad, grad_scale, found_inf, clip, stream);
  });
}

}  // namespace
}  // namespace cuda
}  // namespace fusedopt

extern "C" int fusedopt_cuda_adam_prologue(const int64_t* tmeta, int64_t n_tensors,
                                           const double* hyper, const int64_t* gptr, double* glr,
                                           int64_t n_groups, float* scal, const float* found_inf,
                                           const float* partials, int64_t n_partials,
                                           float max_norm, bool clip, float* clip_buf,
                                           void* stream) {
  return fusedopt::cuda::launch_prologue<fusedopt::cuda::AdamScalars>(
      tmeta, n_tensors, hyper, gptr, glr, n_groups, scal, found_inf, partials, n_partials,
      max_norm, clip, clip_buf, static_cast<cudaStream_t>(stream));
}

extern "C" int fusedopt_cuda_adam_main(const int64_t* tmeta, const int64_t* grads,
                                       const float* scal, const int64_t* chunks, int64_t n_chunks,
                                       int64_t chunk_size, int bucket, bool has_amsgrad,
                                       const float* grad_scale, const float* found_inf,
                                       const float* clip_buf, void* stream) {
  return fusedopt::cuda::adam_main(tmeta, grads, scal, chunks, n_chunks, chunk_size, bucket,
                                   has_amsgrad, grad_scale, found_inf, clip_buf,
                                   static_cast<cudaStream_t>(stream));
}
