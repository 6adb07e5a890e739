// The thin binding: declares fusedopt's ops (TORCH_LIBRARY) and registers their CPU kernels.
// The CUDA kernels register for the same ops from csrc/cuda/binding.cpp (a separate library,
// built only with CUDA). The tensor lists are in the schema so that torch sees what each op
// mutates; the kernels themselves read the metadata tables built by fusedopt/_tables.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "cpu/kernels.h"
#include "fusedopt/layout.h"
#include "fusedopt/step_math.h"

namespace {

using at::Tensor;
using at::TensorList;

constexpr int64_t kGrainChunks = 4;  // below this many chunks a bucket runs on one thread

// A bucket code (layout.h's BUCKET_*) in words, for error messages.
std::string describe_bucket(int64_t code) {
  auto dtype = [](int64_t c) -> std::string {
    switch (c) {
      case fusedopt::DTYPE_FLOAT32:
        return "float32";
      case fusedopt::DTYPE_BFLOAT16:
        return "bfloat16";
      case fusedopt::DTYPE_FLOAT16:
        return "float16";
      default:
        return "unknown dtype code " + std::to_string(c);
    }
  };
  std::string out = "param " + dtype(code & 3) + ", grad " +
                    dtype((code >> fusedopt::BUCKET_GRAD_SHIFT) & 3) + ", state " +
                    dtype((code >> fusedopt::BUCKET_STATE_SHIFT) & 3);
  if ((code >> fusedopt::BUCKET_SHADOW_BIT) & 1) out += ", shadow";
  if ((code >> fusedopt::BUCKET_STOCHASTIC_BIT) & 1) out += ", stochastic rounding";
  if (code >> (fusedopt::BUCKET_STOCHASTIC_BIT + 1)) out += ", unknown bits";
  return out + " (code " + std::to_string(code) + ")";
}

// The metadata tables of one step, checked once.
struct Tables {
  const Tensor &tmeta, &grads_meta, &chunks, &hyper, &gptr, &glr, &scal, &partials, &clip;
  at::IntArrayRef bucket_dtypes, bucket_offsets;
  int64_t chunk_size;

  void check() const {
    for (const Tensor* t : {&tmeta, &grads_meta, &chunks, &hyper, &gptr, &glr, &scal, &partials,
                            &clip}) {
      TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(),
                  "fusedopt: CPU kernels need contiguous CPU metadata tables");
    }
    TORCH_CHECK(tmeta.scalar_type() == at::kLong && grads_meta.scalar_type() == at::kLong &&
                    chunks.scalar_type() == at::kLong && gptr.scalar_type() == at::kLong &&
                    hyper.scalar_type() == at::kDouble && glr.scalar_type() == at::kDouble &&
                    scal.scalar_type() == at::kFloat && partials.scalar_type() == at::kFloat &&
                    clip.scalar_type() == at::kFloat,
                "fusedopt: metadata tables have the wrong dtypes");
    TORCH_CHECK(bucket_offsets.size() == bucket_dtypes.size() + 1,
                "fusedopt: bucket_offsets must have one entry more than bucket_dtypes");
    for (int64_t code : bucket_dtypes) {
      TORCH_CHECK(fusedopt::cpu::bucket_supported(code),
                  "fusedopt: the CPU kernels have no variant for the bucket ",
                  describe_bucket(code),
                  ". (param, grad, state) combinations they have: each of float32, bfloat16, "
                  "float16 alone; (float32, float32, bfloat16 or float16); with a shadow (an fp32 "
                  "master): (float32, bfloat16, float32), (float32, float16, float32), "
                  "(float32, bfloat16, bfloat16); (bfloat16, bfloat16, float32); with stochastic "
                  "rounding: (bfloat16, bfloat16, bfloat16 or float32)");
    }
  }
};

const float* scalar_ptr(const std::optional<Tensor>& t, const char* what) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->numel() == 1,
              "fusedopt: ", what, " must be a float32 scalar on the parameters' device");
  return t->data_ptr<float>();
}

// Runs `main(bucket, begin, end)` over each bucket's chunks, on torch's intra-op threads (bucket:
// the bucket's code).
template <typename Main>
void for_each_bucket(const Tables& tb, Main main) {
  for (size_t b = 0; b < tb.bucket_dtypes.size(); ++b) {
    const int64_t bucket = tb.bucket_dtypes[b];
    at::parallel_for(tb.bucket_offsets[b], tb.bucket_offsets[b + 1], kGrainChunks,
                     [&](int64_t begin, int64_t end) { main(bucket, begin, end); });
  }
}

