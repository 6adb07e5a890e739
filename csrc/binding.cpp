// The thin binding: declares fusedopt's ops (TORCH_LIBRARY) and registers their CPU kernels.
// The CUDA kernels register for the same ops from csrc/cuda/binding.cpp (a separate library,
// built only with CUDA). The tensor lists are in the schema so that torch sees what each op
// mutates; the kernels themselves read the metadata tables built by fusedopt/_tables.py, which
// are checked against the lists first (fusedopt/step_args.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>

#include "cpu/kernels.h"
#include "cpu/step.h"
#include "fusedopt/layout.h"
#include "fusedopt/step_args.h"

namespace {

// A bucket's chunks are split over torch's intra-op threads only when there is enough work:
// handing chunks to another thread costs some microseconds, the time of tens of thousands of
// element updates, and a chunk may hold a single element (465 one-element tensors in 465 groups
// ran slower on two threads than on one). Work: elements, plus kChunkCost per chunk (its
// addresses and scalars).
constexpr int64_t kChunkCost = 64, kThreadWork = int64_t{1} << 16;
constexpr int64_t kGrainChunks = 4;  // and never fewer chunks than this per thread

int64_t grain_chunks(const fusedopt::StepArgs& a, int64_t begin, int64_t end) {
  const int64_t n = end - begin;
  if (n * kChunkCost >= kThreadWork) return kGrainChunks;  // enough whatever the chunks hold
  const int64_t* tmeta = a.tmeta.data_ptr<int64_t>();
  const int64_t* chunks = a.chunks.data_ptr<int64_t>();
  int64_t work = n * kChunkCost;
  for (int64_t c = begin; c < end; ++c) {
    const int64_t numel = tmeta[chunks[2 * c] * fusedopt::TMETA_WIDTH + fusedopt::T_NUMEL];
    work += std::min(a.chunk_size, numel - chunks[2 * c + 1]);
  }
  return work >= kThreadWork ? kGrainChunks : n;  // n: one thread
}

// The CPU-specific half of a call's checks (the rest: fusedopt/step_args.h): the tables are host
// memory, so their contents are checked too; every bucket has a kernel variant.
template <typename UsedStates>
void check_args(const fusedopt::StepArgs& a, UsedStates used_states) {
  TORCH_CHECK(a.tmeta.device().is_cpu(), "fusedopt: the CPU kernels need the metadata tables in "
              "CPU memory; tmeta is on ", a.tmeta.device());
  a.check_layout();
  for (int64_t code : a.bucket_dtypes) {
    TORCH_CHECK(fusedopt::cpu::bucket_supported(code),
                "fusedopt: the CPU kernels have no variant for the bucket ",
                fusedopt::describe_bucket(code), " (code ", code,
                "). (param, grad, state) combinations they have: each of float32, bfloat16, "
                "float16 alone; (float32, float32, bfloat16 or float16); with a shadow (an fp32 "
                "master): (float32, bfloat16, float32), (float32, float16, float32), "
                "(float32, bfloat16, bfloat16); (bfloat16, bfloat16, float32); with stochastic "
                "rounding: (bfloat16, bfloat16, bfloat16 or float32); 8-bit state (uint8) for "
                "float32 parameters, fp32 masters of bfloat16 ones, bfloat16 ones (rounded to "
                "nearest or stochastically); compressed masters (an int8 or int16 error term) of "
                "bfloat16 parameters with float32 or 8-bit state");
  }
  a.check_contents(used_states);
}

// Runs `main(bucket, begin, end)` over each bucket's chunks, on torch's intra-op threads (bucket:
// the bucket's code).
template <typename Main>
void for_each_bucket(const fusedopt::StepArgs& a, Main main) {
  for (size_t b = 0; b < a.bucket_dtypes.size(); ++b) {
    const int64_t bucket = a.bucket_dtypes[b];
    const int64_t begin = a.bucket_offsets[b], end = a.bucket_offsets[b + 1];
    at::parallel_for(begin, end, grain_chunks(a, begin, end),
                     [&](int64_t b0, int64_t e0) { main(bucket, b0, e0); });
  }
}

// One step (after check_args): skipped whole when GradScaler found an inf (found_inf lives in host
// memory here); with clipping, the sum-of-squares pass and the clip coefficient; the prologue;
// the updates.
template <typename Prologue, typename Update>
void cpu_step(const fusedopt::StepArgs& a, Prologue prologue, Update update) {
  const float* scale = fusedopt::scalar_ptr(a.grad_scale, a.device(), "grad_scale");
  const float* inf = fusedopt::scalar_ptr(a.found_inf, a.device(), "found_inf");
  if (inf != nullptr && *inf != 0.0f) return;
  const int64_t* tmeta = a.tmeta.data_ptr<int64_t>();
  const int64_t* grads = a.grads_meta.data_ptr<int64_t>();
  const int64_t* chunks = a.chunks.data_ptr<int64_t>();
  fusedopt::cpu::GradIn grad_in{scale, nullptr};
  if (a.max_norm.has_value()) {
    float* partials = a.partials.data_ptr<float>();
    for_each_bucket(a, [&](int64_t bucket, int64_t begin, int64_t end) {
      fusedopt::cpu::sumsq_chunks(bucket, tmeta, grads, chunks, begin, end, a.chunk_size, scale,
                                  partials);
    });
    double sumsq = 0.0;  // in chunk order: the result does not depend on the thread count
    for (int64_t c = 0; c < a.n_chunks(); ++c) sumsq += partials[c];
    fusedopt::clip_from_sumsq(sumsq, static_cast<float>(*a.max_norm), a.clip.data_ptr<float>());
    grad_in.clip = a.clip.data_ptr<float>();
  }
  prologue(tmeta, a.n_tensors(), a.hyper.data_ptr<double>(), a.gptr.data_ptr<int64_t>(),
           a.glr.data_ptr<double>(), a.n_groups(), a.scal.data_ptr<float>());
  const float* scal = a.scal.data_ptr<float>();
  for_each_bucket(a, [&](int64_t bucket, int64_t begin, int64_t end) {
    update(bucket, tmeta, grads, scal, chunks, begin, end, a.chunk_size, grad_in);
  });
}

void step_cpu(FUSEDOPT_STEP_PARAMS, int64_t optimizer, int64_t state_mask, int64_t) {
  const fusedopt::StepArgs a{FUSEDOPT_STEP_PARAM_NAMES};
  const unsigned slots = fusedopt::check_optimizer(optimizer, state_mask);
  check_args(a, [&](const double* h) { return fusedopt::cpu::used_slots(optimizer, h, slots); });
  fusedopt::cpu::run(a, optimizer, slots);
}

}  // namespace

