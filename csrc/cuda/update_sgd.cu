// SGD's main kernels (update_kernels.cuh), in a translation unit of their own.
#include "update_kernels.cuh"

template struct fusedopt::cuda::UpdatePass<fusedopt::Sgd>;
