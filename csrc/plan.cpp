// fusedopt._C.StepPlan: what one step() needs from thousands of parameters, checked and collected
// in one C++ pass instead of a Python walk over every parameter (issue 12).
//
// fusedopt/optimizer.py builds a plan after a step that walked everything in Python (validation,
// new state, buckets, tables). The plan records, by identity, every object that walk read: the
// param_groups list, each group's dict and params list, each parameter, the optimizer's state
// dict and every parameter's own state dict with its entries, and the address, size and dtype of
// every tensor the metadata tables name. `collect()` compares all of that with what is there now
// and reads each parameter's grad, checking it has the layout the plan was built with. Anything
// else (a grad gained or lost, another layout, a replaced or moved tensor, a changed list) makes
// `collect()` return why, having changed nothing anyone else can see, and the optimizer walks
// everything again. What stays Python: the groups' hyperparameters (one small dict each).
//
// `run()` then calls the step op through the dispatcher with the tensor lists the plan holds, so
// the op checks its tables against them exactly as for a call from Python, without converting
// tens of thousands of tensors from Python objects at every step. On the CPU, where the tables
// are host memory, that checked call is needed only once: run() keeps a copy of what it checked
// (the tables' contents, which tensors they were, the buckets), and while all of it is unchanged
// and collect() has shown in the same step that every tensor the tables name is where the checked
// call saw it, it runs the kernels without the op's per-tensor checks (they cost five times the
// kernels at 10,000 one-element tensors). Anything else, and every CUDA call (whose tables the
// host cannot read), goes through the op and its checks.
// Not <torch/extension.h>: it brings torch's whole C++ frontend, which this file does not use, and
// made it the build's longest file (38 s of CPU with -g, 2026-12-05; 15 s with these and -g0).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <cstring>

#include "cpu/kernels.h"
#include "cpu/step.h"
#include "fusedopt/step_args.h"  // FUSEDOPT_STEP_PARAMS: the ops' shared parameters

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace {

namespace py = pybind11;

// The op fusedopt::`name` (csrc/binding.cpp's schema), called without boxing its arguments.
template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow((std::string("fusedopt::") + name).c_str(), "")
      .template typed<Signature>();
}

// An interned str made once, for a function-local static, and never released: a static py::str
// would be released by the C++ exit handlers, after the interpreter has finalized, and under
// Python 3.12 (whose allocator state is per interpreter) that is a SIGSEGV at exit in every
// process that stepped. Interned, a key's dict lookups compare pointers first.
py::handle interned_str(const char* s) {
  PyObject* str = PyUnicode_InternFromString(s);
  if (str == nullptr) throw py::error_already_set();
  return str;
}

int64_t address(const at::Tensor& t) {
  return static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr()));
}

// A dict's (key, value) pairs in order, by identity.
std::vector<std::pair<py::object, py::object>> items_of(PyObject* dict) {
  std::vector<std::pair<py::object, py::object>> out;
  out.reserve(static_cast<size_t>(PyDict_Size(dict)));
  Py_ssize_t pos = 0;
  PyObject *key, *value;
  while (PyDict_Next(dict, &pos, &key, &value)) {
    out.emplace_back(py::reinterpret_borrow<py::object>(key),
                     py::reinterpret_borrow<py::object>(value));
  }
  return out;
}

// True when `dict` holds exactly `items`, in that order, by identity.
bool same_items(PyObject* dict, const std::vector<std::pair<py::object, py::object>>& items) {
  if (!PyDict_Check(dict) || PyDict_Size(dict) != static_cast<Py_ssize_t>(items.size())) {
    return false;
  }
  Py_ssize_t pos = 0;
  PyObject *key, *value;
  for (const auto& kv : items) {
    if (!PyDict_Next(dict, &pos, &key, &value) || key != kv.first.ptr() ||
        value != kv.second.ptr()) {
      return false;
    }
  }
  return true;
}

