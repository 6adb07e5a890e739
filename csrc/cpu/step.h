// One CPU step over arguments that have been checked: the ops of csrc/binding.cpp run these after
// their checks, and fusedopt._C.StepPlan (csrc/plan.cpp) after showing that nothing those checks
// looked at has changed since a checked call.
#pragma once
#include "fusedopt/step_args.h"

namespace fusedopt::cpu {

// The step itself (layout.h's OPT_* optimizer, over tensors that use the state slots `slots`),
// after StepArgs::check_layout, check_contents and the bucket check.
void run(const StepArgs& a, int64_t optimizer, unsigned slots);

}  // namespace fusedopt::cpu
