// Host entry points of the fused CUDA kernels (csrc/cuda/*.cu), for the bindings. Torch- and
// CUDA-header-free: plain C++ types only.
//
// Every pointer is a device address; the tables are laid out as fusedopt/layout.h says: tmeta
// int64 [n_tensors, TMETA_WIDTH], grads int64 [n_tensors], hyper float64 [n_groups, HYPER_WIDTH],
// gptr int64 [n_groups, GPTR_WIDTH], glr float64 [n_groups] (written), scal float32
// [n_tensors, SCAL_WIDTH] (written by the prologue, read by the main pass), chunks int64
// [n_chunks, 2] of (tensor index, first element), each chunk_size elements long (or up to the
// tensor's end).
// `bucket` is a bucket code (layout.h's BUCKET_*: param | grad << 2 | state << 4 | shadow << 6 |
// stochastic << 7 | error << 8, dtype codes DTYPE_*) that holds for every tensor the chunks touch:
// the parameter (tmeta's T_PARAM, the fp32 master when there is one) is read and written in
// `param`, the grads in `grad`, the three state slots in `state`; with `shadow` the new parameter
// is also stored, rounded to nearest even, into tmeta's T_SHADOW in `grad`; with `stochastic` the
// (bf16) parameter is stored with stochastic rounding (kernels/multi_tensor.py's stochastic_bf16,
// seeded by the tensor's row and the step the prologue writes to scal); with `error` (1 int8, 2
// int16) the bf16 parameter and the error term at tmeta's T_ERR stand for a compressed master
// (fusedopt/master.h), read as b + e * s(b) and stored as its bf16 rounding and the new error
// term. Kernels exist for the buckets fusedopt_cuda_bucket_supported accepts. `stream` is a
// cudaStream_t.
//
// GradScaler and clipping (each pointer null when absent): grad_scale and found_inf are
// torch.amp.GradScaler's float32 scalars. A step with *found_inf != 0 changes nothing (every
// kernel reads found_inf on the device: no host sync). With grad_scale the main pass divides each
// gradient element by *grad_scale and writes the unscaled gradient back. clip_buf is float32
// [2] (layout.h's CLIP_COEF, CLIP_NORM); partials float32 [partials_numel(n_chunks)] (layout.h):
// one per chunk of the whole chunk list, then the reduction's first-stage float64 sums.
//
// Each step runs, on one stream: with clipping, the sum-of-squares pass once per bucket
// (partials offset to the bucket's first chunk) and the clip stage once; the prologue once (which,
// with clipping, adds the stage's sums and writes clip_buf; one block, then a grid over the
// tensors when there are more than 256); then the main pass once per bucket (which, with
// clipping, multiplies the gradients by clip_buf[CLIP_COEF]).
//
// Each returns the cudaError_t of cudaGetLastError() after its launch (0: launched), or
// cudaErrorInvalidValue (1) for an unknown optimizer, a bucket without kernels or an n_chunks
// outside [0, 2^31).
#pragma once

#include <cstdint>

extern "C" {

// 1 when the main kernels are compiled for this bucket code, else 0 (no launch, no CUDA call).
int fusedopt_cuda_bucket_supported(int bucket);

// Each chunk's float32 sum of squares of the (unscaled) gradient, into partials[chunk].
int fusedopt_cuda_sumsq(const int64_t* tmeta, const int64_t* grads, const int64_t* chunks,
                        int64_t n_chunks, int64_t chunk_size, int bucket, const float* grad_scale,
                        const float* found_inf, float* partials, void* stream);

// The clipping reduction's first stage: partials[0, n_partials) added CLIP_PER_BLOCK at a time
// in float64, in a fixed order, into partials' tail (layout.h's clip_stage_offset).
int fusedopt_cuda_clip_stage(float* partials, int64_t n_partials, const float* found_inf,
                             void* stream);

// 1 when the kernels have the optimizer `optimizer` (layout.h's OPT_*), else 0.
int fusedopt_cuda_optimizer_known(int optimizer);

// The step's prologue for `optimizer`: each group's lr (Noam and schedule counters advanced),
// with clipping the coefficient, each tensor's step and scalars.
int fusedopt_cuda_prologue(int optimizer, const int64_t* tmeta, int64_t n_tensors,
                           const double* hyper, const int64_t* gptr, double* glr,
                           int64_t n_groups, float* scal, const float* found_inf,
                           const float* partials, int64_t n_partials, float max_norm, bool clip,
                           float* clip_buf, void* stream);

// The update of `optimizer` over one bucket's chunks. state_mask: the state slots some tensor of
// the step uses (bit k: slot k); an option that uses a slot outside it is compiled out.
int fusedopt_cuda_main(int optimizer, const int64_t* tmeta, const int64_t* grads,
                       const float* scal, const int64_t* chunks, int64_t n_chunks,
                       int64_t chunk_size, int bucket, int state_mask, const float* grad_scale,
                       const float* found_inf, const float* clip_buf, void* stream);

}  // extern "C"
