// fusedopt's CPU kernels (torch-free). The binding (csrc/binding.cpp) runs a step as: with
// clipping, the sum-of-squares pass over every bucket and clip_from_sumsq; the prologue; then the
// update pass per bucket, over ranges of the chunk list, from several threads. The optimizers'
// math is in fusedopt/optim/*.h; csrc/cpu/update.cpp runs it.
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

// `optimizer`: layout.h's OPT_* code (fusedopt/optim/all.h); optimizer_known says whether the
// kernels have it (the others must not be passed).
bool optimizer_known(int64_t optimizer);

// Which state slots the kernels touch for a tensor of the group whose hyper row is `h` (bit k:
// slot T_S0 + k), in a call over `slots` (the op's state_mask: bit k, some tensor has slot k).
unsigned used_slots(int64_t optimizer, const double* h, unsigned slots);

// Each group's lr (Noam and schedule counters advanced), each tensor's step and scalars.
void prologue(int64_t optimizer, const int64_t* tmeta, int64_t n_tensors, const double* hyper,
              const int64_t* gptr, double* glr, int64_t n_groups, float* scal);

// The update of chunks [begin, end) of one bucket.
void update_chunks(int64_t optimizer, int64_t bucket, unsigned slots, const int64_t* tmeta,
                   const int64_t* grads, const float* scal, const int64_t* chunks, int64_t begin,
                   int64_t end, int64_t chunk_size, GradIn grad_in);

}  // namespace fusedopt::cpu
