// The thin CUDA binding: registers the CUDA kernels (csrc/cuda/*.cu) for the ops declared in
// csrc/binding.cpp. Includes no CUDA header (the stream arrives as an integer from Python), so it
// compiles against any torch, and the CI compile check covers it on machines without CUDA.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "launchers.h"

namespace {

using at::Tensor;
using at::TensorList;

void check(int err, const char* what) {
  TORCH_CHECK(err == 0, "fusedopt: launching the CUDA ", what, " kernel failed (cudaError ", err,
              ")");
}

void check_tables(const Tensor& tmeta, const Tensor& grads_meta, const Tensor& chunks,
                  const Tensor& hyper, const Tensor& gptr, const Tensor& glr, const Tensor& scal,
                  at::IntArrayRef bucket_dtypes, at::IntArrayRef bucket_offsets) {
  const auto device = tmeta.device();
  for (const Tensor* t : {&tmeta, &grads_meta, &chunks, &hyper, &gptr, &glr, &scal}) {
    TORCH_CHECK(t->device() == device && t->is_contiguous(),
                "fusedopt: the CUDA kernels need contiguous metadata tables on one device");
  }
  TORCH_CHECK(device.is_cuda(), "fusedopt: CUDA kernels called with tables on ", device);
  TORCH_CHECK(tmeta.scalar_type() == at::kLong && grads_meta.scalar_type() == at::kLong &&
                  chunks.scalar_type() == at::kLong && gptr.scalar_type() == at::kLong &&
                  hyper.scalar_type() == at::kDouble && glr.scalar_type() == at::kDouble &&
                  scal.scalar_type() == at::kFloat,
              "fusedopt: metadata tables have the wrong dtypes");
  TORCH_CHECK(bucket_offsets.size() == bucket_dtypes.size() + 1,
              "fusedopt: bucket_offsets must have one entry more than bucket_dtypes");
}

void adam_step_cuda(TensorList, TensorList, TensorList, TensorList, TensorList,
                    const Tensor& tmeta, const Tensor& grads_meta, const Tensor& chunks,
                    const Tensor& hyper, const Tensor& gptr, const Tensor& glr, const Tensor& scal,
                    at::IntArrayRef bucket_dtypes, at::IntArrayRef bucket_offsets,
                    int64_t chunk_size, bool has_amsgrad, int64_t stream) {
  check_tables(tmeta, grads_meta, chunks, hyper, gptr, glr, scal, bucket_dtypes, bucket_offsets);
  void* s = reinterpret_cast<void*>(stream);
  check(fusedopt_cuda_adam_prologue(tmeta.data_ptr<int64_t>(), tmeta.size(0),
                                    hyper.data_ptr<double>(), gptr.data_ptr<int64_t>(),
                                    glr.data_ptr<double>(), hyper.size(0), scal.data_ptr<float>(),
                                    s),
        "adam prologue");
  for (size_t b = 0; b < bucket_dtypes.size(); ++b) {
    const int64_t* first = chunks.data_ptr<int64_t>() + 2 * bucket_offsets[b];
    check(fusedopt_cuda_adam_main(tmeta.data_ptr<int64_t>(), grads_meta.data_ptr<int64_t>(),
                                  scal.data_ptr<float>(), first,
                                  bucket_offsets[b + 1] - bucket_offsets[b], chunk_size,
                                  static_cast<int>(bucket_dtypes[b]), has_amsgrad, s),
          "adam");
  }
}

void rmsprop_step_cuda(TensorList, TensorList, TensorList, TensorList, TensorList,
                       const Tensor& tmeta, const Tensor& grads_meta, const Tensor& chunks,
                       const Tensor& hyper, const Tensor& gptr, const Tensor& glr,
                       const Tensor& scal, at::IntArrayRef bucket_dtypes,
                       at::IntArrayRef bucket_offsets, int64_t chunk_size, bool has_centered,
                       bool has_momentum, int64_t stream) {
  check_tables(tmeta, grads_meta, chunks, hyper, gptr, glr, scal, bucket_dtypes, bucket_offsets);
  void* s = reinterpret_cast<void*>(stream);
  check(fusedopt_cuda_rmsprop_prologue(tmeta.data_ptr<int64_t>(), tmeta.size(0),
                                       hyper.data_ptr<double>(), gptr.data_ptr<int64_t>(),
                                       glr.data_ptr<double>(), hyper.size(0),
                                       scal.data_ptr<float>(), s),
        "rmsprop prologue");
  for (size_t b = 0; b < bucket_dtypes.size(); ++b) {
    const int64_t* first = chunks.data_ptr<int64_t>() + 2 * bucket_offsets[b];
    check(fusedopt_cuda_rmsprop_main(tmeta.data_ptr<int64_t>(), grads_meta.data_ptr<int64_t>(),
                                     scal.data_ptr<float>(), first,
                                     bucket_offsets[b + 1] - bucket_offsets[b], chunk_size,
                                     static_cast<int>(bucket_dtypes[b]), has_centered,
                                     has_momentum, s),
          "rmsprop");
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) {
  m.impl("adam_step", &adam_step_cuda);
  m.impl("rmsprop_step", &rmsprop_step_cuda);
}
