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

// One contiguous run of one tensor. The flags are template parameters so that each variant's
// loop has no branches and vectorizes.
template <int D, bool AMSGRAD, bool L2, bool UNSCALE>
inline void adam_run(typename Storage<D>::type* __restrict__ p,
                     typename Storage<D>::type* __restrict__ g,
                     typename Storage<D>::type* __restrict__ m,
                     typename Storage<D>::type* __restrict__ v,
                     typename Storage<D>::type* __restrict__ vmax, int64_t begin, int64_t end,
                     const float* s, float scale, float coef) {
  const float step_size = s[adam_scal::step_size], bc2_sqrt = s[adam_scal::bc2_sqrt];
  const float p_mul = s[adam_scal::p_mul], g_wd = s[adam_scal::g_wd], w1 = s[adam_scal::w1];
  const float beta2 = s[adam_scal::beta2], w2 = s[adam_scal::w2], eps = s[adam_scal::eps];
  const float sign = s[adam_scal::sign];
  for (int64_t i = begin; i < end; ++i) {
    float pi = ld<D>(p, i) * p_mul;
    float gi = grad_at<D, UNSCALE>(g, i, scale, coef) * sign;
    if constexpr (L2) gi = fmaf(pi, g_wd, gi);
    float mi = lerp(ld<D>(m, i), gi, w1);
    float vi = fmaf(w2 * gi, gi, ld<D>(v, i) * beta2);
    float used = vi;
    if constexpr (AMSGRAD) {
      float mx = ld<D>(vmax, i);
      mx = (mx != mx || mx > vi) ? mx : vi;  // torch.maximum: NaN propagates
      st<D>(vmax, i, mx);
      used = mx;
    }
    float denom = std::sqrt(used) / bc2_sqrt + eps;
    st<D>(p, i, pi + (-step_size * mi) / denom);
    st<D>(m, i, mi);
    st<D>(v, i, vi);
  }
}

template <int D, bool AMSGRAD, bool L2>
inline void adam_run_scaled(bool unscale, typename Storage<D>::type* p,
                            typename Storage<D>::type* g, typename Storage<D>::type* m,
                            typename Storage<D>::type* v, typename Storage<D>::type* vmax,
                            int64_t begin, int64_t end, const float* s, float scale, float coef) {
  if (unscale) adam_run<D, AMSGRAD, L2, true>(p, g, m, v, vmax, begin, end, s, scale, coef);
  else adam_run<D, AMSGRAD, L2, false>(p, g, m, v, vmax, begin, end, s, scale, coef);
}

template <int D>
FUSEDOPT_CPU_TARGETS void adam_chunks_typed(bool has_amsgrad, const int64_t* tmeta,
                                            const int64_t* grads, const float* scal,
                                            const int64_t* chunks, int64_t begin, int64_t end,
                                            int64_t chunk_size, GradIn grad_in) {
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
    T* m = addr<D>(row[T_S0]);
    T* v = addr<D>(row[T_S1]);
    T* vmax = addr<D>(row[T_S2]);
    bool ams = has_amsgrad && s[adam_scal::amsgrad] != 0.0f;
    bool l2 = s[adam_scal::g_wd] != 0.0f;
    if (ams && l2)
      adam_run_scaled<D, true, true>(unscale, p, g, m, v, vmax, first, last, s, scale, coef);
    else if (ams)
      adam_run_scaled<D, true, false>(unscale, p, g, m, v, vmax, first, last, s, scale, coef);
    else if (l2)
      adam_run_scaled<D, false, true>(unscale, p, g, m, v, vmax, first, last, s, scale, coef);
    else
      adam_run_scaled<D, false, false>(unscale, p, g, m, v, vmax, first, last, s, scale, coef);
  }
}

}  // namespace

void adam_chunks(int dtype, bool has_amsgrad, const int64_t* tmeta, const int64_t* grads,
                 const float* scal, const int64_t* chunks, int64_t begin, int64_t end,
                 int64_t chunk_size, GradIn grad_in) {
  switch (dtype) {
    case DTYPE_FLOAT32:
      return adam_chunks_typed<DTYPE_FLOAT32>(has_amsgrad, tmeta, grads, scal, chunks, begin, end,
                                              chunk_size, grad_in);
    case DTYPE_BFLOAT16:
      return adam_chunks_typed<DTYPE_BFLOAT16>(has_amsgrad, tmeta, grads, scal, chunks, begin,
                                               end, chunk_size, grad_in);
    default:
      return adam_chunks_typed<DTYPE_FLOAT16>(has_amsgrad, tmeta, grads, scal, chunks, begin, end,
                                              chunk_size, grad_in);
  }
}

}  // namespace fusedopt::cpu
