// One CPU step over arguments that have been checked: the ops of csrc/binding.cpp run these after
// their checks, and fusedopt._C.StepPlan (csrc/plan.cpp) after showing that nothing those checks
// looked at has changed since a checked call.
#pragma once
#include "fusedopt/step_args.h"

namespace fusedopt::cpu {

// Which state slots the kernels touch for a tensor of the group whose hyperparameter row is `h`
// (bit k: slot T_S0 + k), as the kernels decide it.
unsigned adam_used_states(const double* h, bool has_amsgrad);
unsigned rmsprop_used_states(const double* h, bool has_centered, bool has_momentum);

// The step itself, after StepArgs::check_layout, check_contents and the bucket check.
void adam_run(const StepArgs& a, bool has_amsgrad);
void rmsprop_run(const StepArgs& a, bool has_centered, bool has_momentum);

}  // namespace fusedopt::cpu
