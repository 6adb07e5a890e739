// The thin CUDA binding: registers the CUDA kernels (csrc/cuda/*.cu) for the ops declared in
// csrc/binding.cpp. Includes no CUDA header (the stream arrives as an integer from Python; the
// device guard is c10's generic one, whose CUDA implementation torch's CUDA library registers at
// run time), so it compiles against any torch, and the CI compile check covers it on machines
// without CUDA.
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "fusedopt/layout.h"
#include "fusedopt/step_args.h"
#include "launchers.h"

namespace {

// Every bucket with CUDA kernels, in words, for the error message of one without.
std::string supported_buckets() {
  std::string out;
  // (every code describe_bucket knows: the error term's two bits included)
  for (int code = 0; code < (3 << fusedopt::BUCKET_ERROR_SHIFT); ++code) {
    if (fusedopt_cuda_bucket_supported(code)) out += "\n  " + fusedopt::describe_bucket(code);
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
              fusedopt::describe_bucket(code), ") failed (cudaError ", err, ")");
}

// Every bucket must have kernels before anything is launched: a step is all or nothing.
void check_buckets(at::IntArrayRef codes) {
  for (size_t b = 0; b < codes.size(); ++b) {
    TORCH_CHECK(codes[b] >= 0 && codes[b] <= INT32_MAX &&
                    fusedopt_cuda_bucket_supported(static_cast<int>(codes[b])),
                "fusedopt: the CUDA backend has no kernel for bucket ", b, " (",
                fusedopt::describe_bucket(codes[b]), "; code ", codes[b], "). It has kernels for:",
                supported_buckets(),
                "\nbackend=\"triton\" or \"torch\" run any other precision setting.");
  }
}

// A call's checks before anything is launched (fusedopt/step_args.h's check_layout): the
// tables' shapes, dtypes and devices, chunk_size, bucket_offsets, the clipping buffers, the
// lists' lengths and devices, GradScaler's scalars; every bucket has kernels.
// The tables' contents are not checked here, unlike on the CPU: the group index and numel of each
// row of tmeta, the tensor index and start of each chunk, the addresses in tmeta / grads_meta /
// gptr against the lists, and the dtypes of the tensors in each bucket. They live in device
// memory, and reading them back would cost a device-to-host copy and a stream synchronization on
// every step, which the op is built to avoid (no host sync; a step can be captured in a CUDA
// graph, where a sync is an error). fusedopt/_tables.py builds them with the same code for both
// devices, and the CPU op checks that code's output (tests/test_binding_checks.py).
void check_args(const fusedopt::StepArgs& a) {
  TORCH_CHECK(a.tmeta.device().is_cuda(), "fusedopt: CUDA kernels called with tables on ",
              a.tmeta.device());
  a.check_layout();
  check_buckets(a.bucket_dtypes);
}

// One step, on one stream and without a host sync (found_inf stays on the device; each kernel
// reads it): with clipping, the sum-of-squares pass per bucket and the reduction's first stage;
// the prologue (which also adds the stage's sums into the clip coefficient); the update per
// bucket.
// prologue(found_inf, partials, n_partials, max_norm, clip, clip_buf, stream) and
// main(b, bucket code, grad_scale, found_inf, clip_buf, stream) launch the optimizer's kernels
// (csrc/cuda/update.cu).
// bucket_dtypes holds one bucket code per bucket (layout.h's BUCKET_*: the dtypes of parameter,
// grads and state, and whether there is a shadow / stochastic rounding).
// Runs on the tables' device (a guard for the whole op: the kernels launch on the current device,
// which need not be the parameters').
template <typename Prologue, typename Main>
void cuda_step(const fusedopt::StepArgs& a, int64_t stream, Prologue prologue, Main main) {
  check_args(a);
  const c10::DeviceGuard guard(a.device());
  const float* scale = fusedopt::scalar_ptr(a.grad_scale, a.device(), "grad_scale");
  const float* inf = fusedopt::scalar_ptr(a.found_inf, a.device(), "found_inf");
  void* s = reinterpret_cast<void*>(stream);
  const bool clip = a.max_norm.has_value();
  float* partials = a.partials.data_ptr<float>();
  float* clip_buf = a.clip.data_ptr<float>();
  if (clip) {
    for (size_t b = 0; b < a.bucket_dtypes.size(); ++b) {
      check(fusedopt_cuda_sumsq(a.tmeta.data_ptr<int64_t>(), a.grads_meta.data_ptr<int64_t>(),
                                a.chunks_of(b), a.bucket_size(b), a.chunk_size,
                                static_cast<int>(a.bucket_dtypes[b]), scale, inf,
                                partials + a.bucket_offsets[b], s),
            "sum-of-squares", b, a.bucket_dtypes[b]);
    }
    check(fusedopt_cuda_clip_stage(partials, a.n_chunks(), inf, s), "clip-stage");
  }
  check(prologue(inf, partials, a.n_chunks(), clip ? static_cast<float>(*a.max_norm) : 0.0f, clip,
                 clip_buf, s),
        "prologue");
  for (size_t b = 0; b < a.bucket_dtypes.size(); ++b) {
    check(main(b, static_cast<int>(a.bucket_dtypes[b]), scale, inf, clip ? clip_buf : nullptr,
               s),
          "update", b, a.bucket_dtypes[b]);
  }
}

void step_cuda(FUSEDOPT_STEP_PARAMS, int64_t optimizer, int64_t state_mask, int64_t stream) {
  const fusedopt::StepArgs a{FUSEDOPT_STEP_PARAM_NAMES};
  const int opt = static_cast<int>(optimizer);
  const int slots = static_cast<int>(fusedopt::check_optimizer(optimizer, state_mask));
  TORCH_CHECK(fusedopt_cuda_optimizer_known(opt), "fusedopt: the CUDA library has no kernels for "
              "optimizer ", optimizer, " (layout.h's OPT_*): rebuild it");
  cuda_step(
      a, stream,
      [&](const float* inf, const float* parts, int64_t n_parts, float norm, bool do_clip,
          float* clip_buf, void* s) {
        return fusedopt_cuda_prologue(opt, tmeta.data_ptr<int64_t>(), a.n_tensors(),
                                      hyper.data_ptr<double>(), gptr.data_ptr<int64_t>(),
                                      glr.data_ptr<double>(), a.n_groups(),
                                      scal.data_ptr<float>(), inf, parts, n_parts, norm, do_clip,
                                      clip_buf, s);
      },
      [&](size_t b, int bucket, const float* scale, const float* inf, const float* clip_buf,
          void* s) {
        return fusedopt_cuda_main(opt, tmeta.data_ptr<int64_t>(), grads_meta.data_ptr<int64_t>(),
                                  scal.data_ptr<float>(), a.chunks_of(b), a.bucket_size(b),
                                  chunk_size, bucket, slots, scale, inf, clip_buf, s);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) {
  m.impl("step", &step_cuda);
}
