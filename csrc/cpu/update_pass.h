// How update.cpp reaches an optimizer's update loops. Each optimizer's are compiled in a
// translation unit of their own (update_<name>.cpp instantiates UpdatePass<Opt> from
// update_loops.h), so that a build compiles the optimizers in parallel: as one file, the loops
// were the longest compile of the build (issue 22).
#pragma once
#include <cstdint>

#include "kernels.h"

namespace fusedopt::cpu {

template <class Opt>
struct UpdatePass {
  // kernels.h's update_chunks for Opt.
  static void run(int64_t bucket, unsigned slots, const int64_t* tmeta, const int64_t* grads,
                  const float* scal, const int64_t* chunks, int64_t begin, int64_t end,
                  int64_t chunk_size, GradIn grad_in);
};

}  // namespace fusedopt::cpu
