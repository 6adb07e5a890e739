// The arguments of one fusedopt::step call (the schema in csrc/binding.cpp) and their
// checks, shared by the CPU binding (csrc/binding.cpp) and the CUDA one (csrc/cuda/binding.cpp).
// The kernels trust the metadata tables: every index and address in them is used unchecked. So the
// bindings check a call before any kernel runs, and a malformed one raises having changed nothing,
// instead of reading or writing out of bounds.
//
// For the bindings only: it uses torch's headers (never CUDA's), so no kernel includes it.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "fusedopt/layout.h"
#include "fusedopt/optim/all.h"

namespace fusedopt {

// A bucket code (layout.h's BUCKET_*) in words: "param bfloat16, grad bfloat16, state float32,
// stochastic rounding".
inline std::string describe_bucket(int64_t code) {
  if (code < 0 || code >= (int64_t{3} << BUCKET_ERROR_SHIFT)) {
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
      case DTYPE_UINT8:
        return "uint8 (8-bit, an absmax per 256)";
      default:
        return "dtype code " + std::to_string(d);
    }
  };
  std::string out = "param " + dtype(code & 3) + ", grad " +
                    dtype((code >> BUCKET_GRAD_SHIFT) & 3) + ", state " +
                    dtype((code >> BUCKET_STATE_SHIFT) & 3);
  if ((code >> BUCKET_SHADOW_BIT) & 1) out += ", rounded into the model's parameter (master)";
  if ((code >> BUCKET_STOCHASTIC_BIT) & 1) out += ", stochastic rounding";
  if ((code >> BUCKET_ERROR_SHIFT) & 3) {
    out += ((code >> BUCKET_ERROR_SHIFT) & 3) == 1 ? ", an int8" : ", an int16";
    out += " error term (compressed master)";
  }
  return out;
}

namespace step_args_detail {

// layout.h's dtype code (the bucket's code is supported, so it is one of the three).
inline at::ScalarType scalar_type(int64_t dtype_code) {
  switch (dtype_code) {
    case DTYPE_BFLOAT16:
      return at::kBFloat16;
    case DTYPE_FLOAT16:
      return at::kHalf;
    case DTYPE_UINT8:
      return at::kByte;
    default:
      return at::kFloat;
  }
}

inline int64_t address(const at::Tensor& t) {
  return static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr()));
}

inline std::string describe(const at::Tensor& t) {
  std::ostringstream out;
  out << "a " << t.scalar_type() << " tensor of shape " << t.sizes() << " on " << t.device();
  if (!t.is_contiguous()) out << ", not contiguous";
  return out.str();
}

// Finds the tensors of a list (from `first` on) by address, as the tables refer to them. Each
// step lists them in the order the table rows use them, so a cursor finds each at the next
// position; a hash map of the addresses is built only when that guess misses. Per-tensor cost on
// the common path: one comparison (a map for 10,000 tensors cost ~1.5 us each, per step).
class ListedTensors {
 public:
  explicit ListedTensors(at::TensorList list, size_t first = 0)
      : list_(list), first_(first), next_(first) {}

  const at::Tensor* find(int64_t addr) {
    if (next_ < list_.size() && address(list_[next_]) == addr) return &list_[next_++];
    if (map_.empty()) {
      map_.reserve(list_.size() - first_);
      for (size_t i = first_; i < list_.size(); ++i) map_.emplace(address(list_[i]), &list_[i]);
    }
    const auto it = map_.find(addr);
    return it == map_.end() ? nullptr : it->second;
  }

 private:
  at::TensorList list_;
  size_t first_, next_;
  std::unordered_map<int64_t, const at::Tensor*> map_;
};

}  // namespace step_args_detail

// GradScaler's grad_scale / found_inf: a float32 scalar on `device`, or null when absent.
inline const float* scalar_ptr(const std::optional<at::Tensor>& t, at::Device device,
                               const char* what) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device() == device && t->scalar_type() == at::kFloat && t->numel() == 1,
              "fusedopt: ", what, " must be a float32 scalar on the parameters' device (", device,
              "); got ", step_args_detail::describe(*t));
  return t->data_ptr<float>();
}

