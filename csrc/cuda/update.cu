// The step's entry points on CUDA (launchers.h), for every optimizer: the prologue's kernels
// (multi_tensor.cuh) are compiled here, each optimizer's main kernels in update_<name>.cu
// (update_kernels.cuh, through update_pass.h's UpdatePass).
#include "fusedopt/optim/all.h"
#include "launchers.h"
#include "multi_tensor.cuh"
#include "update_pass.h"

extern "C" int fusedopt_cuda_optimizer_known(int optimizer) {
  return fusedopt::with_optimizer(optimizer, [](auto) {}) ? 1 : 0;
}

extern "C" int fusedopt_cuda_prologue(int optimizer, const int64_t* tmeta, int64_t n_tensors,
                                      const double* hyper, const int64_t* gptr, double* glr,
                                      int64_t n_groups, float* scal, const float* found_inf,
                                      const float* partials, int64_t n_partials, float max_norm,
                                      bool clip, float* clip_buf, void* stream) {
  cudaError_t err = cudaErrorInvalidValue;
  fusedopt::with_optimizer(optimizer, [&](auto opt) {
    err = fusedopt::cuda::launch_prologue<decltype(opt)>(
        tmeta, n_tensors, hyper, gptr, glr, n_groups, scal, found_inf, partials, n_partials,
        max_norm, clip, clip_buf, static_cast<cudaStream_t>(stream));
  });
  return err;
}

extern "C" int fusedopt_cuda_main(int optimizer, const int64_t* tmeta, const int64_t* grads,
                                  const float* scal, const int64_t* chunks, int64_t n_chunks,
                                  int64_t chunk_size, int bucket, int state_mask,
                                  const float* grad_scale, const float* found_inf,
                                  const float* clip_buf, void* stream) {
  const fusedopt::cuda::MainArgs args{tmeta,      grads,      scal,      chunks,  n_chunks,
                                      chunk_size, grad_scale, found_inf, clip_buf};
  cudaError_t err = cudaErrorInvalidValue;
  fusedopt::with_optimizer(optimizer, [&](auto opt) {
    err = fusedopt::cuda::UpdatePass<decltype(opt)>::launch(args, bucket,
                                                            static_cast<unsigned>(state_mask),
                                                            static_cast<cudaStream_t>(stream));
  });
  return err;
}
