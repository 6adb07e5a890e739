// Adam / AdamW on the CPU: the same prologue and per-element math as kernels/adam.py, in the
// same order of operations (see that file for the formulas). Torch-free.
#include <algorithm>

#include "kernels.h"
#include "multi_tensor.h"

namespace fusedopt::cpu {

void adam_prologue(const int64_t* tmeta, int64_t n_tensors, const double* hyper,
                   const int64_t* gptr, double* glr, int64_t n_groups, float* scal) {
  resolve_group_lrs(hyper, gptr, glr, n_groups);
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t* row = tmeta + t * TMETA_WIDTH;
    int64_t step = advance_step(row);
    int64_t g = row[T_GROUP];
    adam_scalars(hyper + g * HYPER_WIDTH, glr[g], step, scal + t * SCAL_WIDTH);
  }
}

namespace {

// One contiguous run of one tensor. The bucket K and the flags are template parameters so that
// each variant's loop has no branches and vectorizes.
template <class K, bool AMSGRAD, bool L2, bool UNSCALE>
inline void adam_run(typename K::PT* __restrict__ p, typename K::GT* __restrict__ shadow,
                     typename K::GT* __restrict__ g, typename K::ST* __restrict__ m,
                     typename K::ST* __restrict__ v, typename K::ST* __restrict__ vmax,
                     int64_t begin, int64_t end, const float* s, float scale, float coef,
                     uint32_t seed) {
  const float step_size = s[adam_scal::step_size], bc2_sqrt = s[adam_scal::bc2_sqrt];
  const float p_mul = s[adam_scal::p_mul], g_wd = s[adam_scal::g_wd], w1 = s[adam_scal::w1];
  const float beta2 = s[adam_scal::beta2], w2 = s[adam_scal::w2], eps = s[adam_scal::eps];
  const float sign = s[adam_scal::sign];
  const Lerp lerp_m(w1);
  constexpr int P = K::param, G = K::grad, S = K::state;
  for (int64_t i = begin; i < end; ++i) {
    float pi = ld<P>(p, i) * p_mul;
    float gi = grad_at<G, UNSCALE>(g, i, scale, coef) * sign;
    if constexpr (L2) gi = fmaf(pi, g_wd, gi);
    float mi = lerp_m(ld<S>(m, i), gi);
    float vi = fmaf(w2 * gi, gi, ld<S>(v, i) * beta2);
    float used = vi;
    if constexpr (AMSGRAD) {
      float mx = ld<S>(vmax, i);
      mx = (mx != mx || mx > vi) ? mx : vi;  // torch.maximum: NaN propagates
      st<S>(vmax, i, mx);
      used = mx;
    }
    float denom = std::sqrt(used) / bc2_sqrt + eps;
    store_param<K>(p, shadow, i, pi + (-step_size * mi) / denom, seed);
    st<S>(m, i, mi);
    st<S>(v, i, vi);
  }
}

template <class K, bool AMSGRAD, bool L2>
inline void adam_run_scaled(bool unscale, typename K::PT* p, typename K::GT* shadow,
                            typename K::GT* g, typename K::ST* m, typename K::ST* v,
                            typename K::ST* vmax, int64_t begin, int64_t end, const float* s,
                            float scale, float coef, uint32_t seed) {
  if (unscale)
    adam_run<K, AMSGRAD, L2, true>(p, shadow, g, m, v, vmax, begin, end, s, scale, coef, seed);
  else
    adam_run<K, AMSGRAD, L2, false>(p, shadow, g, m, v, vmax, begin, end, s, scale, coef, seed);
}

template <class K>
FUSEDOPT_CPU_TARGETS void adam_chunks_typed(bool has_amsgrad, const int64_t* tmeta,
                                            const int64_t* grads, const float* scal,
                                            const int64_t* chunks, int64_t begin, int64_t end,
                                            int64_t chunk_size, GradIn grad_in) {
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
    auto* m = addr<K::state>(row[T_S0]);
    auto* v = addr<K::state>(row[T_S1]);
    auto* vmax = addr<K::state>(row[T_S2]);
    const uint32_t seed = K::stochastic ? stochastic_seed(t, s[adam_scal::seed]) : 0u;
    bool ams = has_amsgrad && s[adam_scal::amsgrad] != 0.0f;
    bool l2 = s[adam_scal::g_wd] != 0.0f;
    if (ams && l2)
      adam_run_scaled<K, true, true>(unscale, p, shadow, g, m, v, vmax, first, last, s, scale,
                                     coef, seed);
    else if (ams)
      adam_run_scaled<K, true, false>(unscale, p, shadow, g, m, v, vmax, first, last, s, scale,
                                      coef, seed);
    else if (l2)
      adam_run_scaled<K, false, true>(unscale, p, shadow, g, m, v, vmax, first, last, s, scale,
                                      coef, seed);
    else
      adam_run_scaled<K, false, false>(unscale, p, shadow, g, m, v, vmax, first, last, s, scale,
                                       coef, seed);
  }
}

}  // namespace

void adam_chunks(int64_t bucket, bool has_amsgrad, const int64_t* tmeta, const int64_t* grads,
                 const float* scal, const int64_t* chunks, int64_t begin, int64_t end,
                 int64_t chunk_size, GradIn grad_in) {
  with_bucket(bucket, [&](auto k) {
    adam_chunks_typed<decltype(k)>(has_amsgrad, tmeta, grads, scal, chunks, begin, end,
                                   chunk_size, grad_in);
  });
}

}  // namespace fusedopt::cpu
