// fusedopt's CPU kernels (torch-free). The binding (csrc/binding.cpp) runs a step as: with
// clipping, the sum-of-squares pass over every bucket and clip_from_sumsq; the prologue; then the
// update pass per bucket, over ranges of the chunk list, from several threads.
//
// `bucket` is a bucket's code (layout.h's BUCKET_*: param | grad << 2 | state << 4 | shadow << 6 |
// stochastic << 7); bucket_supported says whether the kernels have a variant for it (the others
// must not be passed).
#pragma once
#include <cstdint>

namespace fusedopt::cpu {

// What the update passes do to a gradient first: divide by GradScaler's scale (and write it back
// unscaled), then multiply by the clip coefficient. Null pointers: not used.
struct GradIn {
  const float* grad_scale;
  const float* clip;  // the per-device clip buffer (layout.h's CLIP_COEF, CLIP_NORM)
};

bool bucket_supported(int64_t bucket);

// Each chunk's sum of squares of the (unscaled) gradient, into partials[chunk].
void sumsq_chunks(int64_t bucket, const int64_t* tmeta, const int64_t* grads, const int64_t* chunks,
                  int64_t begin, int64_t end, int64_t chunk_size, const float* grad_scale,
                  float* partials);

void adam_prologue(const int64_t* tmeta, int64_t n_tensors, const double* hyper,
                   const int64_t* gptr, double* glr, int64_t n_groups, float* scal);
void adam_chunks(int64_t bucket, bool has_amsgrad, const int64_t* tmeta, const int64_t* grads,
                 const float* scal, const int64_t* chunks, int64_t begin, int64_t end,
                 int64_t chunk_size, GradIn grad_in);

void rmsprop_prologue(const int64_t* tmeta, int64_t n_tensors, const double* hyper,
                      const int64_t* gptr, double* glr, int64_t n_groups, float* scal);
void rmsprop_chunks(int64_t bucket, bool has_centered, bool has_momentum, const int64_t* tmeta,
                    const int64_t* grads, const float* scal, const int64_t* chunks, int64_t begin,
                    int64_t end, int64_t chunk_size, GradIn grad_in);

}  // namespace fusedopt::cpu
