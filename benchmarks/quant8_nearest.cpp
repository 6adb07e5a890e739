// csrc/cpu/quant8_cpu.h's nearest code against csrc/include/fusedopt/quant8.h's q8::nearest (the
// CUDA kernels' binary search): every float32 bit pattern in [-1, 1] and every NaN, both maps
// ("check"; "check K": every K-th bit pattern, as tests/test_state8.py runs it), and the time per element of each on 2^24 normal values, the table's in the loop
// shape of csrc/cpu/update_loops.h (a 256-element block into a local array) ("time").
//
//   g++ -O3 -fno-math-errno -ffp-contract=off -march=x86-64-v4 -I csrc/include -I csrc \
//       benchmarks/quant8_nearest.cpp -o /tmp/quant8_nearest && /tmp/quant8_nearest check time
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/quant8_cpu.h"

using namespace fusedopt;

__attribute__((noinline)) void table_block(const float* __restrict v, uint8_t* __restrict q,
                                           float d, const cpu::q8fast::Tables& t) {
  uint8_t local[256];
  for (int i = 0; i < 256; ++i) local[i] = cpu::q8fast::nearest(v[i] / d, t);
  std::memcpy(q, local, 256);
}

__attribute__((noinline)) void search_block(const float* __restrict v, uint8_t* __restrict q,
                                            float d, const float* map) {
  for (int i = 0; i < 256; ++i) q[i] = q8::nearest(v[i] / d, map);
}

int main(int argc, char** argv) {
  for (int a = 1; a < argc; ++a) {
    if (std::strcmp(argv[a], "check") == 0) {
      unsigned long long stride = 1;
      if (a + 1 < argc && argv[a + 1][0] >= '0' && argv[a + 1][0] <= '9') {
        stride = std::strtoull(argv[++a], nullptr, 10);
      }
      long long n = 0, bad = 0;
      for (int is_signed = 0; is_signed < 2; ++is_signed) {
        const float* map = is_signed ? q8::kSignedMap : q8::kUnsignedMap;
        const auto& t = cpu::q8fast::tables(is_signed);
        for (unsigned long long b = 0; b <= 0xFFFFFFFFull; b += stride) {
          const unsigned bits = static_cast<unsigned>(b);
          float x;
          std::memcpy(&x, &bits, 4);
          if (x == x && !(x >= -1.0f && x <= 1.0f)) continue;
          ++n;
          bad += q8::nearest(x, map) != cpu::q8fast::nearest(x, t);
        }
      }
      std::printf("check: %lld values (both maps), %lld differences\n", n, bad);
    } else if (std::strcmp(argv[a], "time") == 0) {
      const int N = 1 << 24;
      std::vector<float> v(N);
      std::vector<uint8_t> q(N);
      std::mt19937 g(0);
      std::normal_distribution<float> nd;
      for (auto& x : v) x = std::fmin(1.0f, std::fmax(-1.0f, nd(g) * 0.2f));
      const auto& t = cpu::q8fast::tables(true);
      for (int r = 0; r < 3; ++r) {
        auto t0 = std::chrono::steady_clock::now();
        for (int b = 0; b < N; b += 256) table_block(v.data() + b, q.data() + b, 1.0f, t);
        auto t1 = std::chrono::steady_clock::now();
        for (int b = 0; b < N; b += 256) search_block(v.data() + b, q.data() + b, 1.0f, q8::kSignedMap);
        auto t2 = std::chrono::steady_clock::now();
        std::printf("time: table %.2f ns an element, binary search %.2f ns\n",
                    std::chrono::duration<double>(t1 - t0).count() * 1e9 / N,
                    std::chrono::duration<double>(t2 - t1).count() * 1e9 / N);
      }
    }
  }
}