// The op's `optimizer` (layout.h's OPT_*, one the kernels have: fusedopt/optim/all.h) and
// `state_mask` (which of the three state slots some tensor uses); returns the mask.
inline unsigned check_optimizer(int64_t optimizer, int64_t state_mask) {
  TORCH_CHECK(with_optimizer(optimizer, [](auto) {}), "fusedopt: optimizer ", optimizer,
              " is none of the kernels' (layout.h's OPT_*: 0 adam, 1 rmsprop, 2 sgd)");
  TORCH_CHECK(state_mask >= 0 && state_mask <= 0b111, "fusedopt: state_mask ", state_mask,
              " is not a set of the three state slots (0 to 7)");
  return static_cast<unsigned>(state_mask);
}

// One step's arguments. The tensor lists are those fusedopt/backends/native.py passes: params =
// the n_tensors updated parameters in tmeta's row order (the fp32 master where there is one), then
// the model's parameters the masters are rounded into; states = every state tensor in use;
// steps and grads = one per row of tmeta; counters = the Noam groups' counters.
struct StepArgs {
  at::TensorList params, states, steps, counters, grads;
  const at::Tensor &tmeta, &grads_meta, &chunks, &hyper, &gptr, &glr, &scal, &partials, &clip;
  at::IntArrayRef bucket_dtypes, bucket_offsets;
  int64_t chunk_size;
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& found_inf;
  std::optional<double> max_norm;

  // Valid after check_layout.
  at::Device device() const { return tmeta.device(); }
  int64_t n_tensors() const { return tmeta.size(0); }
  int64_t n_groups() const { return hyper.size(0); }
  int64_t n_chunks() const { return bucket_offsets.back(); }
  int64_t bucket_size(size_t b) const { return bucket_offsets[b + 1] - bucket_offsets[b]; }
  const int64_t* chunks_of(size_t b) const {
    return chunks.data_ptr<int64_t>() + 2 * bucket_offsets[b];
  }

  // Everything the host sees without reading the tables: the tables' dtypes, shapes, devices and
  // contiguity, chunk_size, bucket_offsets, the clipping buffers, the lists' lengths and devices.
  // After it, every index the kernels derive from shapes and offsets is in bounds.
  void check_layout() const {
    check_tables();
    check_lists();
  }