// One step: skipped whole when GradScaler found an inf (found_inf lives in host memory here);
// with clipping, the sum-of-squares pass and the clip coefficient; the prologue; the updates.
template <typename Prologue, typename Update>
void cpu_step(const Tables& tb, const std::optional<Tensor>& grad_scale,
              const std::optional<Tensor>& found_inf, std::optional<double> max_norm,
              Prologue prologue, Update update) {
  tb.check();
  const float* scale = scalar_ptr(grad_scale, "grad_scale");
  const float* inf = scalar_ptr(found_inf, "found_inf");
  if (inf != nullptr && *inf != 0.0f) return;
  const int64_t* tmeta = tb.tmeta.data_ptr<int64_t>();
  const int64_t* grads = tb.grads_meta.data_ptr<int64_t>();
  const int64_t* chunks = tb.chunks.data_ptr<int64_t>();
  fusedopt::cpu::GradIn grad_in{scale, nullptr};
  if (max_norm.has_value()) {
    float* partials = tb.partials.data_ptr<float>();
    for_each_bucket(tb, [&](int64_t bucket, int64_t begin, int64_t end) {
      fusedopt::cpu::sumsq_chunks(bucket, tmeta, grads, chunks, begin, end, tb.chunk_size, scale,
                                  partials);
    });
    double sumsq = 0.0;  // in chunk order: the result does not depend on the thread count
    for (int64_t c = 0; c < tb.bucket_offsets.back(); ++c) sumsq += partials[c];
    fusedopt::clip_from_sumsq(sumsq, static_cast<float>(*max_norm), tb.clip.data_ptr<float>());
    grad_in.clip = tb.clip.data_ptr<float>();
  }
  prologue(tmeta, tb.tmeta.size(0), tb.hyper.data_ptr<double>(), tb.gptr.data_ptr<int64_t>(),
           tb.glr.data_ptr<double>(), tb.hyper.size(0), tb.scal.data_ptr<float>());
  const float* scal = tb.scal.data_ptr<float>();
  for_each_bucket(tb, [&](int64_t bucket, int64_t begin, int64_t end) {
    update(bucket, tmeta, grads, scal, chunks, begin, end, tb.chunk_size, grad_in);
  });
}

void adam_step_cpu(TensorList, TensorList, TensorList, TensorList, TensorList,
                   const Tensor& tmeta, const Tensor& grads_meta, const Tensor& chunks,
                   const Tensor& hyper, const Tensor& gptr, const Tensor& glr, const Tensor& scal,
                   const Tensor& partials, const Tensor& clip, at::IntArrayRef bucket_dtypes,
                   at::IntArrayRef bucket_offsets, int64_t chunk_size,
                   const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf,
                   std::optional<double> max_norm, bool has_amsgrad, int64_t) {
  Tables tb{tmeta, grads_meta, chunks, hyper, gptr, glr, scal, partials, clip,
            bucket_dtypes, bucket_offsets, chunk_size};
  cpu_step(tb, grad_scale, found_inf, max_norm, fusedopt::cpu::adam_prologue,
           [&](int64_t bucket, auto... rest) {
             fusedopt::cpu::adam_chunks(bucket, has_amsgrad, rest...);
           });
}

void rmsprop_step_cpu(TensorList, TensorList, TensorList, TensorList, TensorList,
                      const Tensor& tmeta, const Tensor& grads_meta, const Tensor& chunks,
                      const Tensor& hyper, const Tensor& gptr, const Tensor& glr,
                      const Tensor& scal, const Tensor& partials, const Tensor& clip,
                      at::IntArrayRef bucket_dtypes, at::IntArrayRef bucket_offsets,
                      int64_t chunk_size, const std::optional<Tensor>& grad_scale,
                      const std::optional<Tensor>& found_inf, std::optional<double> max_norm,
                      bool has_centered, bool has_momentum, int64_t) {
  Tables tb{tmeta, grads_meta, chunks, hyper, gptr, glr, scal, partials, clip,
            bucket_dtypes, bucket_offsets, chunk_size};
  cpu_step(tb, grad_scale, found_inf, max_norm, fusedopt::cpu::rmsprop_prologue,
           [&](int64_t bucket, auto... rest) {
             fusedopt::cpu::rmsprop_chunks(bucket, has_centered, has_momentum, rest...);
           });
}

}  // namespace

// One schema per optimizer. grad_scale / found_inf: torch.amp.GradScaler's tensors (grads are
// unscaled in the kernel and written back; a step with found_inf != 0 changes nothing);
// max_norm: clip by the global grad norm inside the update. bucket_dtypes: one code per bucket
// (layout.h's BUCKET_*: the dtypes of param, grad and state; shadow; stochastic rounding).
// `stream` is the CUDA stream (as an integer) for the CUDA kernels; the CPU kernels ignore it.
#define FUSEDOPT_STEP_ARGS                                                                    \
  "Tensor(a!)[] params, Tensor(b!)[] states, Tensor(c!)[] steps, Tensor(d!)[] counters, "     \
  "Tensor(e!)[] grads, Tensor tmeta, Tensor grads_meta, Tensor chunks, Tensor hyper, "        \
  "Tensor gptr, Tensor(f!) glr, Tensor(g!) scal, Tensor(h!) partials, Tensor(i!) clip, "      \
  "int[] bucket_dtypes, int[] bucket_offsets, int chunk_size, Tensor? grad_scale, "           \
  "Tensor? found_inf, float? max_norm, "

TORCH_LIBRARY(fusedopt, m) {
  m.def("adam_step(" FUSEDOPT_STEP_ARGS "bool has_amsgrad, int stream=0) -> ()");
  m.def("rmsprop_step(" FUSEDOPT_STEP_ARGS
        "bool has_centered, bool has_momentum, int stream=0) -> ()");
}

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("adam_step", &adam_step_cpu);
  m.impl("rmsprop_step", &rmsprop_step_cpu);
}
