// Adam's update loops (update_loops.h), in a translation unit of their own.
#include "update_loops.h"

template struct fusedopt::cpu::UpdatePass<fusedopt::Adam>;