namespace fusedopt::cpu {

void run(const StepArgs& a, int64_t optimizer, unsigned slots) {
  cpu_step(
      a,
      [&](auto... args) { prologue(optimizer, args...); },
      [&](int64_t bucket, auto... rest) { update_chunks(optimizer, bucket, slots, rest...); });
}

}  // namespace fusedopt::cpu

// One op for every optimizer: `optimizer` is layout.h's OPT_* code, `state_mask` says which
// state slots some tensor of the call uses (bit k: slot k; the kernels compile the code of an
// option that uses a slot only when some tensor has that slot). grad_scale / found_inf: torch.amp.GradScaler's tensors (grads are
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
  m.def("step(" FUSEDOPT_STEP_ARGS "int optimizer, int state_mask, int stream=0) -> ()");
}

// Autograd: nothing to record (the ops are not differentiable and step() runs under no_grad), so
// the dispatcher goes straight on to the device kernel. Without this, torch's boxed
// "autograd not implemented" fallback converted every tensor of the lists to an IValue and built
// graph nodes for the parameters: most of the op's host time at 10,000 tensors (issue 12).
// Versions: like torch's own fused optimizers, the step does not bump the parameters' versions.
TORCH_LIBRARY_IMPL(fusedopt, Autograd, m) {
  m.impl("step", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("step", &step_cpu);
}
