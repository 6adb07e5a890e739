// The thin CUDA binding: registers the CUDA kernels (csrc/cuda/*.cu) for the ops declared in
// csrc/binding.cpp. Includes no CUDA header (the stream arrives as an integer from Python), so it
// compiles against any torch, and the CI compile check covers it on machines without CUDA.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "fusedopt/layout.h"
#include "launchers.h"

namespace {

using at::Tensor;
using at::TensorList;

// A bucket code (layout.h's BUCKET_*) in words: "param bfloat16, grad bfloat16, state float32,
// stochastic rounding".
std::string describe_bucket(int64_t code) {
  using namespace fusedopt;
  if (code < 0 || code >= (int64_t{1} << (BUCKET_STOCHASTIC_BIT + 1))) {
    return "invalid bucket code " + std::to_string(code);
  }
  const auto dtype = [](int64_t d) -> std::string {
    switch (d) {
      case DTYPE_FLOAT32:
        return "float32";
      case DTYPE_BFLOAT16:
        return "bfloat16";
      case DTYPE_FLOAT16:
        return "float16";
      default:
        return "dtype code " + std::to_string(d);
    }
  };
  std::string out = "param " + dtype(code & 3) + ", grad " +
                    dtype((code >> BUCKET_GRAD_SHIFT) & 3) + ", state " +
                    dtype((code >> BUCKET_STATE_SHIFT) & 3);
  if ((code >> BUCKET_SHADOW_BIT) & 1) out += ", rounded into the model's parameter (master)";
  if ((code >> BUCKET_STOCHASTIC_BIT) & 1) out += ", stochastic rounding";
  return out;
}

// Every bucket with CUDA kernels, in words, for the error message of one without.
std::string supported_buckets() {
  std::string out;
  for (int code = 0; code < (1 << (fusedopt::BUCKET_STOCHASTIC_BIT + 1)); ++code) {
    if (fusedopt_cuda_bucket_supported(code)) out += "\n  " + describe_bucket(code);
  }
  return out;
}

void check(int err, const char* what) {
  TORCH_CHECK(err == 0, "fusedopt: launching the CUDA ", what, " kernel failed (cudaError ", err,
              ")");
}

// The same for one bucket's kernel, naming the bucket.
void check(int err, const char* what, size_t b, int64_t code) {
  TORCH_CHECK(err == 0, "fusedopt: launching the CUDA ", what, " kernel for bucket ", b, " (",
              describe_bucket(code), ") failed (cudaError ", err, ")");
}

// Every bucket must have kernels before anything is launched: a step is all or nothing.
void check_buckets(at::IntArrayRef codes) {
  for (size_t b = 0; b < codes.size(); ++b) {
    TORCH_CHECK(codes[b] >= 0 && codes[b] <= INT32_MAX &&
                    fusedopt_cuda_bucket_supported(static_cast<int>(codes[b])),
                "fusedopt: the CUDA backend has no kernel for bucket ", b, " (",
                describe_bucket(codes[b]), "; code ", codes[b], "). It has kernels for:",
                supported_buckets(),
                "\nbackend=\"triton\" or \"torch\" run any other precision setting.");
  }
}

// The metadata tables of one step, checked once (as csrc/binding.cpp's Tables, on a CUDA device).
struct Tables {
  const Tensor &tmeta, &grads_meta, &chunks, &hyper, &gptr, &glr, &scal, &partials, &clip;
  at::IntArrayRef bucket_dtypes, bucket_offsets;
  int64_t chunk_size;

