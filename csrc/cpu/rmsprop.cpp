// RMSprop on the CPU: the same prologue and per-element math as kernels/rmsprop.py, in the same
// order of operations (see that file for the formulas). Torch-free.
#include <algorithm>

#include "kernels.h"
#include "multi_tensor.h"

namespace fusedopt::cpu {

void rmsprop_prologue(const int64_t* tmeta, int64_t n_tensors, const double* hyper,
                      const int64_t* gptr, double* glr, int64_t n_groups, float* scal) {
  resolve_group_lrs(hyper, gptr, glr, n_groups);
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t* row = tmeta + t * TMETA_WIDTH;
    advance_step(row);
    int64_t g = row[T_GROUP];
    rmsprop_scalars(hyper + g * HYPER_WIDTH, glr[g], scal + t * SCAL_WIDTH);
  }
}

namespace {

template <int D, bool CENTERED, bool MOMENTUM, bool WD, bool UNSCALE>
inline void rmsprop_run(typename Storage<D>::type* __restrict__ p,
                        typename Storage<D>::type* __restrict__ g,
                        typename Storage<D>::type* __restrict__ sq,
                        typename Storage<D>::type* __restrict__ buf,
                        typename Storage<D>::type* __restrict__ ga, int64_t begin, int64_t end,
                        const float* s, float scale, float coef) {
  const float lr = s[rmsprop_scal::lr], alpha = s[rmsprop_scal::alpha], w = s[rmsprop_scal::w];
  const float eps = s[rmsprop_scal::eps], wd = s[rmsprop_scal::weight_decay];
  const float momentum = s[rmsprop_scal::momentum], sign = s[rmsprop_scal::sign];
  for (int64_t i = begin; i < end; ++i) {
    float pi = ld<D>(p, i);
    float gi = grad_at<D, UNSCALE>(g, i, scale, coef) * sign;
    if constexpr (WD) gi = fmaf(pi, wd, gi);
    float sqi = fmaf(w * gi, gi, ld<D>(sq, i) * alpha);
    float var = sqi;
    if constexpr (CENTERED) {
      float gai = lerp(ld<D>(ga, i), gi, w);
      st<D>(ga, i, gai);
      var = fmaf(-gai, gai, sqi);
    }
    float avg = std::sqrt(var) + eps;
    if constexpr (MOMENTUM) {
      float bi = ld<D>(buf, i) * momentum + gi / avg;
      st<D>(buf, i, bi);
      pi = fmaf(bi, -lr, pi);
    } else {
      pi = pi + (-lr * gi) / avg;
    }
    st<D>(p, i, pi);
    st<D>(sq, i, sqi);
  }
}

template <int D, bool CENTERED, bool MOMENTUM>
inline void rmsprop_run_opts(bool wd, bool unscale, typename Storage<D>::type* p,
                             typename Storage<D>::type* g, typename Storage<D>::type* sq,
                             typename Storage<D>::type* buf, typename Storage<D>::type* ga,
                             int64_t begin, int64_t end, const float* s, float scale, float coef) {
  if (wd && unscale)
    rmsprop_run<D, CENTERED, MOMENTUM, true, true>(p, g, sq, buf, ga, begin, end, s, scale, coef);
  else if (wd)
    rmsprop_run<D, CENTERED, MOMENTUM, true, false>(p, g, sq, buf, ga, begin, end, s, scale, coef);
  else if (unscale)
    rmsprop_run<D, CENTERED, MOMENTUM, false, true>(p, g, sq, buf, ga, begin, end, s, scale, coef);
  else
    rmsprop_run<D, CENTERED, MOMENTUM, false, false>(p, g, sq, buf, ga, begin, end, s, scale,
                                                      coef);
}

template <int D>
FUSEDOPT_CPU_TARGETS void rmsprop_chunks_typed(bool has_centered, bool has_momentum,
                                               const int64_t* tmeta, const int64_t* grads,
                                               const float* scal, const int64_t* chunks,
                                               int64_t begin, int64_t end, int64_t chunk_size,
                                               GradIn grad_in) {
  using T = typename Storage<D>::type;
  const bool unscale = grad_in.grad_scale != nullptr;
  const float scale = unscale ? *grad_in.grad_scale : 1.0f;
  const float coef = grad_in.clip ? grad_in.clip[CLIP_COEF] : 1.0f;
  for (int64_t c = begin; c < end; ++c) {
    int64_t t = chunks[2 * c], first = chunks[2 * c + 1];
    const int64_t* row = tmeta + t * TMETA_WIDTH;
    int64_t last = std::min(first + chunk_size, row[T_NUMEL]);
    const float* s = scal + t * SCAL_WIDTH;
    T* p = addr<D>(row[T_PARAM]);
    T* g = addr<D>(grads[t]);
    T* sq = addr<D>(row[T_S0]);
    T* buf = addr<D>(row[T_S1]);
    T* ga = addr<D>(row[T_S2]);
    bool centered = has_centered && s[rmsprop_scal::centered] != 0.0f;
    bool momentum = has_momentum && s[rmsprop_scal::momentum] > 0.0f;
    bool wd = s[rmsprop_scal::weight_decay] != 0.0f;
    if (centered && momentum)
      rmsprop_run_opts<D, true, true>(wd, unscale, p, g, sq, buf, ga, first, last, s, scale,
                                      coef);
    else if (centered)
      rmsprop_run_opts<D, true, false>(wd, unscale, p, g, sq, buf, ga, first, last, s, scale,
                                      coef);
    else if (momentum)
      rmsprop_run_opts<D, false, true>(wd, unscale, p, g, sq, buf, ga, first, last, s, scale,
                                      coef);
    else
      rmsprop_run_opts<D, false, false>(wd, unscale, p, g, sq, buf, ga, first, last, s, scale,
                                      coef);
  }
}

}  // namespace

void rmsprop_chunks(int dtype, bool has_centered, bool has_momentum, const int64_t* tmeta,
                    const int64_t* grads, const float* scal, const int64_t* chunks, int64_t begin,
                    int64_t end, int64_t chunk_size, GradIn grad_in) {
  switch (dtype) {
    case DTYPE_FLOAT32:
      return rmsprop_chunks_typed<DTYPE_FLOAT32>(has_centered, has_momentum, tmeta, grads, scal,
                                                 chunks, begin, end, chunk_size, grad_in);
    case DTYPE_BFLOAT16:
      return rmsprop_chunks_typed<DTYPE_BFLOAT16>(has_centered, has_momentum, tmeta, grads, scal,
                                                  chunks, begin, end, chunk_size, grad_in);
    default:
      return rmsprop_chunks_typed<DTYPE_FLOAT16>(has_centered, has_momentum, tmeta, grads, scal,
                                                 chunks, begin, end, chunk_size, grad_in);
  }
}

}  // namespace fusedopt::cpu
