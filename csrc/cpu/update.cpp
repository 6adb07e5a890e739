// The step's prologue and the dispatch of its update pass on the CPU, for every optimizer: each
// optimizer's update loops are compiled in update_<name>.cpp (update_loops.h, through
// update_pass.h's UpdatePass). Torch-free.
#include "fusedopt/optim/all.h"
#include "kernels.h"
#include "multi_tensor.h"
#include "update_pass.h"

namespace fusedopt::cpu {
namespace {

template <class Opt>
void prologue_of(const int64_t* tmeta, int64_t n_tensors, const double* hyper,
                 const int64_t* gptr, double* glr, int64_t n_groups, float* scal) {
  resolve_group_lrs(hyper, gptr, glr, n_groups);
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t* row = tmeta + t * TMETA_WIDTH;
    const int64_t step = advance_step(row);
    const int64_t g = row[T_GROUP];
    Opt::scalars(hyper + g * HYPER_WIDTH, glr[g], step, scal + t * SCAL_WIDTH);
  }
}

}  // namespace

bool optimizer_known(int64_t optimizer) {
  return with_optimizer(optimizer, [](auto) {});
}

unsigned used_slots(int64_t optimizer, const double* h, unsigned slots) {
  unsigned used = 0;
  with_optimizer(optimizer, [&](auto opt) { used = fusedopt::used_slots<decltype(opt)>(h, slots); });
  return used;
}

void prologue(int64_t optimizer, const int64_t* tmeta, int64_t n_tensors, const double* hyper,
              const int64_t* gptr, double* glr, int64_t n_groups, float* scal) {
  with_optimizer(optimizer, [&](auto opt) {
    prologue_of<decltype(opt)>(tmeta, n_tensors, hyper, gptr, glr, n_groups, scal);
  });
}

void update_chunks(int64_t optimizer, int64_t bucket, unsigned slots, const int64_t* tmeta,
                   const int64_t* grads, const float* scal, const int64_t* chunks, int64_t begin,
                   int64_t end, int64_t chunk_size, GradIn grad_in) {
  with_optimizer(optimizer, [&](auto opt) {
    UpdatePass<decltype(opt)>::run(bucket, slots, tmeta, grads, scal, chunks, begin, end,
                                   chunk_size, grad_in);
  });
}

}  // namespace fusedopt::cpu
