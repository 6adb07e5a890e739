// fusedopt's CPU kernels (torch-free). The binding (csrc/binding.cpp) calls the prologue once per
// step, then a main pass per dtype bucket over ranges of the chunk list, from several threads.
#pragma once
#include <cstdint>

namespace fusedopt::cpu {

void adam_prologue(const int64_t* tmeta, int64_t n_tensors, const double* hyper,
                   const int64_t* gptr, double* glr, int64_t n_groups, float* scal);
void adam_chunks(int dtype, bool has_amsgrad, const int64_t* tmeta, const int64_t* grads,
                 const float* scal, const int64_t* chunks, int64_t begin, int64_t end,
                 int64_t chunk_size);

void rmsprop_prologue(const int64_t* tmeta, int64_t n_tensors, const double* hyper,
                      const int64_t* gptr, double* glr, int64_t n_groups, float* scal);
void rmsprop_chunks(int dtype, bool has_centered, bool has_momentum, const int64_t* tmeta,
                    const int64_t* grads, const float* scal, const int64_t* chunks, int64_t begin,
                    int64_t end, int64_t chunk_size);

}  // namespace fusedopt::cpu
