// Host entry points of the fused CUDA kernels (csrc/cuda/*.cu), for the bindings. Torch- and
// CUDA-header-free: plain C++ types only.
//
// Every pointer is a device address; the tables are laid out as fusedopt/layout.h says: tmeta
// int64 [n_tensors, TMETA_WIDTH], grads int64 [n_tensors], hyper float64 [n_groups, HYPER_WIDTH],
// gptr int64 [n_groups, GPTR_WIDTH], glr float64 [n_groups] (written), scal float32
// [n_tensors, SCAL_WIDTH] (written by the prologue, read by the main pass), chunks int64
// [n_chunks, 2] of (tensor index, first element), each chunk_size elements long (or up to the
// tensor's end).
// `dtype` is a DTYPE_* code, the dtype of every tensor the chunks touch; `stream` a cudaStream_t.
// Each step runs the prologue once, then the main pass once per dtype bucket, on the same stream.
//
// Each returns the cudaError_t of cudaGetLastError() after its launch (0: launched), or
// cudaErrorInvalidValue for an unknown dtype or an n_chunks outside [0, 2^31).
#pragma once

#include <cstdint>

extern "C" {

int fusedopt_cuda_adam_prologue(const int64_t* tmeta, int64_t n_tensors, const double* hyper,
                                const int64_t* gptr, double* glr, int64_t n_groups, float* scal,
                                void* stream);

int fusedopt_cuda_adam_main(const int64_t* tmeta, const int64_t* grads, const float* scal,
                            const int64_t* chunks, int64_t n_chunks, int64_t chunk_size,
                            int dtype, bool has_amsgrad, void* stream);

int fusedopt_cuda_rmsprop_prologue(const int64_t* tmeta, int64_t n_tensors, const double* hyper,
                                   const int64_t* gptr, double* glr, int64_t n_groups, float* scal,
                                   void* stream);

int fusedopt_cuda_rmsprop_main(const int64_t* tmeta, const int64_t* grads, const float* scal,
                               const int64_t* chunks, int64_t n_chunks, int64_t chunk_size,
                               int dtype, bool has_centered, bool has_momentum, void* stream);

}  // extern "C"
