// The scalar math of a step that every native kernel shares (torch-free; host and device): a
// group's lr (float, tensor, Noam or a schedule), step counts, the clip coefficient, integer
// powers (each optimizer's per-tensor scalars are in fusedopt/optim/*.h). The Triton prologue in
// kernels/ computes the same values with the same float64 formulas.
#pragma once
#include <cmath>
#include <cstdint>

#include "fusedopt/layout.h"

#ifdef __CUDACC__
#define FUSEDOPT_HD __host__ __device__ __forceinline__
#else
#define FUSEDOPT_HD inline
#endif

namespace fusedopt {

// base**n for integer-valued n >= 0, by squaring (float64: 1 - beta2**t keeps its digits, as in
// torch.optim's host-side Python arithmetic).
FUSEDOPT_HD double pow_int(double base, int64_t n) {
  double result = 1.0;
  for (; n > 0; n >>= 1) {
    if (n & 1) result *= base;
    base *= base;
  }
  return result;
}

// f(u) of an LR_SCHEDULE (layout.h's SP_* vector p; u = t - 1, the number of updates before this
// one): the lambda of transformers' schedule function, or torch's ExponentialLR / MultiStepLR in
// closed form (fusedopt/schedules.py, whose torch ops are the reference). The same float64
// operations in the same order as transformers' Python, so that lr * f(u) is its lr: x / max(1, n)
// of whole numbers, ((pi * cycles) * 2) * progress, factor * (1 - r) + r in two roundings.
FUSEDOPT_HD double schedule_warmup_shape(int shape, double x) {  // wsd's shapes, x in [0, 1]
  if (shape == SHAPE_COSINE) return 0.5 * (1.0 - cos(M_PI * x));
  if (shape == SHAPE_1_SQRT) return 1.0 - sqrt(1.0 - x);
  return x;
}

FUSEDOPT_HD double schedule_decay_shape(int shape, double x, double cycles) {
  if (shape == SHAPE_COSINE) return 0.5 * (1.0 + cos(M_PI * cycles * 2.0 * x));
  if (shape == SHAPE_1_SQRT) return 1.0 - sqrt(x);
  return 1.0 - x;
}

FUSEDOPT_HD double schedule_factor(const double* p, double u) {
  const int kind = static_cast<int>(p[SP_KIND]);
  const double w = p[SP_WARMUP];
  const double a = p[SP_A], b = p[SP_B], c = p[SP_C];
  if (kind == SK_EXPONENTIAL) return pow_int(a, static_cast<int64_t>(u));
  if (kind == SK_MULTISTEP) {
    int64_t k = 0;  // bisect_right: the milestones <= u
    const int64_t n = static_cast<int64_t>(p[SP_N]);
    for (int64_t j = 0; j < n; ++j) k += p[SP_MILESTONES + j] <= u ? 1 : 0;
    return pow_int(a, k);
  }
  if (kind == SK_WSD) {  // a: stable, b: decay, c / d: shapes, e: min ratio, f: cycles
    const double r = p[SP_E];
    if (u < w) {
      const double f = schedule_warmup_shape(static_cast<int>(c), u / fmax(1.0, w));
      return fmax(0.0, f * (1.0 - r) + r);
    }
    if (u < w + a) return 1.0;
    if (u < w + a + b) {
      const double x = (u - w - a) / fmax(1.0, b);
      const double f = schedule_decay_shape(static_cast<int>(p[SP_D]), x, p[SP_F]);
      return fmax(0.0, f * (1.0 - r) + r);
    }
    return r;
  }
  if (u < w) return u / fmax(1.0, w);  // every other kind warms up linearly from 0
  switch (kind) {
    case SK_LINEAR:  // a: total
      return fmax(0.0, (a - u) / fmax(1.0, a - w));
    case SK_COSINE: {  // a: total, b: cycles, c: min_lr / lr
      const double progress = (u - w) / fmax(1.0, a - w);
      const double f = 0.5 * (1.0 + cos(M_PI * b * 2.0 * progress));
      return fmax(0.0, f * (1.0 - c) + c);
    }
    case SK_COSINE_RESTARTS: {  // a: total, b: cycles
      const double progress = (u - w) / fmax(1.0, a - w);
      if (progress >= 1.0) return 0.0;
      const double x = b * progress;
      return fmax(0.0, 0.5 * (1.0 + cos(M_PI * (x - floor(x)))));
    }
    case SK_POLYNOMIAL: {  // a: total, b: end lr, c: power, d: initial lr
      const double lr_init = p[SP_D];
      if (u > a) return b / lr_init;
      const double remaining = 1.0 - (u - w) / (a - w);
      return ((lr_init - b) * pow(remaining, c) + b) / lr_init;
    }
    case SK_INVERSE_SQRT:  // a: timescale
      return 1.0 / sqrt((u + (a - w)) / a);
    default:  // SK_CONSTANT
      return 1.0;
  }
}

// One group's lr for this step (h: its row of the hyper table, ptrs: of the gptr table): the
// float lr, the float32 tensor lr read through its address, or, after adding one to the group's
// float32 counter t, the Noam rate scale * min(t^-1/2, t * warmup^-1.5) or a schedule's
// h[H_LR] * f(t - 1).
FUSEDOPT_HD double group_lr(const double* h, const int64_t* ptrs) {
  const double mode = h[H_MODE];
  if (mode == LR_TENSOR) return *reinterpret_cast<const float*>(ptrs[G_LR_PTR]);
  if (mode != LR_NOAM && mode != LR_SCHEDULE) return h[H_LR];
  float* counter = reinterpret_cast<float*>(ptrs[G_COUNTER_PTR]);
  const float count = *counter + 1.0f;
  *counter = count;
  if (mode == LR_SCHEDULE) {
    const double* p = reinterpret_cast<const double*>(ptrs[G_SCHED_PTR]);
    return h[H_LR] * schedule_factor(p, static_cast<double>(count) - 1.0);
  }
  const double t = fmax(static_cast<double>(count), 1.0);
  return h[H_NOAM_SCALE] * fmin(1.0 / sqrt(t), t * h[H_NOAM_WARMUP]);
}

// Adds one to a tensor's float32 step (as torch.optim keeps it); returns the new step.
FUSEDOPT_HD int64_t advance_step(const int64_t* tmeta_row) {
  float* step = reinterpret_cast<float*>(tmeta_row[T_STEP]);
  const float next = *step + 1.0f;
  *step = next;
  return static_cast<int64_t>(next);
}

// torch.nn.utils.clip_grad_norm_'s coefficient min(1, max_norm / (norm + 1e-6)) in float32, from
// the global sum of squares; writes (coefficient, norm) to clip (layout.h's CLIP_COEF, CLIP_NORM).
FUSEDOPT_HD void clip_from_sumsq(double sumsq, float max_norm, float* clip) {
  const float norm = static_cast<float>(sqrt(sumsq));
  const float coef = max_norm / (norm + 1e-6f);
  clip[CLIP_COEF] = coef != coef ? coef : fminf(coef, 1.0f);  // clamp(max=1) keeps a NaN
  clip[CLIP_NORM] = norm;
}

}  // namespace fusedopt
