// Compressed master weights (issue 24; fusedopt/_master.py is the reference and says why): a bf16
// parameter b plus an integer error term e of BITS = 8 or 16 bits stand for the float32 master
// b + e * s(b), s(b) = half a bf16 ulp of b / 2^(BITS-1), a power of two built from b's exponent
// bits. For the CPU and CUDA kernels alike (torch-free; host and device).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "fusedopt/step_math.h"

namespace fusedopt::master {

FUSEDOPT_HD uint32_t bits_of(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
#endif
}

FUSEDOPT_HD float float_of(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, 4);
  return x;
#endif
}

// s(b) for the bf16 value b (as a float): 2^(E - 135 - (BITS - 1)), E = max(b's exponent, 1).
template <int BITS>
FUSEDOPT_HD float scale(float b) {
  constexpr int k = BITS - 1;
  int e = static_cast<int>((bits_of(b) >> 23) & 0xFFu);
  e = e < 1 ? 1 : e;
  const int biased = e - 8 - k;
  return float_of(biased >= 1 ? static_cast<uint32_t>(biased) << 23 : 1u << (e + 14 - k));
}

// The float32 master of b (bf16, as a float) and its error term e: one rounding (e * s is exact).
template <int BITS>
FUSEDOPT_HD float rebuild(float b, float e) {
  return b + e * scale<BITS>(b);
}

// The error term of the float32 value x whose bf16 rounding is b: (x - b) / s(b) (both exact)
// rounded half to even and clamped to the term's range; 0 where x is not finite.
template <int BITS>
FUSEDOPT_HD float error(float x, float b) {
  const float q = (x - b) / scale<BITS>(b);
  constexpr float lo = -static_cast<float>(1 << (BITS - 1)), hi = (1 << (BITS - 1)) - 1;
  const float r = rintf(q);
  const float clamped = r < lo ? lo : (r > hi ? hi : r);
  return q - q == 0.0f ? clamped : 0.0f;  // q - q: NaN for an inf or NaN q
}

}  // namespace fusedopt::master