  void check() const {
    const auto device = tmeta.device();
    for (const Tensor* t : {&tmeta, &grads_meta, &chunks, &hyper, &gptr, &glr, &scal, &partials,
                            &clip}) {
      TORCH_CHECK(t->device() == device && t->is_contiguous(),
                  "fusedopt: the CUDA kernels need contiguous metadata tables on one device");
    }
    TORCH_CHECK(device.is_cuda(), "fusedopt: CUDA kernels called with tables on ", device);
    TORCH_CHECK(tmeta.scalar_type() == at::kLong && grads_meta.scalar_type() == at::kLong &&
                    chunks.scalar_type() == at::kLong && gptr.scalar_type() == at::kLong &&
                    hyper.scalar_type() == at::kDouble && glr.scalar_type() == at::kDouble &&
                    scal.scalar_type() == at::kFloat && partials.scalar_type() == at::kFloat &&
                    clip.scalar_type() == at::kFloat,
                "fusedopt: metadata tables have the wrong dtypes");
    TORCH_CHECK(bucket_offsets.size() == bucket_dtypes.size() + 1,
                "fusedopt: bucket_offsets must have one entry more than bucket_dtypes");
    TORCH_CHECK(chunks.numel() >= 2 * n_chunks(),
                "fusedopt: bucket_offsets run past the end of the chunk list");
  }

  // The kernels write partials[0, n_chunks) and clip[0, 2) on the device: out of bounds there
  // would be silent, so the sizes are checked here.
  void check_clip_buffers() const {
    TORCH_CHECK(partials.numel() >= n_chunks() && clip.numel() >= 2,
                "fusedopt: the clipping buffers are too small for the chunk list");
  }

  int64_t n_chunks() const { return bucket_offsets.back(); }
  const int64_t* chunks_of(size_t b) const {
    return chunks.data_ptr<int64_t>() + 2 * bucket_offsets[b];
  }
  int64_t bucket_size(size_t b) const { return bucket_offsets[b + 1] - bucket_offsets[b]; }
};

// GradScaler's grad_scale / found_inf: a float32 scalar on the tables' device, or null.
const float* scalar_ptr(const std::optional<Tensor>& t, const Tables& tb, const char* what) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device() == tb.tmeta.device() && t->scalar_type() == at::kFloat &&
                  t->numel() == 1,
              "fusedopt: ", what, " must be a float32 scalar on the parameters' device");
  return t->data_ptr<float>();
}

// One step, on one stream and without a host sync (found_inf stays on the device; each kernel
// reads it): with clipping, the sum-of-squares pass per bucket; the prologue (which also reduces
// the partials to the clip coefficient); the update per bucket.
// prologue(found_inf, partials, n_partials, max_norm, clip, clip_buf, stream) and
// main(b, bucket code, grad_scale, found_inf, clip_buf, stream) launch the optimizer's kernels.
// bucket_dtypes holds one bucket code per bucket (layout.h's BUCKET_*: the dtypes of parameter,
// grads and state, and whether there is a shadow / stochastic rounding).
template <typename Prologue, typename Main>
void cuda_step(const Tables& tb, const std::optional<Tensor>& grad_scale,
               const std::optional<Tensor>& found_inf, std::optional<double> max_norm,
               int64_t stream, const char* prologue_name, const char* main_name,
               Prologue prologue, Main main) {
  tb.check();
  check_buckets(tb.bucket_dtypes);
  const float* scale = scalar_ptr(grad_scale, tb, "grad_scale");
  const float* inf = scalar_ptr(found_inf, tb, "found_inf");
  void* s = reinterpret_cast<void*>(stream);
  const bool clip = max_norm.has_value();
  float* partials = tb.partials.data_ptr<float>();
  float* clip_buf = tb.clip.data_ptr<float>();
  if (clip) {
    tb.check_clip_buffers();
    for (size_t b = 0; b < tb.bucket_dtypes.size(); ++b) {
      check(fusedopt_cuda_sumsq(tb.tmeta.data_ptr<int64_t>(), tb.grads_meta.data_ptr<int64_t>(),
                                tb.chunks_of(b), tb.bucket_size(b), tb.chunk_size,
                                static_cast<int>(tb.bucket_dtypes[b]), scale, inf,
                                partials + tb.bucket_offsets[b], s),
            "sum-of-squares", b, tb.bucket_dtypes[b]);
    }
  }
  check(prologue(inf, partials, tb.n_chunks(), clip ? static_cast<float>(*max_norm) : 0.0f, clip,
                 clip_buf, s),
        prologue_name);
  for (size_t b = 0; b < tb.bucket_dtypes.size(); ++b) {
    check(main(b, static_cast<int>(tb.bucket_dtypes[b]), scale, inf, clip ? clip_buf : nullptr,
               s),
          main_name, b, tb.bucket_dtypes[b]);
  }
}