  // check_layout without the per-tensor checks of the lists: the tables' own dtypes, shapes and
  // devices, chunk_size, bucket_offsets, the clipping buffers and GradScaler's scalars.
  void check_tables() const {
    using step_args_detail::describe;
    const at::Device dev = tmeta.device();
    const struct {
      const char* name;
      const at::Tensor& t;
      at::ScalarType dtype;
    } tables[] = {{"tmeta", tmeta, at::kLong},       {"grads_meta", grads_meta, at::kLong},
                  {"chunks", chunks, at::kLong},     {"hyper", hyper, at::kDouble},
                  {"gptr", gptr, at::kLong},         {"glr", glr, at::kDouble},
                  {"scal", scal, at::kFloat},        {"partials", partials, at::kFloat},
                  {"clip", clip, at::kFloat}};
    for (const auto& tb : tables) {
      TORCH_CHECK(tb.t.device() == dev && tb.t.scalar_type() == tb.dtype && tb.t.is_contiguous(),
                  "fusedopt: the metadata table ", tb.name, " must be a contiguous ", tb.dtype,
                  " tensor on ", dev, " (tmeta's device); got ", describe(tb.t));
    }
    TORCH_CHECK(tmeta.dim() == 2 && tmeta.size(1) == TMETA_WIDTH,
                "fusedopt: tmeta must be [n_tensors, ", TMETA_WIDTH, "]; got shape ",
                tmeta.sizes());
    const int64_t n = tmeta.size(0);
    TORCH_CHECK(grads_meta.dim() == 1 && grads_meta.size(0) == n,
                "fusedopt: grads_meta must hold one address per row of tmeta, [", n,
                "]; got shape ", grads_meta.sizes());
    TORCH_CHECK(scal.dim() == 2 && scal.size(0) == n && scal.size(1) == SCAL_WIDTH,
                "fusedopt: scal must be [n_tensors, ", SCAL_WIDTH, "] = [", n, ", ", SCAL_WIDTH,
                "]; got shape ", scal.sizes());
    TORCH_CHECK(hyper.dim() == 2 && hyper.size(1) == HYPER_WIDTH,
                "fusedopt: hyper must be [n_groups, ", HYPER_WIDTH, "]; got shape ",
                hyper.sizes());
    const int64_t n_groups = hyper.size(0);
    TORCH_CHECK(gptr.dim() == 2 && gptr.size(0) == n_groups && gptr.size(1) == GPTR_WIDTH,
                "fusedopt: gptr must be [n_groups, ", GPTR_WIDTH, "] = [", n_groups, ", ",
                GPTR_WIDTH, "] (hyper has ", n_groups, " groups); got shape ", gptr.sizes());
    TORCH_CHECK(glr.numel() >= n_groups, "fusedopt: glr must hold one lr per group (", n_groups,
                "); got shape ", glr.sizes());
    TORCH_CHECK(chunks.dim() == 2 && chunks.size(1) == 2,
                "fusedopt: chunks must be [n_chunks, 2] (tensor index, first element); got shape ",
                chunks.sizes());
    // The kernels compute min(start + chunk_size, numel) in int64 and only need chunk_size > 0
    // (any size and start: a chunk whose start or addresses do not suit vector accesses runs
    // element by element); the bound keeps start + chunk_size far from overflowing.
    TORCH_CHECK(chunk_size > 0 && chunk_size <= INT32_MAX,
                "fusedopt: chunk_size must be in [1, 2^31); got ", chunk_size);
    TORCH_CHECK(bucket_offsets.size() == bucket_dtypes.size() + 1,
                "fusedopt: bucket_offsets must have one entry more than bucket_dtypes (",
                bucket_dtypes.size(), " buckets); got ", bucket_offsets.size(), " entries");
    TORCH_CHECK(bucket_offsets[0] == 0, "fusedopt: bucket_offsets must start at 0; got ",
                bucket_offsets);
    for (size_t b = 0; b + 1 < bucket_offsets.size(); ++b) {
      TORCH_CHECK(bucket_offsets[b] <= bucket_offsets[b + 1],
                  "fusedopt: bucket_offsets must not decrease; got ", bucket_offsets);
    }
    TORCH_CHECK(bucket_offsets.back() <= chunks.size(0), "fusedopt: bucket_offsets end at chunk ",
                bucket_offsets.back(), ", past the end of the chunk table (", chunks.size(0),
                " chunks)");
    if (max_norm.has_value()) {
      TORCH_CHECK(partials.numel() >= partials_numel(n_chunks()), "fusedopt: clipping needs one "
                  "partial sum per chunk (", n_chunks(), ") and the reduction's first stage: ",
                  partials_numel(n_chunks()), " floats (layout.h's partials_numel); partials has ",
                  partials.numel());
      TORCH_CHECK(clip.numel() >= CLIP_NORM + 1, "fusedopt: clipping needs clip to hold ",
                  CLIP_NORM + 1, " floats (coefficient, norm); got ", clip.numel());
    }
    scalar_ptr(grad_scale, dev, "grad_scale");
    scalar_ptr(found_inf, dev, "found_inf");
  }