// A tensor the tables hold the address of, as it was when the plan was built.
struct Held {
  at::Tensor t;
  int64_t addr, numel;
  at::ScalarType dtype;
};

// One parameter of the optimizer, in param_groups order.
struct Watched {
  py::object param;
  py::object local;  // DTensor parameters: the local tensor object (FSDP2's shard); else None
  int64_t work = -1, slot = -1;  // where its grad goes; -1: it had no grad, and must still have none
  at::Tensor layout;             // the local parameter: the grad must have its shape and strides
  py::object state;              // its state dict (slot >= 0; null when it has none)
  std::vector<std::pair<py::object, py::object>> entries;  // that dict's items
};

// What the op's checks saw in a checked call over CPU tables (see StepPlan::run).
struct Verified {
  bool valid = false;
  int64_t optimizer = -1;
  int64_t state_mask = -1;
  std::vector<const c10::TensorImpl*> tables;  // the nine tables, in the op's order
  at::Tensor tmeta, chunks, gptr;              // copies of their contents
  std::vector<unsigned> used;                  // per group: the state slots the kernels touch
  std::vector<int64_t> dtypes, offsets;
  int64_t chunk_size = 0;
};

struct Work {
  std::vector<at::Tensor> params, states, steps, counters, grads;
  at::Tensor grad_addrs;  // int64 [n slots], host: the grads' addresses
  bool grads_changed = true;  // see StepPlan::grads_changed
  Verified verified;
};

bool same_contents(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
         std::memcmp(a.const_data_ptr(), b.const_data_ptr(), a.nbytes()) == 0;
}

// Per group, what of its hyperparameter row the kernels' memory accesses depend on: its lr mode
// (which of gptr's addresses the prologue reads) and the state slots it touches.
std::vector<unsigned> used_by_group(int64_t optimizer, unsigned slots, const at::Tensor& hyper) {
  std::vector<unsigned> out(static_cast<size_t>(hyper.size(0)));
  const double* h = hyper.const_data_ptr<double>();
  for (size_t g = 0; g < out.size(); ++g) {
    const double* row = h + g * fusedopt::HYPER_WIDTH;
    const double mode = row[fusedopt::H_MODE];
    const unsigned mode_bits = mode == fusedopt::LR_TENSOR ? 1u : mode == fusedopt::LR_NOAM ? 2u
                                                                                             : 0u;
    out[g] = fusedopt::cpu::used_slots(optimizer, row, slots) | mode_bits << 8;
  }
  return out;
}

