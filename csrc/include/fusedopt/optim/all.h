// The optimizers the native kernels have (one header each in this folder: an optimizer's
// per-tensor scalars and per-element update, for the CPU and the CUDA kernels alike), and what
// the shared drivers ask of one beyond its header.
#pragma once
#include "fusedopt/optim/adam.h"
#include "fusedopt/optim/rmsprop.h"
#include "fusedopt/optim/sgd.h"

namespace fusedopt {

// Calls f(Opt{}) for layout.h's OPT_* code `id`; false (f not called) for an unknown one.
template <class F>
bool with_optimizer(int64_t id, F&& f) {
  switch (id) {
    case OPT_ADAM:
      f(Adam{});
      return true;
    case OPT_RMSPROP:
      f(Rmsprop{});
      return true;
    case OPT_SGD:
      f(Sgd{});
      return true;
    default:
      return false;
  }
}

// The Args::on bits a variant is compiled for when the tensors of one call use the state slots
// `slots` (bit k: some tensor uses slot k; the op's state_mask): every option that uses no slot,
// and those of the slots in use.
template <class Opt>
constexpr unsigned compiled_options(unsigned slots) {
  return Opt::kOptions & (~0b111u | slots);
}

// The state slots a tensor of the group whose hyper row is `h` uses (bit k: slot k), as the
// kernels decide it from its scalars, in a call over `slots`.
template <class Opt>
unsigned used_slots(const double* h, unsigned slots) {
  float s[SCAL_WIDTH];
  Opt::scalars(h, 0.0, 2, s);  // an update after the first: the options alone decide
  const unsigned on = typename Opt::Args(s).on & compiled_options<Opt>(slots);
  return Opt::kAlways | (on & 0b111u);
}

}  // namespace fusedopt