  // The tables' contents against each other and against the lists: each row's group, numel and
  // addresses, each chunk of each bucket, the dtypes of the tensors in each bucket, the states
  // and shadows the kernels will touch. Reads the tables: host memory only (after
  // check_layout). used_states(hyper row) says which of a tensor's state slots T_S0..T_S2 the
  // kernels touch (bit k: slot k), as the kernels decide it from the group's hyperparameters.
  template <typename UsedStates>
  void check_contents(UsedStates used_states) const {
    using step_args_detail::address;
    const int64_t n = n_tensors(), n_groups = this->n_groups();
    const int64_t* tm = tmeta.data_ptr<int64_t>();
    const int64_t* gm = grads_meta.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t* row = tm + i * TMETA_WIDTH;
      TORCH_CHECK(row[T_NUMEL] >= 0, "fusedopt: tmeta row ", i, " has numel ", row[T_NUMEL]);
      TORCH_CHECK(row[T_GROUP] >= 0 && row[T_GROUP] < n_groups, "fusedopt: tmeta row ", i,
                  " has param group ", row[T_GROUP], ", outside [0, ", n_groups,
                  ") (the rows of hyper)");
      check_entry("params", i, params[i], row[T_PARAM], row[T_NUMEL], "tmeta");
      check_entry("grads", i, grads[i], gm[i], row[T_NUMEL], "grads_meta");
      TORCH_CHECK(row[T_STEP] == address(steps[i]), "fusedopt: tmeta row ", i,
                  "'s step address is not that of steps[", i, "]");
    }
    check_group_pointers();
    const std::vector<int64_t> bucket_of = check_chunks();
    step_args_detail::ListedTensors states_at(states), shadows_at(params, n);
    for (int64_t i = 0; i < n; ++i) {
      if (bucket_of[i] < 0) continue;  // no chunk: the kernels touch its step only
      const int64_t code = bucket_dtypes[bucket_of[i]];
      const int64_t* row = tm + i * TMETA_WIDTH;
      const at::ScalarType param = step_args_detail::scalar_type(code & 3);
      const at::ScalarType grad = step_args_detail::scalar_type((code >> BUCKET_GRAD_SHIFT) & 3);
      const at::ScalarType state = step_args_detail::scalar_type((code >> BUCKET_STATE_SHIFT) & 3);
      check_dtype(i, code, "params", i, true, params[i], param);
      check_dtype(i, code, "grads", i, true, grads[i], grad);
      if ((code >> BUCKET_SHADOW_BIT) & 1) {
        check_listed(i, code, "the model parameter its master is rounded into (T_SHADOW)", -1,
                     shadows_at, "params after the first n_tensors", row[T_SHADOW], grad);
      }
      const unsigned used = used_states(hyper.data_ptr<double>() + row[T_GROUP] * HYPER_WIDTH);
      const bool eight_bit = ((code >> BUCKET_STATE_SHIFT) & 3) == DTYPE_UINT8;
      for (int k = 0; k < 3; ++k) {
        if ((used >> k) & 1) {
          check_listed(i, code, "state slot", k, states_at, "states", row[T_S0 + k], state);
          if (eight_bit) {
            check_listed(i, code, "8-bit absmaxes of state slot", k, states_at, "states",
                         row[T_A0 + k], at::kFloat, (row[T_NUMEL] + QBLOCK - 1) / QBLOCK);
          }
        }
      }
      const int64_t error = (code >> BUCKET_ERROR_SHIFT) & 3;
      if (error) {
        check_listed(i, code, "the compressed master's error term (T_ERR)", -1, states_at,
                     "states", row[T_ERR], error == 1 ? at::kChar : at::kShort);
      }
    }
  }

 private:
  void check_lists() const {
    const size_t n = static_cast<size_t>(n_tensors());
    TORCH_CHECK(steps.size() == n, "fusedopt: steps must hold one tensor per row of tmeta (", n,
                "); got ", steps.size());
    TORCH_CHECK(grads.size() == n, "fusedopt: grads must hold one tensor per row of tmeta (", n,
                "); got ", grads.size());
    TORCH_CHECK(params.size() >= n && params.size() <= 2 * n,
                "fusedopt: params must hold the ", n, " updated parameters (one per row of "
                "tmeta), then at most one model parameter per master; got ", params.size());
    TORCH_CHECK(states.size() <= 7 * n, "fusedopt: states holds ", states.size(),
                " tensors, more than three per row of tmeta (", n, "), each with its absmaxes, "
                "and an error term");
    const struct {
      const char* name;
      at::TensorList list;
      bool scalar;  // a float32 scalar the kernels write; else a dense tensor
    } lists[] = {{"params", params, false},
                 {"states", states, false},
                 {"steps", steps, true},
                 {"counters", counters, true},
                 {"grads", grads, false}};
    for (const auto& l : lists) {
      for (size_t i = 0; i < l.list.size(); ++i) {
        const at::Tensor& t = l.list[i];
        TORCH_CHECK(t.device() == device(), "fusedopt: ", l.name, "[", i, "] is on ", t.device(),
                    "; every tensor of a step must be on the tables' device, ", device());
        TORCH_CHECK(l.scalar ? t.scalar_type() == at::kFloat && t.numel() == 1
                             : t.is_non_overlapping_and_dense(),
                    "fusedopt: ", l.name, "[", i, "] must be ",
                    l.scalar ? "a float32 scalar" : "dense in memory (the kernels address it as "
                    "numel consecutive elements)", "; got ", step_args_detail::describe(t));
      }
    }
  }

  // The list entry `list`[i] is what row i of `table` says: its address and element count.
  static void check_entry(const char* list, int64_t i, const at::Tensor& t, int64_t addr,
                          int64_t numel, const char* table) {
    TORCH_CHECK(step_args_detail::address(t) == addr && t.numel() == numel, "fusedopt: ", list,
                "[", i, "] (", t.numel(), " elements at 0x", std::hex,
                step_args_detail::address(t), std::dec, ") is not the tensor ", table, " row ", i,
                " describes (", numel, " elements at 0x", std::hex, addr, ")");
  }

  // `what` names a tensor: with `k` >= 0, "`what`[k]" when `list_index`, else "`what` k". The name
  // is put together only when a check fails: these checks run for every tensor at every step.
  static std::string name(const char* what, int64_t k, bool list_index) {
    if (k < 0) return what;
    return list_index ? std::string(what) + "[" + std::to_string(k) + "]"
                      : std::string(what) + " " + std::to_string(k);
  }

  static void check_dtype(int64_t i, int64_t code, const char* what, int64_t k, bool list_index,
                          const at::Tensor& t, at::ScalarType dtype) {
    TORCH_CHECK(t.scalar_type() == dtype, "fusedopt: tensor ", i, " has chunks in the bucket (",
                describe_bucket(code), "), which needs ", name(what, k, list_index), " to be ",
                dtype, "; it is ", t.scalar_type());
  }

  // Tensor i's `what` (at address addr; slot k if k >= 0) must be a tensor of `list` with i's
  // numel and `dtype`.
  // (numel >= 0: that many elements instead: an 8-bit state's absmaxes, one per QBLOCK)
  void check_listed(int64_t i, int64_t code, const char* what, int64_t k,
                    step_args_detail::ListedTensors& listed, const char* list, int64_t addr,
                    at::ScalarType dtype, int64_t numel = -1) const {
    const at::Tensor* t = listed.find(addr);
    if (numel < 0) numel = tmeta.data_ptr<int64_t>()[i * TMETA_WIDTH + T_NUMEL];
    TORCH_CHECK(t != nullptr && t->numel() == numel, "fusedopt: tmeta row ", i, ": ",
                name(what, k, false), " at 0x", std::hex, addr, std::dec,
                " is not a tensor of ", list, " with ", numel, " elements");
    check_dtype(i, code, what, k, false, *t, dtype);
  }

  // A Noam or schedule group's counter must be one of `counters` (the kernels write it); a tensor
  // lr's address and a schedule's parameters are read only and not in any list, so only their
  // presence is checked.
  void check_group_pointers() const {
    step_args_detail::ListedTensors counters_at(counters);
    const double* h = hyper.data_ptr<double>();
    const int64_t* ptrs = gptr.data_ptr<int64_t>();
    for (int64_t g = 0; g < n_groups(); ++g) {
      const double mode = h[g * HYPER_WIDTH + H_MODE];
      if (mode == LR_NOAM || mode == LR_SCHEDULE) {
        TORCH_CHECK(counters_at.find(ptrs[g * GPTR_WIDTH + G_COUNTER_PTR]) != nullptr,
                    "fusedopt: group ", g, " takes its lr from a ",
                    mode == LR_NOAM ? "Noam schedule" : "schedule",
                    ", and its counter address in gptr is not one of counters");
        TORCH_CHECK(mode == LR_NOAM || ptrs[g * GPTR_WIDTH + G_SCHED_PTR] != 0, "fusedopt: group ",
                    g, " takes its lr from a schedule, and gptr holds no address for its "
                    "parameters");
      } else if (mode == LR_TENSOR) {
        TORCH_CHECK(ptrs[g * GPTR_WIDTH + G_LR_PTR] != 0, "fusedopt: group ", g,
                    " takes its lr from a tensor, and gptr holds no address for it");
      }
    }
  }

  // Each chunk of each bucket names a row of tmeta and a start inside that tensor, at a multiple
  // of chunk_size (as fusedopt/_tables.py lays chunks out: so chunks cannot overlap), and all of
  // a tensor's chunks are in one bucket. Returns each row's bucket (-1: no chunk).
  std::vector<int64_t> check_chunks() const {
    const int64_t n = n_tensors();
    const int64_t* tm = tmeta.data_ptr<int64_t>();
    const int64_t* ch = chunks.data_ptr<int64_t>();
    std::vector<int64_t> bucket_of(n, -1);
    for (size_t b = 0; b < bucket_dtypes.size(); ++b) {
      for (int64_t c = bucket_offsets[b]; c < bucket_offsets[b + 1]; ++c) {
        const int64_t t = ch[2 * c], start = ch[2 * c + 1];
        TORCH_CHECK(t >= 0 && t < n, "fusedopt: chunk ", c, " names tensor ", t,
                    ", outside [0, ", n, ") (the rows of tmeta)");
        const int64_t numel = tm[t * TMETA_WIDTH + T_NUMEL];
        TORCH_CHECK(start >= 0 && start < numel, "fusedopt: chunk ", c, " starts at element ",
                    start, ", outside tensor ", t, " (", numel, " elements)");
        TORCH_CHECK(start % chunk_size == 0, "fusedopt: chunk ", c, " starts at element ", start,
                    ", not a multiple of chunk_size (", chunk_size, ")");
        TORCH_CHECK(bucket_of[t] < 0 || bucket_of[t] == static_cast<int64_t>(b),
                    "fusedopt: tensor ", t, " has chunks in buckets ", bucket_of[t], " and ", b);
        bucket_of[t] = static_cast<int64_t>(b);
      }
    }
    return bucket_of;
  }
};

}  // namespace fusedopt

