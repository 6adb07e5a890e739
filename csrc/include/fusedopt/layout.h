// Column layout of the metadata tables every fusedopt kernel reads. Mirrors fusedopt/_layout.py
// (tests/test_native_layout.py checks that they agree). Torch-free: CUDA and CPU kernels include it.
#pragma once
#include <cstdint>

namespace fusedopt {

// the optimizers, as the ops' `optimizer` argument names them (csrc/include/fusedopt/optim/)
constexpr int OPT_ADAM = 0, OPT_RMSPROP = 1, OPT_SGD = 2;

// how a group's lr is obtained
constexpr int LR_FLOAT = 0, LR_TENSOR = 1, LR_NOAM = 2, LR_SCHEDULE = 3;

// per tensor, int64 [T, TMETA_WIDTH]
constexpr int T_PARAM = 0, T_S0 = 1, T_S1 = 2, T_S2 = 3, T_STEP = 4, T_NUMEL = 5, T_GROUP = 6,
              T_SHADOW = 7;
// 8-bit state (a bucket's state dtype DTYPE_UINT8): the float32 absmax per QBLOCK elements of each
// slot (fusedopt/quant8.h)
constexpr int T_A0 = 8, T_A1 = 9, T_A2 = 10;
// a compressed master's error term (int8 or int16: fusedopt/master.h), 0 without
constexpr int T_ERR = 11;
constexpr int TMETA_WIDTH = 12;
constexpr int QBLOCK = 256;

// per group, int64 [G, GPTR_WIDTH]
constexpr int G_LR_PTR = 0, G_COUNTER_PTR = 1, G_SCHED_PTR = 2;
constexpr int GPTR_WIDTH = 3;

// LR_SCHEDULE (fusedopt/schedules.py): the group's lr of update t is H_LR * f(t - 1), f given by a
// float64 vector at G_SCHED_PTR: its kind, the warmup steps, six parameters whose meaning depends
// on the kind (step_math.h's schedule_factor), then a count and that many milestones (multistep).
constexpr int SP_KIND = 0, SP_WARMUP = 1, SP_A = 2, SP_B = 3, SP_C = 4, SP_D = 5, SP_E = 6,
              SP_F = 7, SP_N = 8, SP_MILESTONES = 9;
constexpr int SK_CONSTANT = 1, SK_LINEAR = 2, SK_COSINE = 3, SK_COSINE_RESTARTS = 4,
              SK_POLYNOMIAL = 5, SK_INVERSE_SQRT = 6, SK_WSD = 7, SK_EXPONENTIAL = 8,
              SK_MULTISTEP = 9;
// the warm-up and decay shapes of wsd
constexpr int SHAPE_LINEAR = 0, SHAPE_COSINE = 1, SHAPE_1_SQRT = 2;

// per group, float64 [G, HYPER_WIDTH]
constexpr int H_LR = 0, H_MODE = 1, H_NOAM_SCALE = 2, H_NOAM_WARMUP = 3;
constexpr int HYPER_WIDTH = 12;
namespace adam_col {
constexpr int beta1 = 4, beta2 = 5, eps = 6, weight_decay = 7, amsgrad = 8, maximize = 9,
              decoupled = 10;
}
namespace rmsprop_col {
constexpr int alpha = 4, eps = 5, weight_decay = 6, momentum = 7, centered = 8, maximize = 9;
}
namespace sgd_col {
constexpr int momentum = 4, dampening = 5, weight_decay = 6, nesterov = 7, maximize = 8;
}

// per tensor scalars written by the step prologue, float32 [T, SCAL_WIDTH]
constexpr int SCAL_WIDTH = 12;
namespace adam_scal {
constexpr int step_size = 0, bc2_sqrt = 1, p_mul = 2, g_wd = 3, w1 = 4, beta2 = 5, w2 = 6, eps = 7,
              sign = 8, amsgrad = 9, seed = 10;
}
namespace rmsprop_scal {
constexpr int lr = 0, alpha = 1, w = 2, eps = 3, weight_decay = 4, momentum = 5, sign = 6,
              centered = 7, seed = 8;
}
namespace sgd_scal {
constexpr int lr = 0, momentum = 1, w = 2, weight_decay = 3, sign = 4, nesterov = 5, first = 6,
              seed = 7;
}

// the per-device clip buffer, float32 [2]: the coefficient grads are multiplied by, the norm
constexpr int CLIP_COEF = 0, CLIP_NORM = 1;

// Clipping's float32 partials buffer [partials_numel(n_chunks)]: one sum of squares per chunk,
// then, from float clip_stage_offset(n_chunks) (an even index: 8-byte aligned), one float64 per
// CLIP_PER_BLOCK chunks, the first stage of the norm's reduction (chunk sums added in a fixed
// order); the prologue adds those.
constexpr int CLIP_PER_BLOCK = 4096;
constexpr int64_t clip_stage_blocks(int64_t n_chunks) {
  return n_chunks > CLIP_PER_BLOCK ? (n_chunks + CLIP_PER_BLOCK - 1) / CLIP_PER_BLOCK : 1;
}
constexpr int64_t clip_stage_offset(int64_t n_chunks) {
  return n_chunks > 1 ? (n_chunks + 1) / 2 * 2 : 2;
}
constexpr int64_t partials_numel(int64_t n_chunks) {
  return clip_stage_offset(n_chunks) + 2 * clip_stage_blocks(n_chunks);
}

// dtype codes
constexpr int DTYPE_FLOAT32 = 0, DTYPE_BFLOAT16 = 1, DTYPE_FLOAT16 = 2, DTYPE_UINT8 = 3;

// A bucket as one int: param | grad << 2 | state << 4 | shadow << 6 | stochastic << 7. param is the
// dtype of the tensor the update reads and writes (the fp32 master when there is one), grad that
// of the grads (and of the model's parameter a master is rounded into: the shadow), state that of
// the optimizer state; stochastic: the (bf16) parameter is stored with stochastic rounding.
constexpr int BUCKET_GRAD_SHIFT = 2, BUCKET_STATE_SHIFT = 4, BUCKET_SHADOW_BIT = 6,
              BUCKET_STOCHASTIC_BIT = 7;
// | error << BUCKET_ERROR_SHIFT: a compressed master's error term, 1 int8, 2 int16 (0: none)
constexpr int BUCKET_ERROR_SHIFT = 8;

}  // namespace fusedopt
