"""Column layout of the metadata tables every backend reads (one place, so the kernels agree).

Per tensor, int64 ``[T, TMETA_WIDTH]``: addresses of the parameter (the fp32 master when there is
one), its three state slots and its step, its element count, its param-group index, and the model's
low-precision parameter that a master is rounded into (0 without a master). Grads live in their
own int64 ``[T]`` table, since their storage changes more often than the rest.

Per group, float64 ``[G, HYPER_WIDTH]``: the lr (float mode), the lr mode, the Noam constants, then
the optimizer's own hyperparameters. Int64 ``[G, GPTR_WIDTH]``: the address of a tensor lr and of
the Noam counter (0 where unused).
"""

from typing import NamedTuple

# the optimizers, as the native op's ``optimizer`` argument names them (fusedopt/optim/*.h)
OPTIMIZERS = {"adam": 0, "rmsprop": 1, "sgd": 2}

# how a group's lr is obtained
LR_FLOAT, LR_TENSOR, LR_NOAM, LR_SCHEDULE = 0, 1, 2, 3

# per tensor
T_PARAM, T_S0, T_S1, T_S2, T_STEP, T_NUMEL, T_GROUP, T_SHADOW = range(8)
# 8-bit state (a bucket's state dtype uint8): the float32 absmax per QBLOCK elements of each slot
T_A0, T_A1, T_A2 = 8, 9, 10
# a compressed master's error term (int8 or int16: fusedopt/_master.py), 0 without
T_ERR = 11
TMETA_WIDTH = 12
QBLOCK = 256  # fusedopt/quant8.py's BLOCK: every chunk size is a multiple of it

# per group, pointers
G_LR_PTR, G_COUNTER_PTR, G_SCHED_PTR = range(3)
GPTR_WIDTH = 3

# LR_SCHEDULE (fusedopt.schedules): the group's lr of update t is H_LR * f(t - 1), f given by a
# float64 vector on the device at G_SCHED_PTR: its kind, the warmup steps, six parameters whose
# meaning depends on the kind (schedules.py), then a count and that many milestones (multistep).
SP_KIND, SP_WARMUP, SP_A, SP_B, SP_C, SP_D, SP_E, SP_F, SP_N, SP_MILESTONES = range(10)
SK_CONSTANT, SK_LINEAR, SK_COSINE, SK_COSINE_RESTARTS, SK_POLYNOMIAL = 1, 2, 3, 4, 5
SK_INVERSE_SQRT, SK_WSD, SK_EXPONENTIAL, SK_MULTISTEP = 6, 7, 8, 9
# the warm-up and decay shapes of wsd
SHAPE_LINEAR, SHAPE_COSINE, SHAPE_1_SQRT = 0, 1, 2

# per group, values
H_LR, H_MODE, H_NOAM_SCALE, H_NOAM_WARMUP = range(4)
HYPER_WIDTH = 12
ADAM_COLS = {
    "beta1": 4,
    "beta2": 5,
    "eps": 6,
    "weight_decay": 7,
    "amsgrad": 8,
    "maximize": 9,
    "decoupled": 10,
}
RMSPROP_COLS = {
    "alpha": 4,
    "eps": 5,
    "weight_decay": 6,
    "momentum": 7,
    "centered": 8,
    "maximize": 9,
}
SGD_COLS = {
    "momentum": 4,
    "dampening": 5,
    "weight_decay": 6,
    "nesterov": 7,
    "maximize": 8,
}

# per tensor scalars the step prologue writes and the main pass reads (float32 [T, SCAL_WIDTH])
SCAL_WIDTH = 12
ADAM_SCAL = (
    "step_size",
    "bc2_sqrt",
    "p_mul",
    "g_wd",
    "w1",
    "beta2",
    "w2",
    "eps",
    "sign",
    "amsgrad",
    "seed",  # the step, as float: stochastic rounding's seed
)
RMSPROP_SCAL = ("lr", "alpha", "w", "eps", "weight_decay", "momentum", "sign", "centered", "seed")
# first: 1 on a tensor's first update (its momentum buffer starts as the gradient, as in torch)
SGD_SCAL = ("lr", "momentum", "w", "weight_decay", "sign", "nesterov", "first", "seed")

# the per-device clip buffer (float32 [2]): the coefficient the update multiplies grads by, and the
# global grad norm (for logging)
CLIP_COEF, CLIP_NORM = 0, 1

# clipping's float32 partials buffer [partials_numel(n_chunks)]: one sum of squares per chunk, then
# (from an even index: 8-byte aligned) one float64 per CLIP_PER_BLOCK chunks, the first stage of
# the norm's reduction; the prologue adds those (layout.h, the same functions)
CLIP_PER_BLOCK = 4096


def clip_stage_blocks(n_chunks):
    return max(1, -(-n_chunks // CLIP_PER_BLOCK))


def clip_stage_offset(n_chunks):
    return max(2, (n_chunks + 1) // 2 * 2)


def partials_numel(n_chunks):
    return clip_stage_offset(n_chunks) + 2 * clip_stage_blocks(n_chunks)


# dtype codes of the native kernels
DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2, "uint8": 3}  # uint8: 8-bit state


class Bucket(NamedTuple):
    """What one fused pass specializes on: the dtypes of the updated parameter (the fp32 master
    when there is one), of the grads and of the state; whether a rounded copy goes back to the
    model's parameter; whether the parameter is stored with stochastic rounding."""

    param: object  # torch.dtype
    grad: object
    state: object
    shadow: bool
    stochastic: bool
    # a compressed master (master_weights="int8"/"int16"): the bits of the error term kept beside
    # the bf16 parameter (fusedopt/quant8.py's master_scale), 0 without
    error: int = 0

    @property
    def eight_bit(self):
        """8-bit state: uint8 codes plus a float32 absmax per block (fusedopt/quant8.py)."""
        return str(self.state) == "torch.uint8"


# A bucket as the native kernels receive it, one int:
# param | grad << 2 | state << 4 | shadow << 6 | stochastic << 7 (dtype codes above).
BUCKET_GRAD_SHIFT, BUCKET_STATE_SHIFT, BUCKET_SHADOW_BIT, BUCKET_STOCHASTIC_BIT = 2, 4, 6, 7
# | error << 8: a compressed master's error term, 1 int8, 2 int16 (0: none)
BUCKET_ERROR_SHIFT = 8
ERROR_CODES = {0: 0, 8: 1, 16: 2}


def bucket_code(bucket):
    def code(dtype):
        return DTYPE_CODES[str(dtype).removeprefix("torch.")]

    return (
        code(bucket.param)
        | code(bucket.grad) << BUCKET_GRAD_SHIFT
        | code(bucket.state) << BUCKET_STATE_SHIFT
        | int(bucket.shadow) << BUCKET_SHADOW_BIT
        | int(bucket.stochastic) << BUCKET_STOCHASTIC_BIT
        | ERROR_CODES[bucket.error] << BUCKET_ERROR_SHIFT
    )