// The C++ parameters of the op's table and list arguments (the schema's FUSEDOPT_STEP_ARGS in
// csrc/binding.cpp), named as StepArgs' fields, and the StepArgs they make: the op is
// `void op(FUSEDOPT_STEP_PARAMS, int64_t optimizer, int64_t state_mask, int64_t stream)`,
// starting with
// `const fusedopt::StepArgs a{FUSEDOPT_STEP_PARAM_NAMES};`.
#define FUSEDOPT_STEP_PARAMS                                                                      \
  at::TensorList params, at::TensorList states, at::TensorList steps, at::TensorList counters,  \
      at::TensorList grads, const at::Tensor& tmeta, const at::Tensor& grads_meta,               \
      const at::Tensor& chunks, const at::Tensor& hyper, const at::Tensor& gptr,                 \
      const at::Tensor& glr, const at::Tensor& scal, const at::Tensor& partials,                 \
      const at::Tensor& clip, at::IntArrayRef bucket_dtypes, at::IntArrayRef bucket_offsets,     \
      int64_t chunk_size, const std::optional<at::Tensor>& grad_scale,                           \
      const std::optional<at::Tensor>& found_inf, std::optional<double> max_norm
#define FUSEDOPT_STEP_PARAM_NAMES                                                                 \
  params, states, steps, counters, grads, tmeta, grads_meta, chunks, hyper, gptr, glr, scal,     \
      partials, clip, bucket_dtypes, bucket_offsets, chunk_size, grad_scale, found_inf, max_norm
