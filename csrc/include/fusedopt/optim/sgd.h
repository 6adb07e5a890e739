// SGD with momentum, dampening, Nesterov and weight decay: the one definition of its math that
// the CPU and CUDA kernels compile (kernels/sgd.py is the Triton twin,
// fusedopt/backends/reference.py's the torch-ops one).
//
// Per element, in float32 (torch.optim.SGD's math, in its order of operations):
// g = -g (maximize); g += wd*p; with momentum: buf = g on the tensor's first update, else
// buf = momentum*buf + (1-dampening)*g; g = g + momentum*buf (nesterov) or buf;
// p -= lr*g.
// State slot 0: momentum_buffer (momentum != 0). The step the prologue advances is fusedopt's
// own (not in the state, as torch.optim.SGD keeps none): it says which update is the first, and
// seeds stochastic rounding.
#pragma once
#include <cstdint>

#include "fusedopt/element_math.h"
#include "fusedopt/layout.h"
#include "fusedopt/step_math.h"

namespace fusedopt {

struct Sgd {
  static constexpr int kId = OPT_SGD;
  static constexpr int kSeed = sgd_scal::seed;
  // 8-bit state: the slots quantized with the signed map (momentum_buffer); the others, unsigned
  static constexpr unsigned kSignedSlots = 0b001u;
  // Args::on bits; bit 0 is the option that uses state slot 0.
  static constexpr unsigned kMomentum = 1u << 0, kNesterov = 1u << 3, kL2 = 1u << 4,
                            kFirst = 1u << 5;
  static constexpr unsigned kAlways = 0u;
  static constexpr unsigned kOptions = kMomentum | kNesterov | kL2 | kFirst;
  // Nesterov and the first update mean something only with momentum.
  FUSEDOPT_HD static constexpr unsigned canonical(unsigned on) {
    return on & kMomentum ? on : on & ~(kNesterov | kFirst);
  }

  FUSEDOPT_HD static void scalars(const double* h, double lr, int64_t step, float* s) {
    s[sgd_scal::lr] = static_cast<float>(lr);
    s[sgd_scal::momentum] = static_cast<float>(h[sgd_col::momentum]);
    s[sgd_scal::w] = static_cast<float>(1.0 - h[sgd_col::dampening]);
    s[sgd_scal::weight_decay] = static_cast<float>(h[sgd_col::weight_decay]);
    s[sgd_scal::sign] = h[sgd_col::maximize] != 0.0 ? -1.0f : 1.0f;
    s[sgd_scal::nesterov] = static_cast<float>(h[sgd_col::nesterov]);
    s[sgd_scal::first] = step == 1 ? 1.0f : 0.0f;
    s[sgd_scal::seed] = static_cast<float>(step);  // stochastic rounding's seed
  }

  struct Args {
    float neg_lr, momentum, w, wd, sign;
    unsigned on;
    FUSEDOPT_HD explicit Args(const float* s)
        : neg_lr(-s[sgd_scal::lr]),
          momentum(s[sgd_scal::momentum]),
          w(s[sgd_scal::w]),
          wd(s[sgd_scal::weight_decay]),
          sign(s[sgd_scal::sign]),
          on(canonical((s[sgd_scal::momentum] != 0.0f ? kMomentum : 0u) |
                       (s[sgd_scal::nesterov] != 0.0f ? kNesterov : 0u) |
                       (s[sgd_scal::weight_decay] != 0.0f ? kL2 : 0u) |
                       (s[sgd_scal::first] != 0.0f ? kFirst : 0u))) {}
  };

  template <unsigned ON, class Io>
  FUSEDOPT_HD static void update(const Args& a, const Io& io) {
    constexpr int N = Io::N;
    const bool momentum = is_on<ON, kMomentum>(a.on), nesterov = is_on<ON, kNesterov>(a.on);
    const bool l2 = is_on<ON, kL2>(a.on), first = is_on<ON, kFirst>(a.on);
    float rp[N], rg[N];
    io.param(rp);
    io.grad(rg);
    FUSEDOPT_UNROLL
    for (int k = 0; k < N; ++k) {
      rg[k] = rg[k] * a.sign;
      if (l2) rg[k] = fma_rn(rp[k], a.wd, rg[k]);
    }
    if (momentum) {
      float rbuf[N];
      if (!first) io.template load<0>(rbuf);
      FUSEDOPT_UNROLL
      for (int k = 0; k < N; ++k) {
        rbuf[k] = first ? rg[k] : fma_rn(rg[k], a.w, rbuf[k] * a.momentum);
        rg[k] = nesterov ? fma_rn(rbuf[k], a.momentum, rg[k]) : rbuf[k];
      }
      io.template store<0>(rbuf);
    }
    FUSEDOPT_UNROLL
    for (int k = 0; k < N; ++k) rp[k] = fma_rn(rg[k], a.neg_lr, rp[k]);
    io.store_param(rp);
  }
};

}  // namespace fusedopt
