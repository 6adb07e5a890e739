// RMSprop: the step prologue and the fused multi-tensor pass (port of kernels/rmsprop.py).
//
// Per element, in float32 (torch.optim's math, in its order of operations):
// g = -g (maximize); g += wd*p; sq = alpha*sq + (1-alpha)*g*g;
// centered: ga = lerp(ga, g, 1-alpha), avg = sqrt(sq - ga*ga) + eps, else avg = sqrt(sq) + eps;
// momentum: buf = momentum*buf + g/avg, p -= lr*buf; else p -= lr*g/avg.
// No bias correction; the step still advances (torch.optim keeps it in the state). centered,
// momentum and maximize are per-tensor runtime values; the HAS_CENTERED / HAS_MOMENTUM template
// flags only compile their code in or out, as HAS_SCALE does GradScaler's unscaling (divide,
// write the grad back); skipped steps (found_inf) and the clip coefficient are runtime values
// (multi_tensor.cuh's step_skipped, GradIn).
// One kernel per bucket (multi_tensor.cuh's Bucket: the dtypes of parameter, grads and state; a
// shadow when the parameter is an fp32 master; stochastic rounding) and template flags; the
// math runs in float32 whatever the dtypes.
#include "launchers.h"
#include "multi_tensor.cuh"

namespace fusedopt {
namespace cuda {
namespace {

// The optimizer's part of the prologue (multi_tensor.cuh's launch_prologue).
struct RmspropScalars {
  __device__ __forceinline__ static void write(const double* h, double lr, int64_t step,
                                               float* s) {
    rmsprop_scalars(h, lr, step, s);
  }
};

// One tensor's update over a chunk: its pointers and the prologue's scalars.
template <typename B, bool HAS_CENTERED, bool HAS_MOMENTUM, bool HAS_SCALE>
struct RmspropUpdate {
  using G = typename B::Grad;
  using S = typename B::State;
  ParamOut<B> out;  // the parameter: read from out.p, written through out
  G* g;             // written back unscaled with HAS_SCALE
  S* sq;
  S* buf;  // touched only when use_momentum
  S* ga;   // touched only when centered
  float neg_lr, alpha, w, eps, wd, momentum, sign;
  bool l2, centered, use_momentum;
  GradIn<HAS_SCALE> grad_in;

  template <int N>
  __device__ __forceinline__ void apply(int64_t i) const {
    // Two passes over the N elements: the square average, centered's grad average (stored right
    // away) and the denominator; then momentum and the parameter. One pass holding all five
    // arrays to the end spilled 4 bytes at sm_80 (bf16 parameter with fp32 state, centered and
    // momentum) once a vector became 16 bytes of the narrowest dtype (8 elements); storing the
    // square average after the first pass too spilled at sm_90 (fp32 parameter, 16-bit state).
    // The arithmetic is the one-pass version's, operation for operation.
    float rp[N], rg[N], rsq[N], avg[N];
    load(out.p + i, rp);
    load(g + i, rg);
    grad_in.apply(g + i, rg);
    load(sq + i, rsq);
    if (HAS_CENTERED && centered) {
      float rga[N];
      load(ga + i, rga);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        rg[k] = grad(rg[k], rp[k]);
        rsq[k] = square_avg(rsq[k], rg[k]);
        rga[k] = lerp(rga[k], rg[k], w);
        avg[k] = __fsqrt_rn(__fmaf_rn(-rga[k], rga[k], rsq[k])) + eps;
      }
      store(ga + i, rga);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        rg[k] = grad(rg[k], rp[k]);
        rsq[k] = square_avg(rsq[k], rg[k]);
        avg[k] = __fsqrt_rn(rsq[k]) + eps;
      }
    }
    if (HAS_MOMENTUM && use_momentum) {
      float rbuf[N];
      load(buf + i, rbuf);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        rbuf[k] = rbuf[k] * momentum + __fdiv_rn(rg[k], avg[k]);
        rp[k] = __fmaf_rn(rbuf[k], neg_lr, rp[k]);
      }
      store(buf + i, rbuf);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) rp[k] = rp[k] + __fdiv_rn(neg_lr * rg[k], avg[k]);
    }
    store(sq + i, rsq);
    out.write(i, rp);
  }

  // The gradient the update uses: maximize's sign, then L2 weight decay.
  __device__ __forceinline__ float grad(float gk, float pk) const {
    gk = gk * sign;
    return l2 ? __fmaf_rn(pk, wd, gk) : gk;
  }

  __device__ __forceinline__ float square_avg(float sqk, float gk) const {
    return __fmaf_rn(w * gk, gk, sqk * alpha);
  }
};

