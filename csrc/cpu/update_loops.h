// The update pass on the CPU, for one optimizer at a time (fusedopt/optim/*.h hold their math;
// this file, how it runs over the chunks). update_<name>.cpp instantiates UpdatePass<Opt> from
// it: one optimizer's loops per translation unit. Torch-free.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "fusedopt/optim/all.h"
#include "fusedopt/quant8.h"
#include "quant8_cpu.h"
#include "kernels.h"
#include "multi_tensor.h"
#include "update_pass.h"

namespace fusedopt::cpu {
namespace {


// An update's memory at one element (element_math.h's interface, N = 1): the values update_run
// loaded, and the values the update stores, which update_run writes. Every access stays in
// update_run, through its __restrict__ pointers: pointers carried in a struct lose what
// __restrict__ says, and GCC then checks the arrays for overlap at run time before the
// vectorized loop, or (six arrays: fp32 masters with AMSGrad) gives up vectorizing.
struct ElementIo {
  static constexpr int N = 1;
  float p, g, s[3];
  mutable float p_out, s_out[3];

  void param(float (&x)[1]) const { x[0] = p; }
  void grad(float (&x)[1]) const { x[0] = g; }
  template <int S>
  void load(float (&x)[1]) const {
    x[0] = s[S];
  }
  template <int S>
  void store(const float (&x)[1]) const {
    s_out[S] = x[0];
  }
  void store_param(const float (&x)[1]) const { p_out = x[0]; }
};

// One contiguous run of one tensor, for a tensor whose options (Args::on) are exactly ON: `on` is
// pinned to ON, so that every option test is decided at compile time and the loop, branch-free,
// vectorizes. Loads and stores the state slots the variant uses (an optimizer's update stores
// every slot it uses).
template <class Opt, class K, unsigned ON, bool UNSCALE>
inline void update_run(typename K::PT* __restrict__ p, typename K::GT* __restrict__ shadow,
                       typename K::GT* __restrict__ g, typename K::ST* __restrict__ s0,
                       typename K::ST* __restrict__ s1, typename K::ST* __restrict__ s2,
                       typename K::ET* __restrict__ err, int64_t begin, int64_t end,
                       typename Opt::Args a, float scale, float coef, uint32_t seed) {
  constexpr int S = K::state;
  constexpr unsigned used = Opt::kAlways | (ON & 0b111u);
  a.on = ON;
  for (int64_t i = begin; i < end; ++i) {
    ElementIo io;
    io.p = read_param<K>(p, i, err);
    io.g = grad_at<K::grad, UNSCALE>(g, i, scale, coef);
    if constexpr ((used & 1u) != 0) io.s[0] = ld<S>(s0, i);
    if constexpr ((used & 2u) != 0) io.s[1] = ld<S>(s1, i);
    if constexpr ((used & 4u) != 0) io.s[2] = ld<S>(s2, i);
    Opt::template update<ON>(a, io);
    write_param<K>(p, shadow, i, io.p_out, seed, err);
    if constexpr ((used & 1u) != 0) st<S>(s0, i, io.s_out[0]);
    if constexpr ((used & 2u) != 0) st<S>(s1, i, io.s_out[1]);
    if constexpr ((used & 4u) != 0) st<S>(s2, i, io.s_out[2]);
  }
}

// update_run for 8-bit state (K::state == DTYPE_UINT8, fusedopt/quant8.h): block by block of
// QBLOCK elements (begin is a multiple of QBLOCK: every chunk size is), the used slots' codes are
// dequantized with their block's absmax, the update runs as on float32 state, and each slot's new
// values are quantized with their new absmax.
template <class Opt, class K, unsigned ON, bool UNSCALE>
inline void update_run_8bit(typename K::PT* __restrict__ p, typename K::GT* __restrict__ shadow,
                            typename K::GT* __restrict__ g, uint8_t* const* codes,
                            float* const* absmax, typename K::ET* __restrict__ err,
                            int64_t begin, int64_t end,
                            typename Opt::Args a, float scale, float coef, uint32_t seed) {
  constexpr unsigned used = Opt::kAlways | (ON & 0b111u);
  a.on = ON;
  const float* maps[3];
  const q8fast::Tables* tables[3];
  for (int k = 0; k < 3; ++k) {
    const bool is_signed = (Opt::kSignedSlots >> k) & 1u;
    maps[k] = is_signed ? q8::kSignedMap : q8::kUnsignedMap;
    tables[k] = &q8fast::tables(is_signed);
  }
  float in[3][QBLOCK], out[3][QBLOCK];
  for (int64_t b0 = begin; b0 < end; b0 += QBLOCK) {
    const int n = static_cast<int>(std::min<int64_t>(QBLOCK, end - b0));
    const int64_t block = b0 / QBLOCK;
    for (int k = 0; k < 3; ++k) {
      if (!((used >> k) & 1u)) continue;
      const float m = absmax[k][block];
      const uint8_t* c = codes[k] + b0;
      for (int i = 0; i < n; ++i) in[k][i] = maps[k][c[i]] * m;
    }
    for (int i = 0; i < n; ++i) {
      ElementIo io;
      io.p = read_param<K>(p, b0 + i, err);
      io.g = grad_at<K::grad, UNSCALE>(g, b0 + i, scale, coef);
      for (int k = 0; k < 3; ++k) {
        if ((used >> k) & 1u) io.s[k] = in[k][i];
      }
      Opt::template update<ON>(a, io);
      write_param<K>(p, shadow, b0 + i, io.p_out, seed, err);
      for (int k = 0; k < 3; ++k) {
        if ((used >> k) & 1u) out[k][i] = io.s_out[k];
      }
    }
    for (int k = 0; k < 3; ++k) {
      if (!((used >> k) & 1u)) continue;
      // The block's absmax: the largest |x| as the largest of its bit patterns with the sign
      // cleared (non-negative floats order as their bits; every NaN's pattern is above
      // infinity's), a max the compilers vectorize (q8::absmax_step's loop-carried float select
      // they keep scalar). A partial block is padded with zeros. Any NaN gives the quiet NaN.
      float* __restrict__ values = out[k];
      for (int i = n; i < QBLOCK; ++i) values[i] = 0.0f;
      uint32_t top = 0;
      for (int i = 0; i < QBLOCK; ++i) {
        uint32_t bits;
        std::memcpy(&bits, &values[i], 4);
        bits &= 0x7FFFFFFFu;
        top = bits > top ? bits : top;
      }
      float m;
      std::memcpy(&m, &top, 4);
      if (top > 0x7F800000u) m = std::numeric_limits<float>::quiet_NaN();
      absmax[k][block] = m;
      const float d = q8::divisor(m);
      // into a local array, then copied: stores through codes[k] could alias the map and the
      // table as far as the compiler knows, and kept the loop scalar
      const q8fast::Tables& table = *tables[k];
      uint8_t q[QBLOCK];
      for (int i = 0; i < QBLOCK; ++i) q[i] = q8fast::nearest(values[i] / d, table);
      std::memcpy(codes[k] + b0, q, static_cast<size_t>(n));
    }
  }
}

// f(std::integral_constant<unsigned, on>{}) for a set of options `on` of Opt (one of its
// canonical sets: a variant is compiled for each).
template <class Opt, unsigned ON, class F>
inline bool call_if(unsigned on, F& f) {
  if constexpr ((ON & ~Opt::kOptions) == 0 && Opt::canonical(ON) == ON) {
    if (on == ON) {
      f(std::integral_constant<unsigned, ON>{});
      return true;
    }
  }
  return false;
}

template <class Opt, class F, unsigned... ON>
inline void with_options_in(unsigned on, F& f, std::integer_sequence<unsigned, ON...>) {
  static_cast<void>((call_if<Opt, ON>(on, f) || ...));
}

template <class Opt, class F>
inline void with_options(unsigned on, F&& f) {
  static_assert(Opt::kOptions < 64, "options are bits 0-5");
  with_options_in<Opt>(on, f, std::make_integer_sequence<unsigned, 64>{});
}

template <class Opt, class K>
FUSEDOPT_CPU_TARGETS void update_chunks_typed(unsigned slots, const int64_t* tmeta,
                                              const int64_t* grads, const float* scal,
                                              const int64_t* chunks, int64_t begin, int64_t end,
                                              int64_t chunk_size, GradIn grad_in) {
  const bool unscale = grad_in.grad_scale != nullptr;
  const float scale = unscale ? *grad_in.grad_scale : 1.0f;
  const float coef = grad_in.clip ? grad_in.clip[CLIP_COEF] : 1.0f;
  const unsigned compiled = compiled_options<Opt>(slots);
  for (int64_t c = begin; c < end; ++c) {
    const int64_t t = chunks[2 * c], first = chunks[2 * c + 1];
    const int64_t* row = tmeta + t * TMETA_WIDTH;
    const int64_t last = std::min(first + chunk_size, row[T_NUMEL]);
    const float* s = scal + t * SCAL_WIDTH;
    const typename Opt::Args a(s);
    auto* p = addr<K::param>(row[T_PARAM]);
    auto* shadow = addr<K::grad>(row[T_SHADOW]);
    auto* g = addr<K::grad>(grads[t]);
    auto* s0 = addr<K::state>(row[T_S0]);
    auto* s1 = addr<K::state>(row[T_S1]);
    auto* s2 = addr<K::state>(row[T_S2]);
    auto* err = reinterpret_cast<typename K::ET*>(row[T_ERR]);
    const uint32_t seed = K::stochastic ? stochastic_seed(t, s[Opt::kSeed]) : 0u;
    with_options<Opt>(a.on & compiled, [&](auto on) {
      constexpr unsigned ON = decltype(on)::value;
      if constexpr (K::state == DTYPE_UINT8) {
        uint8_t* const codes[3] = {s0, s1, s2};
        float* const scales[3] = {addr<DTYPE_FLOAT32>(row[T_A0]), addr<DTYPE_FLOAT32>(row[T_A1]),
                                  addr<DTYPE_FLOAT32>(row[T_A2])};
        if (unscale)
          update_run_8bit<Opt, K, ON, true>(p, shadow, g, codes, scales, err, first, last, a,
                                            scale, coef, seed);
        else
          update_run_8bit<Opt, K, ON, false>(p, shadow, g, codes, scales, err, first, last, a,
                                             scale, coef, seed);
      } else if (unscale)
        update_run<Opt, K, ON, true>(p, shadow, g, s0, s1, s2, err, first, last, a, scale, coef,
                                     seed);
      else
        update_run<Opt, K, ON, false>(p, shadow, g, s0, s1, s2, err, first, last, a, scale, coef,
                                      seed);
    });
  }
}

}  // namespace

template <class Opt>
void UpdatePass<Opt>::run(int64_t bucket, unsigned slots, const int64_t* tmeta,
                          const int64_t* grads, const float* scal, const int64_t* chunks,
                          int64_t begin, int64_t end, int64_t chunk_size, GradIn grad_in) {
  with_bucket(bucket, [&](auto k) {
    update_chunks_typed<Opt, decltype(k)>(slots, tmeta, grads, scal, chunks, begin, end,
                                          chunk_size, grad_in);
  });
}

}  // namespace fusedopt::cpu
