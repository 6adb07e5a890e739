// RMSprop: the one definition of its math that the CPU and CUDA kernels compile
// (kernels/rmsprop.py is the Triton twin, fusedopt/backends/reference.py's the torch-ops one).
//
// Per element, in float32 (torch.optim's math, in its order of operations):
// g = -g (maximize); g += wd*p; sq = alpha*sq + (1-alpha)*g*g;
// centered: ga = lerp(ga, g, 1-alpha), avg = sqrt(sq - ga*ga) + eps, else avg = sqrt(sq) + eps;
// momentum: buf = momentum*buf + g/avg, p -= lr*buf; else p -= lr*g/avg.
// No bias correction; the step still advances (torch.optim keeps it in the state).
// State slots: 0 square_avg, 1 momentum_buffer (momentum > 0), 2 grad_avg (centered).
#pragma once
#include <cstdint>

#include "fusedopt/element_math.h"
#include "fusedopt/layout.h"
#include "fusedopt/step_math.h"

namespace fusedopt {

struct Rmsprop {
  static constexpr int kId = OPT_RMSPROP;
  static constexpr int kSeed = rmsprop_scal::seed;
  // 8-bit state: the slots quantized with the signed map (momentum_buffer, grad_avg); the
  // others (square_avg), unsigned
  static constexpr unsigned kSignedSlots = 0b110u;
  // Args::on bits; a bit below 3 is the option that uses that state slot.
  static constexpr unsigned kMomentum = 1u << 1, kCentered = 1u << 2, kL2 = 1u << 3;
  static constexpr unsigned kAlways = 0b001u;
  static constexpr unsigned kOptions = kMomentum | kCentered | kL2;
  FUSEDOPT_HD static constexpr unsigned canonical(unsigned on) { return on; }

  FUSEDOPT_HD static void scalars(const double* h, double lr, int64_t step, float* s) {
    const double alpha = h[rmsprop_col::alpha];
    s[rmsprop_scal::lr] = static_cast<float>(lr);
    s[rmsprop_scal::alpha] = static_cast<float>(alpha);
    s[rmsprop_scal::w] = static_cast<float>(1.0 - alpha);
    s[rmsprop_scal::eps] = static_cast<float>(h[rmsprop_col::eps]);
    s[rmsprop_scal::weight_decay] = static_cast<float>(h[rmsprop_col::weight_decay]);
    s[rmsprop_scal::momentum] = static_cast<float>(h[rmsprop_col::momentum]);
    s[rmsprop_scal::sign] = h[rmsprop_col::maximize] != 0.0 ? -1.0f : 1.0f;
    s[rmsprop_scal::centered] = static_cast<float>(h[rmsprop_col::centered]);
    s[rmsprop_scal::seed] = static_cast<float>(step);  // stochastic rounding's seed
  }

  struct Args {
    float neg_lr, alpha, w, eps, wd, momentum, sign;
    Lerp lerp_ga;
    unsigned on;
    FUSEDOPT_HD explicit Args(const float* s)
        : neg_lr(-s[rmsprop_scal::lr]),
          alpha(s[rmsprop_scal::alpha]),
          w(s[rmsprop_scal::w]),
          eps(s[rmsprop_scal::eps]),
          wd(s[rmsprop_scal::weight_decay]),
          momentum(s[rmsprop_scal::momentum]),
          sign(s[rmsprop_scal::sign]),
          lerp_ga(s[rmsprop_scal::w]),
          on((s[rmsprop_scal::momentum] > 0.0f ? kMomentum : 0u) |
             (s[rmsprop_scal::centered] != 0.0f ? kCentered : 0u) |
             (s[rmsprop_scal::weight_decay] != 0.0f ? kL2 : 0u)) {}
  };

  // Two passes over the N elements: the square average, centered's grad average (stored right
  // away) and the denominator; then momentum and the parameter. One pass holding all five
  // arrays to the end spilled 4 bytes at sm_80 (CUDA, bf16 parameter with fp32 state, centered
  // and momentum, 8 elements); storing the square average after the first pass too spilled at
  // sm_90 (fp32 parameter, 16-bit state). Element by element (the CPU loops) it is one pass.
  template <unsigned ON, class Io>
  FUSEDOPT_HD static void update(const Args& a, const Io& io) {
    constexpr int N = Io::N;
    const bool centered = is_on<ON, kCentered>(a.on), momentum = is_on<ON, kMomentum>(a.on);
    const bool l2 = is_on<ON, kL2>(a.on);
    float rp[N], rg[N], rsq[N], avg[N];
    io.param(rp);
    io.grad(rg);
    io.template load<0>(rsq);
    if (centered) {
      float rga[N];
      io.template load<2>(rga);
      FUSEDOPT_UNROLL
      for (int k = 0; k < N; ++k) {
        rg[k] = grad(a, l2, rg[k], rp[k]);
        rsq[k] = fma_rn(a.w * rg[k], rg[k], rsq[k] * a.alpha);
        rga[k] = a.lerp_ga(rga[k], rg[k]);
        avg[k] = sqrt_rn(fma_rn(-rga[k], rga[k], rsq[k])) + a.eps;
      }
      io.template store<2>(rga);
    } else {
      FUSEDOPT_UNROLL
      for (int k = 0; k < N; ++k) {
        rg[k] = grad(a, l2, rg[k], rp[k]);
        rsq[k] = fma_rn(a.w * rg[k], rg[k], rsq[k] * a.alpha);
        avg[k] = sqrt_rn(rsq[k]) + a.eps;
      }
    }
    if (momentum) {
      float rbuf[N];
      io.template load<1>(rbuf);
      FUSEDOPT_UNROLL
      for (int k = 0; k < N; ++k) {
        rbuf[k] = rbuf[k] * a.momentum + div_rn(rg[k], avg[k]);
        rp[k] = fma_rn(rbuf[k], a.neg_lr, rp[k]);
      }
      io.template store<1>(rbuf);
    } else {
      FUSEDOPT_UNROLL
      for (int k = 0; k < N; ++k) rp[k] = rp[k] + div_rn(a.neg_lr * rg[k], avg[k]);
    }
    io.template store<0>(rsq);
    io.store_param(rp);
  }

  // The gradient the update uses: maximize's sign, then L2 weight decay.
  FUSEDOPT_HD static float grad(const Args& a, bool l2, float g, float p) {
    g = g * a.sign;
    return l2 ? fma_rn(p, a.wd, g) : g;
  }
};

}  // namespace fusedopt
