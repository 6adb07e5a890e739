// The clipping pre-pass on the CPU: each chunk's sum of squares of the (unscaled) gradient.
// Torch-free.
#include <algorithm>

#include "kernels.h"
#include "multi_tensor.h"

namespace fusedopt::cpu {
namespace {

constexpr int kLanes = 16;  // independent partial sums: the loop vectorizes without reassociation

template <int D, bool UNSCALE>
inline float sumsq_run(const typename Storage<D>::type* __restrict__ g, int64_t begin,
                       int64_t end, float scale) {
  float acc[kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      float gi = ld<D>(g, i + k);
      if constexpr (UNSCALE) gi = gi / scale;
      acc[k] = fmaf(gi, gi, acc[k]);
    }
  }
  for (; i < end; ++i) {
    float gi = ld<D>(g, i);
    if constexpr (UNSCALE) gi = gi / scale;
    acc[0] = fmaf(gi, gi, acc[0]);
  }
  double total = 0.0;
  for (float a : acc) total += a;
  return static_cast<float>(total);
}

template <int D>
FUSEDOPT_CPU_TARGETS void sumsq_typed(const int64_t* tmeta, const int64_t* grads,
                                      const int64_t* chunks, int64_t begin, int64_t end,
                                      int64_t chunk_size, const float* grad_scale,
                                      float* partials) {
  for (int64_t c = begin; c < end; ++c) {
    int64_t t = chunks[2 * c], first = chunks[2 * c + 1];
    int64_t last = std::min(first + chunk_size, tmeta[t * TMETA_WIDTH + T_NUMEL]);
    const auto* g = addr<D>(grads[t]);
    partials[c] = grad_scale ? sumsq_run<D, true>(g, first, last, *grad_scale)
                             : sumsq_run<D, false>(g, first, last, 1.0f);
  }
}

}  // namespace

// (Here rather than in adam.cpp or rmsprop.cpp: the one list is multi_tensor.h's with_bucket.)
bool bucket_supported(int64_t bucket) {
  return with_bucket(bucket, [](auto) {});
}

void sumsq_chunks(int64_t bucket, const int64_t* tmeta, const int64_t* grads, const int64_t* chunks,
                  int64_t begin, int64_t end, int64_t chunk_size, const float* grad_scale,
                  float* partials) {
  switch ((bucket >> BUCKET_GRAD_SHIFT) & 3) {  // the grads' dtype
    case DTYPE_FLOAT32:
      return sumsq_typed<DTYPE_FLOAT32>(tmeta, grads, chunks, begin, end, chunk_size, grad_scale,
                                        partials);
    case DTYPE_BFLOAT16:
      return sumsq_typed<DTYPE_BFLOAT16>(tmeta, grads, chunks, begin, end, chunk_size,
                                         grad_scale, partials);
    default:
      return sumsq_typed<DTYPE_FLOAT16>(tmeta, grads, chunks, begin, end, chunk_size, grad_scale,
                                        partials);
  }
}

}  // namespace fusedopt::cpu