void adam_step_cuda(TensorList, TensorList, TensorList, TensorList, TensorList,
                    const Tensor& tmeta, const Tensor& grads_meta, const Tensor& chunks,
                    const Tensor& hyper, const Tensor& gptr, const Tensor& glr, const Tensor& scal,
                    const Tensor& partials, const Tensor& clip, at::IntArrayRef bucket_dtypes,
                    at::IntArrayRef bucket_offsets, int64_t chunk_size,
                    const std::optional<Tensor>& grad_scale,
                    const std::optional<Tensor>& found_inf, std::optional<double> max_norm,
                    bool has_amsgrad, int64_t stream) {
  const Tables tb{tmeta, grads_meta, chunks, hyper, gptr, glr, scal, partials, clip,
                  bucket_dtypes, bucket_offsets, chunk_size};
  cuda_step(
      tb, grad_scale, found_inf, max_norm, stream, "adam prologue", "adam",
      [&](const float* inf, const float* parts, int64_t n_parts, float norm, bool do_clip,
          float* clip_buf, void* s) {
        return fusedopt_cuda_adam_prologue(
            tmeta.data_ptr<int64_t>(), tmeta.size(0), hyper.data_ptr<double>(),
            gptr.data_ptr<int64_t>(), glr.data_ptr<double>(), hyper.size(0),
            scal.data_ptr<float>(), inf, parts, n_parts, norm, do_clip, clip_buf, s);
      },
      [&](size_t b, int bucket, const float* scale, const float* inf, const float* clip_buf,
          void* s) {
        return fusedopt_cuda_adam_main(tmeta.data_ptr<int64_t>(), grads_meta.data_ptr<int64_t>(),
                                       scal.data_ptr<float>(), tb.chunks_of(b), tb.bucket_size(b),
                                       chunk_size, bucket, has_amsgrad, scale, inf, clip_buf, s);
      });
}

void rmsprop_step_cuda(TensorList, TensorList, TensorList, TensorList, TensorList,
                       const Tensor& tmeta, const Tensor& grads_meta, const Tensor& chunks,
                       const Tensor& hyper, const Tensor& gptr, const Tensor& glr,
                       const Tensor& scal, const Tensor& partials, const Tensor& clip,
                       at::IntArrayRef bucket_dtypes, at::IntArrayRef bucket_offsets,
                       int64_t chunk_size, const std::optional<Tensor>& grad_scale,
                       const std::optional<Tensor>& found_inf, std::optional<double> max_norm,
                       bool has_centered, bool has_momentum, int64_t stream) {
  const Tables tb{tmeta, grads_meta, chunks, hyper, gptr, glr, scal, partials, clip,
                  bucket_dtypes, bucket_offsets, chunk_size};
  cuda_step(
      tb, grad_scale, found_inf, max_norm, stream, "rmsprop prologue", "rmsprop",
      [&](const float* inf, const float* parts, int64_t n_parts, float norm, bool do_clip,
          float* clip_buf, void* s) {
        return fusedopt_cuda_rmsprop_prologue(
            tmeta.data_ptr<int64_t>(), tmeta.size(0), hyper.data_ptr<double>(),
            gptr.data_ptr<int64_t>(), glr.data_ptr<double>(), hyper.size(0),
            scal.data_ptr<float>(), inf, parts, n_parts, norm, do_clip, clip_buf, s);
      },
      [&](size_t b, int bucket, const float* scale, const float* inf, const float* clip_buf,
          void* s) {
        return fusedopt_cuda_rmsprop_main(
            tmeta.data_ptr<int64_t>(), grads_meta.data_ptr<int64_t>(), scal.data_ptr<float>(),
            tb.chunks_of(b), tb.bucket_size(b), chunk_size, bucket, has_centered, has_momentum,
            scale, inf, clip_buf, s);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) {
  m.impl("adam_step", &adam_step_cuda);
  m.impl("rmsprop_step", &rmsprop_step_cuda);
}
