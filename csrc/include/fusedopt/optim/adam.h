// Adam and AdamW: the one definition of their math that the CPU and CUDA kernels compile
// (kernels/adam.py is the Triton twin, fusedopt/backends/reference.py's the torch-ops one).
//
// Per element, in float32 (torch.optim's math, in its order of operations):
// g = -g (maximize); p *= 1 - lr*wd (decoupled) or g += wd*p (L2); m = lerp(m, g, 1-b1);
// v = b2*v + (1-b2)*g*g; vmax = max(vmax, v) (amsgrad);
// p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
// State slots: 0 exp_avg, 1 exp_avg_sq, 2 max_exp_avg_sq (amsgrad only).
#pragma once
#include <cstdint>

#include "fusedopt/element_math.h"
#include "fusedopt/layout.h"
#include "fusedopt/step_math.h"

namespace fusedopt {

struct Adam {
  static constexpr int kId = OPT_ADAM;
  static constexpr int kSeed = adam_scal::seed;
  // 8-bit state: the slots quantized with the signed map (exp_avg); the others, unsigned
  static constexpr unsigned kSignedSlots = 0b001u;
  // Args::on bits; a bit below 3 is the option that uses that state slot.
  static constexpr unsigned kAmsgrad = 1u << 2, kL2 = 1u << 3;
  static constexpr unsigned kAlways = 0b011u;  // the slots every tensor uses
  static constexpr unsigned kOptions = kAmsgrad | kL2;
  FUSEDOPT_HD static constexpr unsigned canonical(unsigned on) { return on; }

  // The prologue's per-tensor scalars (h: the group's hyper row, lr: its lr this step, step: the
  // tensor's step, just advanced; float64 as torch.optim's host-side Python arithmetic).
  FUSEDOPT_HD static void scalars(const double* h, double lr, int64_t step, float* s) {
    const double beta1 = h[adam_col::beta1], beta2 = h[adam_col::beta2];
    const double wd = h[adam_col::weight_decay];
    const bool decoupled = h[adam_col::decoupled] != 0.0;
    s[adam_scal::step_size] = static_cast<float>(lr / (1.0 - pow_int(beta1, step)));
    s[adam_scal::bc2_sqrt] = static_cast<float>(sqrt(1.0 - pow_int(beta2, step)));
    s[adam_scal::p_mul] = static_cast<float>(decoupled ? 1.0 - lr * wd : 1.0);
    s[adam_scal::g_wd] = static_cast<float>(decoupled ? 0.0 : wd);
    s[adam_scal::w1] = static_cast<float>(1.0 - beta1);
    s[adam_scal::beta2] = static_cast<float>(beta2);
    s[adam_scal::w2] = static_cast<float>(1.0 - beta2);
    s[adam_scal::eps] = static_cast<float>(h[adam_col::eps]);
    s[adam_scal::sign] = h[adam_col::maximize] != 0.0 ? -1.0f : 1.0f;
    s[adam_scal::amsgrad] = static_cast<float>(h[adam_col::amsgrad]);
    s[adam_scal::seed] = static_cast<float>(step);  // stochastic rounding's seed
  }

  // What the update reads, from a tensor's scalars.
  struct Args {
    float neg_step_size, bc2_sqrt, p_mul, g_wd, beta2, w2, eps, sign;
    Lerp lerp_m;
    unsigned on;
    FUSEDOPT_HD explicit Args(const float* s)
        : neg_step_size(-s[adam_scal::step_size]),
          bc2_sqrt(s[adam_scal::bc2_sqrt]),
          p_mul(s[adam_scal::p_mul]),
          g_wd(s[adam_scal::g_wd]),
          beta2(s[adam_scal::beta2]),
          w2(s[adam_scal::w2]),
          eps(s[adam_scal::eps]),
          sign(s[adam_scal::sign]),
          lerp_m(s[adam_scal::w1]),
          on((s[adam_scal::amsgrad] != 0.0f ? kAmsgrad : 0u) |
             (s[adam_scal::g_wd] != 0.0f ? kL2 : 0u)) {}
  };

  template <unsigned ON, class Io>
  FUSEDOPT_HD static void update(const Args& a, const Io& io) {
    constexpr int N = Io::N;
    const bool ams = is_on<ON, kAmsgrad>(a.on), l2 = is_on<ON, kL2>(a.on);
    float rp[N], rg[N], rm[N], rv[N], rmax[N];
    io.param(rp);
    io.grad(rg);
    io.template load<0>(rm);
    io.template load<1>(rv);
    if (ams) io.template load<2>(rmax);
    FUSEDOPT_UNROLL
    for (int k = 0; k < N; ++k) {
      float gk = rg[k] * a.sign;
      const float pk = rp[k] * a.p_mul;
      if (l2) gk = fma_rn(pk, a.g_wd, gk);
      rm[k] = a.lerp_m(rm[k], gk);
      rv[k] = fma_rn(a.w2 * gk, gk, rv[k] * a.beta2);
      float v_used = rv[k];
      if (ams) {
        rmax[k] = maximum(rmax[k], rv[k]);
        v_used = rmax[k];
      }
      const float denom = div_rn(sqrt_rn(v_used), a.bc2_sqrt) + a.eps;
      rp[k] = pk + div_rn(a.neg_step_size * rm[k], denom);
    }
    io.store_param(rp);
    io.template store<0>(rm);
    io.template store<1>(rv);
    if (ams) io.template store<2>(rmax);
  }
};

}  // namespace fusedopt