// One block per chunk.
template <typename B, bool HAS_CENTERED, bool HAS_MOMENTUM, bool HAS_SCALE>
__global__ void __launch_bounds__(kBlock)
    rmsprop_main_kernel(const int64_t* __restrict__ tmeta, const int64_t* __restrict__ grads,
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
  RmspropUpdate<B, HAS_CENTERED, HAS_MOMENTUM, HAS_SCALE> op;
  op.out = ParamOut<B>::read(row, t, s + rmsprop_scal::seed);
  op.g = ptr_at<G>(grads[t]);
  op.sq = ptr_at<S>(row[T_S0]);
  op.buf = ptr_at<S>(row[T_S1]);
  op.ga = ptr_at<S>(row[T_S2]);
  op.neg_lr = -s[rmsprop_scal::lr];
  op.alpha = s[rmsprop_scal::alpha];
  op.w = s[rmsprop_scal::w];
  op.eps = s[rmsprop_scal::eps];
  op.wd = s[rmsprop_scal::weight_decay];
  op.momentum = s[rmsprop_scal::momentum];
  op.sign = s[rmsprop_scal::sign];
  op.l2 = op.wd != 0.0f;
  op.centered = s[rmsprop_scal::centered] != 0.0f;
  op.use_momentum = op.momentum > 0.0f;
  op.grad_in = GradIn<HAS_SCALE>::read(grad_scale, clip);
  const bool vector = start % VEC == 0 && op.out.template aligned<VEC>() &&
                      aligned_for<VEC, G>(op.g) && aligned_for<VEC, S>(op.sq) &&
                      (!(HAS_CENTERED && op.centered) || aligned_for<VEC, S>(op.ga)) &&
                      (!(HAS_MOMENTUM && op.use_momentum) || aligned_for<VEC, S>(op.buf));
  const int64_t end = min(start + chunk_size, row[T_NUMEL]);
  for_each_in_chunk<VEC>(op, start, end, vector);
}

// The launch arguments after the grid: the tables, GradScaler's tensors, the clip buffer.
struct MainArgs {
  const int64_t* tmeta;
  const int64_t* grads;
  const float* scal;
  const int64_t* chunks;
  int64_t n_chunks, chunk_size;
  const float* grad_scale;
  const float* found_inf;
  const float* clip;
};

template <typename B, bool HAS_CENTERED, bool HAS_MOMENTUM>
cudaError_t launch_variant(const MainArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.n_chunks));
  const auto kernel = a.grad_scale != nullptr
                          ? rmsprop_main_kernel<B, HAS_CENTERED, HAS_MOMENTUM, true>
                          : rmsprop_main_kernel<B, HAS_CENTERED, HAS_MOMENTUM, false>;
  kernel<<<grid, kBlock, 0, stream>>>(a.tmeta, a.grads, a.scal, a.chunks, a.chunk_size,
                                      a.grad_scale, a.found_inf, a.clip);
  return cudaGetLastError();
}

template <typename B>
cudaError_t launch_main(const MainArgs& a, bool has_centered, bool has_momentum,
                        cudaStream_t stream) {
  if (a.n_chunks == 0) return cudaSuccess;
  const auto launch = has_centered ? (has_momentum ? launch_variant<B, true, true>
                                                   : launch_variant<B, true, false>)
                                   : (has_momentum ? launch_variant<B, false, true>
                                                   : launch_variant<B, false, false>);
  return launch(a, stream);
}

cudaError_t rmsprop_main(const MainArgs& a, int bucket, bool has_centered, bool has_momentum,
                         cudaStream_t stream) {
  if (!chunk_grid_fits(a.n_chunks)) return cudaErrorInvalidValue;
  return dispatch_bucket(bucket, [&](auto b) {
    return launch_main<decltype(b)>(a, has_centered, has_momentum, stream);
  });
}

}  // namespace
}  // namespace cuda
}  // namespace fusedopt

extern "C" int fusedopt_cuda_rmsprop_prologue(const int64_t* tmeta, int64_t n_tensors,
                                              const double* hyper, const int64_t* gptr,
                                              double* glr, int64_t n_groups, float* scal,
                                              const float* found_inf, const float* partials,
                                              int64_t n_partials, float max_norm, bool clip,
                                              float* clip_buf, void* stream) {
  return fusedopt::cuda::launch_prologue<fusedopt::cuda::RmspropScalars>(
      tmeta, n_tensors, hyper, gptr, glr, n_groups, scal, found_inf, partials, n_partials,
      max_norm, clip, clip_buf, static_cast<cudaStream_t>(stream));
}

extern "C" int fusedopt_cuda_rmsprop_main(const int64_t* tmeta, const int64_t* grads,
                                          const float* scal, const int64_t* chunks,
                                          int64_t n_chunks, int64_t chunk_size, int bucket,
                                          bool has_centered, bool has_momentum,
                                          const float* grad_scale, const float* found_inf,
                                          const float* clip_buf, void* stream) {
  const fusedopt::cuda::MainArgs args{tmeta,      grads,      scal,      chunks,  n_chunks,
                                      chunk_size, grad_scale, found_inf, clip_buf};
  return fusedopt::cuda::rmsprop_main(args, bucket, has_centered, has_momentum,
                                      static_cast<cudaStream_t>(stream));
}
