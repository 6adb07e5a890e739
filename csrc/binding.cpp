// The thin binding: declares fusedopt's ops (TORCH_LIBRARY) and registers their CPU kernels.
// The CUDA kernels register for the same ops from csrc/cuda/binding.cpp (a separate library,
// built only with CUDA). The tensor lists are in the schema so that torch sees what each op
// mutates; the kernels themselves read the metadata tables built by fusedopt/_tables.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "cpu/kernels.h"

namespace {

using at::Tensor;
using at::TensorList;

constexpr int64_t kGrainChunks = 4;  // below this many chunks a bucket runs on one thread

void check_tables(const Tensor& tmeta, const Tensor& grads_meta, const Tensor& chunks,
                  const Tensor& hyper, const Tensor& gptr, const Tensor& glr, const Tensor& scal,
                  at::IntArrayRef bucket_dtypes, at::IntArrayRef bucket_offsets) {
  for (const Tensor* t : {&tmeta, &grads_meta, &chunks, &hyper, &gptr, &glr, &scal}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(),
                "fusedopt: CPU kernels need contiguous CPU metadata tables");
  }
  TORCH_CHECK(tmeta.scalar_type() == at::kLong && grads_meta.scalar_type() == at::kLong &&
                  chunks.scalar_type() == at::kLong && gptr.scalar_type() == at::kLong &&
                  hyper.scalar_type() == at::kDouble && glr.scalar_type() == at::kDouble &&
                  scal.scalar_type() == at::kFloat,
              "fusedopt: metadata tables have the wrong dtypes");
  TORCH_CHECK(bucket_offsets.size() == bucket_dtypes.size() + 1,
              "fusedopt: bucket_offsets must have one entry more than bucket_dtypes");
}

template <typename Main>
void run_buckets(at::IntArrayRef bucket_dtypes, at::IntArrayRef bucket_offsets, Main main) {
  for (size_t b = 0; b < bucket_dtypes.size(); ++b) {
    int dtype = static_cast<int>(bucket_dtypes[b]);
    at::parallel_for(bucket_offsets[b], bucket_offsets[b + 1], kGrainChunks,
                     [&](int64_t begin, int64_t end) { main(dtype, begin, end); });
  }
}

void adam_step_cpu(TensorList, TensorList, TensorList, TensorList, TensorList, const Tensor& tmeta,
                   const Tensor& grads_meta, const Tensor& chunks, const Tensor& hyper,
                   const Tensor& gptr, const Tensor& glr, const Tensor& scal,
                   at::IntArrayRef bucket_dtypes, at::IntArrayRef bucket_offsets,
                   int64_t chunk_size, bool has_amsgrad, int64_t) {
  check_tables(tmeta, grads_meta, chunks, hyper, gptr, glr, scal, bucket_dtypes, bucket_offsets);
  fusedopt::cpu::adam_prologue(tmeta.data_ptr<int64_t>(), tmeta.size(0), hyper.data_ptr<double>(),
                               gptr.data_ptr<int64_t>(), glr.data_ptr<double>(), hyper.size(0),
                               scal.data_ptr<float>());
  run_buckets(bucket_dtypes, bucket_offsets, [&](int dtype, int64_t begin, int64_t end) {
    fusedopt::cpu::adam_chunks(dtype, has_amsgrad, tmeta.data_ptr<int64_t>(),
                               grads_meta.data_ptr<int64_t>(), scal.data_ptr<float>(),
                               chunks.data_ptr<int64_t>(), begin, end, chunk_size);
  });
}

void rmsprop_step_cpu(TensorList, TensorList, TensorList, TensorList, TensorList,
                      const Tensor& tmeta, const Tensor& grads_meta, const Tensor& chunks,
                      const Tensor& hyper, const Tensor& gptr, const Tensor& glr,
                      const Tensor& scal, at::IntArrayRef bucket_dtypes,
                      at::IntArrayRef bucket_offsets, int64_t chunk_size, bool has_centered,
                      bool has_momentum, int64_t) {
  check_tables(tmeta, grads_meta, chunks, hyper, gptr, glr, scal, bucket_dtypes, bucket_offsets);
  fusedopt::cpu::rmsprop_prologue(tmeta.data_ptr<int64_t>(), tmeta.size(0),
                                  hyper.data_ptr<double>(), gptr.data_ptr<int64_t>(),
                                  glr.data_ptr<double>(), hyper.size(0), scal.data_ptr<float>());
  run_buckets(bucket_dtypes, bucket_offsets, [&](int dtype, int64_t begin, int64_t end) {
    fusedopt::cpu::rmsprop_chunks(dtype, has_centered, has_momentum, tmeta.data_ptr<int64_t>(),
                                  grads_meta.data_ptr<int64_t>(), scal.data_ptr<float>(),
                                  chunks.data_ptr<int64_t>(), begin, end, chunk_size);
  });
}

}  // namespace

// One schema per optimizer. `stream` is the CUDA stream (as an integer) for the CUDA kernels;
// the CPU kernels ignore it.
TORCH_LIBRARY(fusedopt, m) {
  m.def(
      "adam_step(Tensor(a!)[] params, Tensor(b!)[] states, Tensor(c!)[] steps, "
      "Tensor(d!)[] counters, Tensor[] grads, Tensor tmeta, Tensor grads_meta, Tensor chunks, "
      "Tensor hyper, Tensor gptr, Tensor(e!) glr, Tensor(f!) scal, int[] bucket_dtypes, "
      "int[] bucket_offsets, int chunk_size, bool has_amsgrad, int stream=0) -> ()");
  m.def(
      "rmsprop_step(Tensor(a!)[] params, Tensor(b!)[] states, Tensor(c!)[] steps, "
      "Tensor(d!)[] counters, Tensor[] grads, Tensor tmeta, Tensor grads_meta, Tensor chunks, "
      "Tensor hyper, Tensor gptr, Tensor(e!) glr, Tensor(f!) scal, int[] bucket_dtypes, "
      "int[] bucket_offsets, int chunk_size, bool has_centered, bool has_momentum, "
      "int stream=0) -> ()");
}

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("adam_step", &adam_step_cpu);
  m.impl("rmsprop_step", &rmsprop_step_cpu);
}
