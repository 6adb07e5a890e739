// How update.cu reaches an optimizer's main kernels. Each optimizer's are compiled in a
// translation unit of their own (update_<name>.cu instantiates UpdatePass<Opt> from
// update_kernels.cuh), so that a build compiles the optimizers in parallel: as one file, the
// kernels were the longest compile of the build (issue 22).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fusedopt {
namespace cuda {

// The launch arguments after the grid: the tables, GradScaler's tensors, the clip buffer.
struct MainArgs {
  const int64_t* tmeta;
  const int64_t* grads;
  const float* scal;
  const int64_t* chunks;
  int64_t n_chunks, chunk_size;
  const float* grad_scale;
  const float* found_inf;
  const float* clip;
};

template <class Opt>
struct UpdatePass {
  // The main kernel of Opt for this bucket code and these state slots (launchers.h's
  // fusedopt_cuda_main).
  static cudaError_t launch(const MainArgs& a, int bucket, unsigned slots, cudaStream_t stream);
};

}  // namespace cuda
}  // namespace fusedopt
