// The nearest code of fusedopt/quant8.h, fast on the CPU. quant8.h's q8::nearest finds the
// number of map values <= x by binary search, 8 dependent loads, then compares the distances to
// the two neighbours: 10 loads at data-dependent addresses per element. Since the nearest code
// never decreases as x grows, it is the number of decision boundaries <= x: B[j], the smallest
// float whose code is above j. Here x's sign, exponent and top kMantBits mantissa bits pick a
// float interval, and no interval holds more than one boundary (the build checks it): one table
// entry per interval gives its lowest code and the threshold on x's other kLowBits bits from
// which the code is one more. One load and one integer comparison an element.
//
// The table is built from q8::nearest itself, so the result is its, bit for bit, for every
// float32 in [-1, 1] and NaN (checked exhaustively: every such bit pattern, 4,294,967,296 over
// both maps, 0 differences, 2026-12-06; tests/test_state8.py checks every 7th). NaN gives code 0, as
// q8::nearest does. Normalized values leave [-1, 1] only in a block holding a NaN (its absmax is
// NaN, the divisor 1): there every value dequantizes to NaN whatever its code, and above 2^16
// q8::nearest's float32 distances tie and give 254 where this gives 255.
//
// Vectorized: entries are int32 (gathers load 32-bit lanes; a uint8 table kept GCC 12's loop
// scalar), exponents are clamped to the kRows rows that matter (magnitudes below 2^-30 share row
// 0: the smallest boundary is above 2^-24; above 1 share the last row), and every select is
// branch-free. Measured 2026-12-06, 2^24 normal values on one core of the 2-core AMD EPYC
// (AVX-512 clone): 2.57 ns an element with stop 28's uint8 table and two boundary loads (kept
// scalar), 1.88 with it vectorized, 0.66 with this one load.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "fusedopt/quant8.h"

namespace fusedopt::cpu::q8fast {

constexpr int kMantBits = 7;                // the table's mantissa bits; the other kLowBits of x
constexpr int kLowBits = 23 - kMantBits;    // are compared with the interval's one threshold
constexpr int kRows = 32;                   // biased exponents kLowExp..127 (clamped into)
constexpr int kLowExp = 127 - (kRows - 1);  // row 0: every magnitude below 2^(kLowExp + 1 - 127)
constexpr int kKeys = 2 * kRows << kMantBits;  // sign x row x mantissa top bits
constexpr int32_t kNever = 1 << kLowBits;      // a threshold no low bits reach

struct Tables {
  // per float interval: its lowest code (bits 0-7) and, above, the threshold on x's low bits
  // (sign-folded: see nearest) from which the code is one more; kNever where the interval holds
  // no boundary
  int32_t entry[kKeys];
  float boundary[256];  // B[j]; past the last, +inf
};

inline uint32_t key_of(uint32_t bits) {
  const int32_t exponent = static_cast<int32_t>((bits >> 23) & 0xFFu);
  const int32_t row = std::min(std::max(exponent - kLowExp, 0), kRows - 1);
  const uint32_t mantissa = (bits >> kLowBits) & ((1u << kMantBits) - 1u);
  return (bits >> 31) * static_cast<uint32_t>(kRows << kMantBits) |
         static_cast<uint32_t>(row) << kMantBits | mantissa;
}

// x's low bits, in the order of x's value inside its interval: reversed for a negative x, whose
// value falls as its magnitude's bits rise
inline int32_t low_bits(uint32_t bits) {
  const uint32_t mask = (1u << kLowBits) - 1u;
  return static_cast<int32_t>((bits & mask) ^ ((0u - (bits >> 31)) & mask));
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
  for (int j = 0; j < 256; ++j) {
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
    const uint32_t sign = key / static_cast<uint32_t>(kRows << kMantBits);
    const uint32_t row = (key >> kMantBits) % kRows, mantissa = key & ((1u << kMantBits) - 1u);
    const uint32_t body = (row + kLowExp) << 23 | mantissa << kLowBits;
    // the interval's smallest and largest magnitude: row 0 also holds every exponent below
    // kLowExp (any mantissa), so it spans [0, 2^(kLowExp + 1 - 127)); the last row, every
    // magnitude above 1 (clamped to 1 below, as the normalized values' range)
    const uint32_t lo_bits = row == 0 ? 0u : body;
    const uint32_t hi_bits = row == 0 ? (kLowExp + 1u) << 23 : body | ((1u << kLowBits) - 1u);
    float lo, hi;
    std::memcpy(&lo, &lo_bits, 4);
    std::memcpy(&hi, &hi_bits, 4);
    float smallest = sign ? -hi : lo, largest = sign ? -lo : hi;
    smallest = smallest < -1.0f ? -1.0f : (smallest > 1.0f ? 1.0f : smallest);
    largest = largest < -1.0f ? -1.0f : (largest > 1.0f ? 1.0f : largest);
    const int first = q8::nearest(smallest, map), last = q8::nearest(largest, map);
    int32_t threshold = kNever;
    if (last - first == 1) {
      // the one boundary B[first] lies in (smallest, largest]: in this interval's own bits
      // (never in a clamped row's: the check below)
      uint32_t b;
      std::memcpy(&b, &t.boundary[first], 4);
      if (key_of(b) != key || row == 0 || row == kRows - 1) __builtin_trap();
      threshold = low_bits(b);
    } else if (last != first) {
      __builtin_trap();  // more than one boundary: the one comparison would not do
    }
    t.entry[key] = first | threshold << 8;
  }
  return t;
}

inline const Tables& tables(bool is_signed) {
  static const Tables signed_tables = build(q8::kSignedMap);
  static const Tables unsigned_tables = build(q8::kUnsignedMap);
  return is_signed ? signed_tables : unsigned_tables;
}

// q8::nearest(x, map) for x in [-1, 1] or NaN, with `t` the tables of `map`: one table load and
// one integer comparison, branch-free (the loop calling it vectorizes).
inline uint8_t nearest(float x, const Tables& t) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const int32_t entry = t.entry[key_of(bits)];
  const int32_t code = (entry & 0xFF) + static_cast<int32_t>(low_bits(bits) >= (entry >> 8));
  return static_cast<uint8_t>(code & -static_cast<int32_t>(x == x));  // NaN: 0
}

}  // namespace fusedopt::cpu::q8fast