class StepPlan {
 public:
  // watched: (param, local param object or None, work, slot) per parameter in param_groups order;
  // works: (params, states, steps, counters, grads) per device work, the op's lists.
  StepPlan(py::list param_groups, py::dict state, py::list watched, py::list works)
      : groups_(param_groups), state_(state) {
    static const py::handle params_key = interned_str("params");
    for (py::handle g : param_groups) {
      py::object list = py::reinterpret_borrow<py::object>(g)[params_key];
      group_dicts_.push_back(py::reinterpret_borrow<py::object>(g));
      group_lists_.push_back(list);
      group_sizes_.push_back(py::len(list));
    }
    state_items_ = items_of(state.ptr());
    for (py::handle w : works) {
      auto t = w.cast<py::tuple>();
      Work work;
      work.params = t[0].cast<std::vector<at::Tensor>>();
      work.states = t[1].cast<std::vector<at::Tensor>>();
      work.steps = t[2].cast<std::vector<at::Tensor>>();
      work.counters = t[3].cast<std::vector<at::Tensor>>();
      work.grads = t[4].cast<std::vector<at::Tensor>>();
      work.grad_addrs = at::empty({static_cast<int64_t>(work.grads.size())}, at::kLong);
      int64_t* a = work.grad_addrs.data_ptr<int64_t>();
      for (size_t i = 0; i < work.grads.size(); ++i) a[i] = address(work.grads[i]);
      for (const auto* list : {&work.params, &work.states, &work.steps, &work.counters}) {
        for (const at::Tensor& x : *list) {
          held_.push_back({x, address(x), x.numel(), x.scalar_type()});
        }
      }
      works_.push_back(std::move(work));
    }
    release();
    for (py::handle h : watched) {
      auto t = h.cast<py::tuple>();
      Watched w;
      w.param = t[0];
      w.local = t[1];
      w.work = t[2].cast<int64_t>();
      w.slot = t[3].cast<int64_t>();
      PyObject* local = w.local.is_none() ? w.param.ptr() : w.local.ptr();
      TORCH_CHECK(THPVariable_Check(local), "fusedopt: StepPlan: a parameter is not a tensor");
      w.layout = THPVariable_Unpack(local);
      if (w.slot >= 0) {
        TORCH_CHECK(w.work < static_cast<int64_t>(works_.size()) &&
                        w.slot < static_cast<int64_t>(works_[w.work].grads.size()),
                    "fusedopt: StepPlan: slot out of range");
        // None: no state (fusedopt.SGD without momentum keeps none, as torch.optim.SGD); one
        // created later changes the optimizer's state dict, which collect() compares
        PyObject* st = PyDict_GetItem(state.ptr(), w.param.ptr());
        TORCH_CHECK(st == nullptr || PyDict_Check(st),
                    "fusedopt: StepPlan: a parameter's state is not a dict");
        if (st != nullptr) {
          w.state = py::reinterpret_borrow<py::object>(st);
          w.entries = items_of(st);
        }
      }
      watched_.push_back(std::move(w));
    }
  }

