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
    int64_t step = advance_step(row);
    int64_t g = row[T_GROUP];
    rmsprop_scalars(hyper + g * HYPER_WIDTH, glr[g], step, scal + t * SCAL_WIDTH);
  }
}

namespace {

template <class K, bool CENTERED, bool MOMENTUM, bool WD, bool UNSCALE>
inline void rmsprop_run(typename K::PT* __restrict__ p, typename K::GT* __restrict__ shadow,
                        typename K::GT* __restrict__ g, typename K::ST* __restrict__ sq,
                        typename K::ST* __restrict__ buf, typename K::ST* __restrict__ ga,
                        int64_t begin, int64_t end, const float* s, float scale, float coef,
                        uint32_t seed) {
  const float lr = s[rmsprop_scal::lr], alpha = s[rmsprop_scal::alpha], w = s[rmsprop_scal::w];
  const float eps = s[rmsprop_scal::eps], wd = s[rmsprop_scal::weight_decay];
  const float momentum = s[rmsprop_scal::momentum], sign = s[rmsprop_scal::sign];
  const Lerp lerp_ga(w);
  constexpr int P = K::param, G = K::grad, S = K::state;
  for (int64_t i = begin; i < end; ++i) {
    float pi = ld<P>(p, i);
    float gi = grad_at<G, UNSCALE>(g, i, scale, coef) * sign;
    if constexpr (WD) gi = fmaf(pi, wd, gi);
    float sqi = fmaf(w * gi, gi, ld<S>(sq, i) * alpha);
    float var = sqi;
    if constexpr (CENTERED) {
      float gai = lerp_ga(ld<S>(ga, i), gi);
      st<S>(ga, i, gai);
      var = fmaf(-gai, gai, sqi);
    }
    float avg = std::sqrt(var) + eps;
    if constexpr (MOMENTUM) {
      float bi = ld<S>(buf, i) * momentum + gi / avg;
      st<S>(buf, i, bi);
      pi = fmaf(bi, -lr, pi);
    } else {
      pi = pi + (-lr * gi) / avg;
    }
    store_param<K>(p, shadow, i, pi, seed);
    st<S>(sq, i, sqi);
  }
}

template <class K, bool CENTERED, bool MOMENTUM>
inline void rmsprop_run_opts(bool wd, bool unscale, typename K::PT* p, typename K::GT* shadow,
                             typename K::GT* g, typename K::ST* sq, typename K::ST* buf,
                             typename K::ST* ga, int64_t begin, int64_t end, const float* s,
                             float scale, float coef, uint32_t seed) {
  if (wd && unscale)
    rmsprop_run<K, CENTERED, MOMENTUM, true, true>(p, shadow, g, sq, buf, ga, begin, end, s,
                                                   scale, coef, seed);
  else if (wd)
    rmsprop_run<K, CENTERED, MOMENTUM, true, false>(p, shadow, g, sq, buf, ga, begin, end, s,
                                                    scale, coef, seed);
  else if (unscale)
    rmsprop_run<K, CENTERED, MOMENTUM, false, true>(p, shadow, g, sq, buf, ga, begin, end, s,
                                                    scale, coef, seed);
  else
    rmsprop_run<K, CENTERED, MOMENTUM, false, false>(p, shadow, g, sq, buf, ga, begin, end, s,
                                                     scale, coef, seed);
}

template <class K>
FUSEDOPT_CPU_TARGETS void rmsprop_chunks_typed(bool has_centered, bool has_momentum,
                                               const int64_t* tmeta, const int64_t* grads,
                                               const float* scal, const int64_t* chunks,
                                               int64_t begin, int64_t end, int64_t chunk_size,
                                               GradIn grad_in) {
  const bool unscale = grad_in.grad_scale != nullptr;
  const float scale = unscale ? *grad_in.grad_scale : 1.0f;
  const float coef = grad_in.clip ? grad_in.clip[CLIP_COEF] : 1.0f;
  for (int64_t c = begin; c < end; ++c) {
    int64_t t = chunks[2 * c], first = chunks[2 * c + 1];
    const int64_t* row = tmeta + t * TMETA_WIDTH;
    int64_t last = std::min(first + chunk_size, row[T_NUMEL]);
    const float* s = scal + t * SCAL_WIDTH;
    auto* p = addr<K::param>(row[T_PARAM]);
    auto* shadow = addr<K::grad>(row[T_SHADOW]);
    auto* g = addr<K::grad>(grads[t]);
    auto* sq = addr<K::state>(row[T_S0]);
    auto* buf = addr<K::state>(row[T_S1]);
    auto* ga = addr<K::state>(row[T_S2]);
    const uint32_t seed = K::stochastic ? stochastic_seed(t, s[rmsprop_scal::seed]) : 0u;
    bool centered = has_centered && s[rmsprop_scal::centered] != 0.0f;
    bool momentum = has_momentum && s[rmsprop_scal::momentum] > 0.0f;
    bool wd = s[rmsprop_scal::weight_decay] != 0.0f;
    if (centered && momentum)
      rmsprop_run_opts<K, true, true>(wd, unscale, p, shadow, g, sq, buf, ga, first, last, s,
                                      scale, coef, seed);
    else if (centered)
      rmsprop_run_opts<K, true, false>(wd, unscale, p, shadow, g, sq, buf, ga, first, last, s,
                                       scale, coef, seed);
    else if (momentum)
      rmsprop_run_opts<K, false, true>(wd, unscale, p, shadow, g, sq, buf, ga, first, last, s,
                                       scale, coef, seed);
    else
      rmsprop_run_opts<K, false, false>(wd, unscale, p, shadow, g, sq, buf, ga, first, last, s,
                                        scale, coef, seed);
  }
}

}  // namespace

void rmsprop_chunks(int64_t bucket, bool has_centered, bool has_momentum, const int64_t* tmeta,
                    const int64_t* grads, const float* scal, const int64_t* chunks, int64_t begin,
                    int64_t end, int64_t chunk_size, GradIn grad_in) {
  with_bucket(bucket, [&](auto k) {
    rmsprop_chunks_typed<decltype(k)>(has_centered, has_momentum, tmeta, grads, scal, chunks,
                                      begin, end, chunk_size, grad_in);
  });
}

}  // namespace fusedopt::cpu
