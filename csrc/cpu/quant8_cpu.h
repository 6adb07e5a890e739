// The nearest code of fusedopt/quant8.h, fast on the CPU. quant8.h's q8::nearest finds the
// number of map values <= x by binary search, 8 dependent loads, then compares the distances to
// the two neighbours: 10 loads at data-dependent addresses per element, which the compilers keep
// scalar. Since the nearest code never decreases as x grows, it is the number of decision
// boundaries <= x: B[j], the smallest float whose code is above j. Here a table indexed by x's
// sign, exponent and top kMantBits mantissa bits gives the lowest code of that float interval,
// and kSteps comparisons with the boundaries that follow it give the code: 1 + kSteps loads,
// and a loop the compiler vectorizes. Both tables are built from q8::nearest itself (so the
// result is its, bit for bit: tests/test_state8.py compares them over every float32 in [-1, 1]),
// and the build checks that no interval holds more than kSteps boundaries. NaN gives code 0, as
// q8::nearest does. Normalized values lie in [-1, 1] (x / max|x|), so exponents above 127 only
// occur for non-finite x: they share the last row.
#pragma once
#include <cstdint>
#include <cstring>

#include "fusedopt/quant8.h"

namespace fusedopt::cpu::q8fast {

constexpr int kMantBits = 7;
constexpr int kSteps = 2;
constexpr int kKeys = 2 << (7 + kMantBits);  // sign x exponent 0..127 x mantissa top bits

struct Tables {
  uint8_t first[kKeys];    // the lowest code of each float interval
  float boundary[256 + kSteps];  // B[j]; past the last, +inf (never <= a finite x)
};

inline uint32_t key_of(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint32_t sign = bits >> 31, exponent = (bits >> 23) & 0xFFu;
  const uint32_t e = exponent > 127u ? 127u : exponent;
  const uint32_t mantissa = (bits >> (23 - kMantBits)) & ((1u << kMantBits) - 1u);
  return sign << (7 + kMantBits) | e << kMantBits | mantissa;
}

// Floats in order as unsigned integers (for a binary search over the floats themselves).
inline uint32_t ordered(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return (b >> 31) ? ~b : (b | 0x80000000u);
}
inline float from_ordered(uint32_t o) {
  const uint32_t b = (o >> 31) ? (o & 0x7FFFFFFFu) : ~o;
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

inline Tables build(const float* map) {
  Tables t{};
  // B[j]: the smallest float in [-1, 1] whose code is > j (nearest codes never decrease in x)
  const uint32_t lo0 = ordered(-1.0f), hi0 = ordered(1.0f);
  for (int j = 0; j < 256 + kSteps; ++j) {
    t.boundary[j] = __builtin_inff();
    if (j >= 255 || q8::nearest(1.0f, map) <= j) continue;
    uint32_t lo = lo0, hi = hi0;  // code(hi) > j; find the first such
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo) / 2;
      if (q8::nearest(from_ordered(mid), map) > j) hi = mid;
      else lo = mid + 1;
    }
    t.boundary[j] = from_ordered(lo);
  }
  for (uint32_t key = 0; key < static_cast<uint32_t>(kKeys); ++key) {
    const uint32_t sign = key >> (7 + kMantBits);
    const uint32_t body = (key & ((1u << (7 + kMantBits)) - 1u)) << (23 - kMantBits);
    const uint32_t lo_bits = body, hi_bits = body | ((1u << (23 - kMantBits)) - 1u);
    float lo, hi;  // the interval's smallest and largest magnitude
    std::memcpy(&lo, &lo_bits, 4);
    std::memcpy(&hi, &hi_bits, 4);
    float smallest = sign ? -hi : lo, largest = sign ? -lo : hi;
    smallest = smallest < -1.0f ? -1.0f : (smallest > 1.0f ? 1.0f : smallest);
    largest = largest < -1.0f ? -1.0f : (largest > 1.0f ? 1.0f : largest);
    const int first = q8::nearest(smallest, map), last = q8::nearest(largest, map);
    if (last - first > kSteps) __builtin_trap();  // the bound the steps rely on
    t.first[key] = static_cast<uint8_t>(first);
  }
  return t;
}

inline const Tables& tables(bool is_signed) {
  static const Tables signed_tables = build(q8::kSignedMap);
  static const Tables unsigned_tables = build(q8::kUnsignedMap);
  return is_signed ? signed_tables : unsigned_tables;
}

// q8::nearest(x, map) for x in [-1, 1] or NaN, with `t` the tables of `map`. Branch-free: the
// loop calling it vectorizes.
inline uint8_t nearest(float x, const Tables& t) {
  int code = t.first[key_of(x)];
  const int c0 = code;
  for (int s = 0; s < kSteps; ++s) code += t.boundary[c0 + s] <= x ? 1 : 0;
  return static_cast<uint8_t>(x != x ? 0 : code);
}

}  // namespace fusedopt::cpu::q8fast