  // "" when the plan still holds, with every grad collected; else why not (nothing else changed).
  std::string collect(py::handle param_groups, py::handle state) {
    static const py::handle params_key = interned_str("params");
    if (param_groups.ptr() != groups_.ptr() || !PyList_Check(param_groups.ptr()) ||
        PyList_GET_SIZE(param_groups.ptr()) != static_cast<Py_ssize_t>(group_dicts_.size())) {
      return "param_groups changed";
    }
    size_t k = 0;
    for (size_t gi = 0; gi < group_dicts_.size(); ++gi) {
      PyObject* g = PyList_GET_ITEM(param_groups.ptr(), gi);
      if (g != group_dicts_[gi].ptr() || !PyDict_Check(g)) return "a param group was replaced";
      PyObject* list = PyDict_GetItem(g, params_key.ptr());
      if (list != group_lists_[gi].ptr() || !PyList_Check(list) ||
          PyList_GET_SIZE(list) != static_cast<Py_ssize_t>(group_sizes_[gi])) {
        return "a group's params changed";
      }
      for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); ++i, ++k) {
        if (k >= watched_.size() || PyList_GET_ITEM(list, i) != watched_[k].param.ptr()) {
          return "a group's params changed";
        }
      }
    }
    if (k != watched_.size()) return "a group's params changed";
    if (state.ptr() != state_.ptr() || !same_items(state.ptr(), state_items_)) {
      return "the optimizer's state changed";
    }
    for (const Held& h : held_) {
      if (!h.t.has_storage() || address(h.t) != h.addr || h.t.numel() != h.numel ||
          h.t.scalar_type() != h.dtype) {
        return "a parameter or state tensor moved";
      }
    }
    for (Watched& w : watched_) {
      if (w.slot >= 0 && w.state && !same_items(w.state.ptr(), w.entries)) {
        return "a parameter's state changed";
      }
      std::string why = grad_of(w);
      if (!why.empty()) return why;
    }
    collected_ = true;
    return "";
  }

  // Drops the plan's references to this step's grads (called after every step): a grad must be
  // freed when the model lets go of it (zero_grad(set_to_none=True)), not kept until next step.
  void release() {
    for (Work& w : works_) std::fill(w.grads.begin(), w.grads.end(), at::Tensor());
    collected_ = false;
  }

  // Steps run without the op's per-tensor checks (see run()): for tests and benchmarks.
  int64_t trusted_runs() const { return trusted_runs_; }

  // Whether work w's grad addresses differ from those grad_addrs() last handed out (for the
  // tables): collected grads in new memory, even if a step in between collected and never ran.
  bool grads_changed(int64_t w) const { return works_.at(w).grads_changed; }
  at::Tensor grad_addrs(int64_t w) {
    works_.at(w).grads_changed = false;
    return works_.at(w).grad_addrs;
  }

  py::list grads(int64_t w) const {
    py::list out;
    for (const at::Tensor& g : works_.at(w).grads) out.append(py::cast(g));
    return out;
  }

  // One step of `optimizer` (layout.h's OPT_*) over work w's tensors and the given tables, its
  // tensors using the state slots state_mask (the op's arguments).
  void run(int64_t w, int64_t optimizer, const at::Tensor& tmeta,
           const at::Tensor& grads_meta, const at::Tensor& chunks, const at::Tensor& hyper,
           const at::Tensor& gptr, const at::Tensor& glr, const at::Tensor& scal,
           const at::Tensor& partials, const at::Tensor& clip, std::vector<int64_t> bucket_dtypes,
           std::vector<int64_t> bucket_offsets, int64_t chunk_size,
           const std::optional<at::Tensor>& grad_scale,
           const std::optional<at::Tensor>& found_inf, std::optional<double> max_norm,
           int64_t state_mask, int64_t stream) {
    Work& k = works_.at(w);
    const unsigned slots = fusedopt::check_optimizer(optimizer, state_mask);
    const at::Tensor* tables[] = {&tmeta, &grads_meta, &chunks,   &hyper, &gptr,
                                  &glr,   &scal,       &partials, &clip};
    if (tmeta.device().is_cpu()) {
      const fusedopt::StepArgs a{k.params,   k.states,       k.steps,       k.counters,
                                 k.grads,    tmeta,          grads_meta,    chunks,
                                 hyper,      gptr,           glr,           scal,
                                 partials,   clip,           bucket_dtypes, bucket_offsets,
                                 chunk_size, grad_scale,     found_inf,     max_norm};
      if (unchanged_since_checked(k, optimizer, state_mask, tables, a)) {
        // Everything the op's per-tensor checks look at is as a checked call saw it (the
        // tables' contents and the tensors they name: collect() checked those), except the
        // grads, whose addresses collect() took from grads it checked itself.
        ++trusted_runs_;
        fusedopt::cpu::run(a, optimizer, slots);
        return;
      }
    }
    k.verified.valid = false;
    static auto handle = typed_op<void(FUSEDOPT_STEP_PARAMS, int64_t, int64_t, int64_t)>("step");
    handle.call(k.params, k.states, k.steps, k.counters, k.grads, tmeta, grads_meta, chunks, hyper,
                gptr, glr, scal, partials, clip, bucket_dtypes, bucket_offsets, chunk_size,
                grad_scale, found_inf, max_norm, optimizer, state_mask, stream);
    if (tmeta.device().is_cpu() && collected_) {  // the op checked all of it: remember what
      Verified& v = k.verified;
      v.optimizer = optimizer;
      v.state_mask = state_mask;
      v.tables.clear();
      for (const at::Tensor* t : tables) v.tables.push_back(t->unsafeGetTensorImpl());
      v.tmeta = tmeta.clone();
      v.chunks = chunks.clone();
      v.gptr = gptr.clone();
      v.used = used_by_group(optimizer, slots, hyper);
      v.dtypes = bucket_dtypes;
      v.offsets = bucket_offsets;
      v.chunk_size = chunk_size;
      v.valid = true;
    }
  }

 private:
  // Reads w's grad into its work and slot; "" or why the plan no longer holds.
  std::string grad_of(Watched& w) {
    static const py::handle grad_key = interned_str("grad"),
                            local_key = interned_str("_local_tensor");
    const at::Tensor* g = nullptr;
    py::object keep;  // DTensor: the local grad object, alive while g is read
    if (w.local.is_none()) {
      const at::Tensor& grad = THPVariable_Unpack(w.param.ptr()).grad();
      if (grad.defined()) g = &grad;
    } else {
      py::object local = w.param.attr(local_key);
      if (local.ptr() != w.local.ptr()) return "a parameter's local shard was replaced";
      py::object dgrad = w.param.attr(grad_key);
      if (!dgrad.is_none()) {
        keep = dgrad.attr(local_key);
        if (!THPVariable_Check(keep.ptr())) return "a grad is not a tensor";
        g = &THPVariable_Unpack(keep.ptr());
      }
    }
    if (w.slot < 0) return g == nullptr ? "" : "a parameter gained a grad";
    if (g == nullptr) return "a parameter lost its grad";
    const at::Tensor& p = w.layout;
    if (g->layout() != at::kStrided || g->scalar_type() != p.scalar_type() ||
        g->device() != p.device() || g->sizes() != p.sizes() ||
        (p.numel() > 1 && g->strides() != p.strides()) || !g->has_storage()) {
      return "a grad's layout changed";
    }
    Work& work = works_[w.work];
    const int64_t a = address(*g);
    int64_t* addrs = work.grad_addrs.data_ptr<int64_t>();
    if (addrs[w.slot] != a) {
      addrs[w.slot] = a;
      work.grads_changed = true;
    }
    work.grads[w.slot] = *g;
    return "";
  }

  // True when a checked call of the op saw what this call would run on: the same table tensors
  // with the same contents (the hyperparameter values aside, except for each group's lr mode and
  // the state slots its options select, which decide what the kernels read), the same buckets, and the grads' addresses collect() checked,
  // collected in this step (so every tensor the tables name is where the checked call saw it).
  bool unchanged_since_checked(const Work& k, int64_t optimizer, int64_t state_mask,
                               const at::Tensor* const* tables,
                               const fusedopt::StepArgs& a) const {
    const Verified& v = k.verified;
    if (!v.valid || !collected_ || v.optimizer != optimizer || v.state_mask != state_mask ||
        v.chunk_size != a.chunk_size || v.dtypes != std::vector<int64_t>(a.bucket_dtypes.begin(),
                                                                         a.bucket_dtypes.end()) ||
        v.offsets !=
            std::vector<int64_t>(a.bucket_offsets.begin(), a.bucket_offsets.end())) {
      return false;
    }
    for (size_t i = 0; i < v.tables.size(); ++i) {
      if (tables[i]->unsafeGetTensorImpl() != v.tables[i]) return false;
    }
    a.check_tables();  // shapes and dtypes (cheap: no per-tensor work), GradScaler's scalars
    return same_contents(a.tmeta, v.tmeta) && same_contents(a.chunks, v.chunks) &&
           same_contents(a.gptr, v.gptr) && same_contents(a.grads_meta, k.grad_addrs) &&
           used_by_group(optimizer, static_cast<unsigned>(state_mask), a.hyper) == v.used;
  }

  bool collected_ = false;  // collect() succeeded this step (release() clears it)
  int64_t trusted_runs_ = 0;
  py::object groups_, state_;
  std::vector<py::object> group_dicts_, group_lists_;
  std::vector<size_t> group_sizes_;
  std::vector<std::pair<py::object, py::object>> state_items_;
  std::vector<Watched> watched_;
  std::vector<Held> held_;
  std::vector<Work> works_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<StepPlan>(m, "StepPlan")
      .def(py::init<py::list, py::dict, py::list, py::list>())
      .def("collect", &StepPlan::collect)
      .def("release", &StepPlan::release)
      .def("trusted_runs", &StepPlan::trusted_runs)
      .def("grads_changed", &StepPlan::grads_changed)
      .def("grad_addrs", &StepPlan::grad_addrs)
      .def("grads", &StepPlan::grads)
      .def("run", &StepPlan::run);
}
