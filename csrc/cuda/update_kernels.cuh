// The main pass on CUDA, for one optimizer at a time (fusedopt/optim/*.h hold their math; this
// file, how it runs: one block per chunk, N elements per thread and access). update_<name>.cu
// instantiates UpdatePass<Opt> from it: one optimizer's kernels per translation unit.
//
// One kernel per (optimizer, bucket, set of state slots in use, GradScaler's unscaling): the
// bucket (multi_tensor.cuh's Bucket: the dtypes of parameter, grads and state; a shadow when the
// parameter is an fp32 master; stochastic rounding; a compressed master's error term) sets the
// types and the vector width; an option that uses a state slot (Adam's amsgrad, RMSprop's
// momentum and centered, SGD's momentum) is compiled in only when some tensor of the call has
// that slot; every other option (maximize, weight decay, Nesterov, SGD's first update) is a
// runtime value per tensor, so groups that differ in them share one launch. Skipped steps
// (found_inf) and the clip coefficient are runtime values too (multi_tensor.cuh's step_skipped,
// GradIn). The math runs in float32 whatever the dtypes.
#pragma once

#include <type_traits>
#include <utility>

#include "fusedopt/optim/all.h"
#include "fusedopt/quant8.h"
#include "multi_tensor.cuh"
#include "update_pass.h"

namespace fusedopt {
namespace cuda {
namespace {

// One tensor's arrays in one chunk.
template <typename B, bool HAS_SCALE>
struct Arrays {
  using G = typename B::Grad;
  using S = typename B::State;
  ParamOut<B> out;  // the parameter: read from out.p, written through out
  G* g;             // written back unscaled with HAS_SCALE
  S* s[3];          // the state slots; only those the tensor uses are touched
  GradIn<HAS_SCALE> grad_in;
};

// The memory of an update at elements [i, i + N) (element_math.h's interface).
template <typename B, bool HAS_SCALE, int N_>
struct VectorIo {
  static constexpr int N = N_;
  const Arrays<B, HAS_SCALE>& a;
  int64_t i;

  __device__ __forceinline__ void param(float (&x)[N]) const { a.out.load(i, x); }
  __device__ __forceinline__ void grad(float (&x)[N]) const {
    cuda::load(a.g + i, x);
    a.grad_in.apply(a.g + i, x);
  }
  template <int K>
  __device__ __forceinline__ void load(float (&x)[N]) const {
    cuda::load(a.s[K] + i, x);
  }
  template <int K>
  __device__ __forceinline__ void store(const float (&x)[N]) const {
    cuda::store(a.s[K] + i, x);
  }
  __device__ __forceinline__ void store_param(const float (&x)[N]) const { a.out.write(i, x); }
};

// One tensor's update over a chunk: for_each_in_chunk calls apply<N>(i).
template <class Opt, typename B, unsigned ON, bool HAS_SCALE>
struct Update {
  Arrays<B, HAS_SCALE> arrays;
  typename Opt::Args args;

  template <int N>
  __device__ __forceinline__ void apply(int64_t i) const {
    Opt::template update<ON>(args, VectorIo<B, HAS_SCALE, N>{arrays, i});
  }
};

// One block per chunk. ON: the options compiled in (all.h's compiled_options).
template <class Opt, typename B, unsigned ON, bool HAS_SCALE>
__global__ void __launch_bounds__(kBlock)
    main_kernel(const int64_t* __restrict__ tmeta, const int64_t* __restrict__ grads,
                const float* __restrict__ scal, const int64_t* __restrict__ chunks,
                int64_t chunk_size, const float* __restrict__ grad_scale,
                const float* __restrict__ found_inf, const float* __restrict__ clip) {
  using G = typename B::Grad;
  using S = typename B::State;
  constexpr int VEC = B::kVec;
  if (step_skipped(found_inf)) return;
  const int64_t chunk = blockIdx.x;
  const int64_t t = chunks[2 * chunk];
  const int64_t start = chunks[2 * chunk + 1];
  const int64_t* row = tmeta + t * TMETA_WIDTH;
  const float* s = scal + t * SCAL_WIDTH;
  Arrays<B, HAS_SCALE> arrays;
  arrays.out = ParamOut<B>::read(row, t, s + Opt::kSeed);
  arrays.g = ptr_at<G>(grads[t]);
#pragma unroll
  for (int k = 0; k < 3; ++k) arrays.s[k] = ptr_at<S>(row[T_S0 + k]);
  arrays.grad_in = GradIn<HAS_SCALE>::read(grad_scale, clip);
  const Update<Opt, B, ON, HAS_SCALE> op{arrays, typename Opt::Args(s)};
  const unsigned used = Opt::kAlways | (op.args.on & ON & 0b111u);
  const bool vector = start % VEC == 0 && arrays.out.template aligned<VEC>() &&
                      aligned_for<VEC, G>(arrays.g) &&
                      (!(used & 1u) || aligned_for<VEC, S>(arrays.s[0])) &&
                      (!(used & 2u) || aligned_for<VEC, S>(arrays.s[1])) &&
                      (!(used & 4u) || aligned_for<VEC, S>(arrays.s[2]));
  const int64_t end = min(start + chunk_size, row[T_NUMEL]);
  for_each_in_chunk<VEC>(op, start, end, vector);
}

// ---- 8-bit state (B::State is uint8_t: fusedopt/quant8.h) ------------------------------------
//
// One warp per QBLOCK (256 elements), 8 consecutive elements per lane: the update reads each
// used slot's values dequantized from the lane's codes (8 bytes in two registers) and the block's
// absmax, runs as on float32 state (8 elements at once where every array is aligned for it, else
// one at a time) and leaves its new state values in shared memory (registers for 3 x 8 of them
// spilled: ptxas); then the warp reduces each slot's new absmax with shuffles, lane 0 stores it,
// and each lane quantizes and stores its codes (one 8-byte access for a whole group of 8). The
// maps are staged in shared memory too: the nearest-code search reads 10 entries per element, at
// data-dependent indices.
constexpr int kLaneElems = QBLOCK / 32;

// The per-block shared memory: the two maps, and the new state values of every thread,
// [slot][element of the lane's group][thread] (consecutive threads, consecutive banks).
struct QuantShared {
  float maps[2][QBLOCK];  // [0] signed, [1] unsigned
  float res[3][kLaneElems][kBlock];
};

// Byte e (0-7) of 8 codes held in a uint2: shifts, so that a runtime e needs no local array.
__device__ __forceinline__ unsigned code_at(uint2 w, int e) {
  return ((e < 4 ? w.x : w.y) >> (8 * (e & 3))) & 0xFFu;
}

// element_math.h's interface over elements [e, e + N) of a lane's group of 8 at element i0:
// parameter and grad from memory, states dequantized from the lane's codes, results to shared.
template <typename B, bool HAS_SCALE, int N_>
struct QuantIo {
  static constexpr int N = N_;
  const ParamOut<B>& out;
  typename B::Grad* g;
  const GradIn<HAS_SCALE>& grad_in;
  int64_t i;  // the first element, i0 + e
  const uint2 (&codes)[3];  // the lane's 8 codes of each slot, byte e of .x/.y
  const float (&absmax)[3];
  const float* const (&maps)[3];
  QuantShared& shared;
  int e;

  __device__ __forceinline__ void param(float (&x)[N]) const { out.load(i, x); }
  __device__ __forceinline__ void grad(float (&x)[N]) const {
    cuda::load(g + i, x);
    grad_in.apply(g + i, x);
  }
  template <int K>
  __device__ __forceinline__ void load(float (&x)[N]) const {
#pragma unroll
    for (int k = 0; k < N; ++k) x[k] = maps[K][code_at(codes[K], e + k)] * absmax[K];
  }
  template <int K>
  __device__ __forceinline__ void store(const float (&x)[N]) const {
#pragma unroll
    for (int k = 0; k < N; ++k) shared.res[K][e + k][threadIdx.x] = x[k];
  }
  __device__ __forceinline__ void store_param(const float (&x)[N]) const { out.write(i, x); }
};

template <class Opt, typename B, unsigned ON, bool HAS_SCALE>
__global__ void __launch_bounds__(kBlock, 1)
    main_kernel_8bit(const int64_t* __restrict__ tmeta, const int64_t* __restrict__ grads,
                     const float* __restrict__ scal, const int64_t* __restrict__ chunks,
                     int64_t chunk_size, const float* __restrict__ grad_scale,
                     const float* __restrict__ found_inf, const float* __restrict__ clip) {
  using G = typename B::Grad;
  static_assert(kBlock % 32 == 0 && QBLOCK == 32 * kLaneElems, "a warp per block of codes");
  if (step_skipped(found_inf)) return;
  __shared__ QuantShared shared;
  for (int k = threadIdx.x; k < QBLOCK; k += blockDim.x) {
    shared.maps[0][k] = q8::kSignedMap[k];
    shared.maps[1][k] = q8::kUnsignedMap[k];
  }
  __syncthreads();
  const int64_t chunk = blockIdx.x;
  const int64_t t = chunks[2 * chunk];
  const int64_t start = chunks[2 * chunk + 1];  // a multiple of chunk_size, and so of QBLOCK
  const int64_t* row = tmeta + t * TMETA_WIDTH;
  const float* s = scal + t * SCAL_WIDTH;
  const ParamOut<B> out = ParamOut<B>::read(row, t, s + Opt::kSeed);
  G* g = ptr_at<G>(grads[t]);
  const GradIn<HAS_SCALE> grad_in = GradIn<HAS_SCALE>::read(grad_scale, clip);
  const typename Opt::Args args(s);
  const unsigned used = Opt::kAlways | (args.on & ON & 0b111u);
  const float* const maps[3] = {shared.maps[(Opt::kSignedSlots >> 0) & 1u ? 0 : 1],
                                shared.maps[(Opt::kSignedSlots >> 1) & 1u ? 0 : 1],
                                shared.maps[(Opt::kSignedSlots >> 2) & 1u ? 0 : 1]};
  const bool vector = out.template aligned<kLaneElems>() && aligned_for<kLaneElems, G>(g);
  bool codes_aligned = true;  // 8-byte code accesses (fusedopt's own tensors always are)
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    if ((used >> k) & 1u) codes_aligned &= aligned_for<kLaneElems, uint8_t>(ptr_at<uint8_t>(row[T_S0 + k]));
  }
  const int64_t end = min(start + chunk_size, row[T_NUMEL]);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll 1
  for (int64_t b0 = start + int64_t{warp} * QBLOCK; b0 < end; b0 += int64_t{kBlock / 32} * QBLOCK) {
    const int64_t i0 = b0 + lane * kLaneElems;
    const int64_t left = end - i0;
    const int n = left <= 0 ? 0 : (left >= kLaneElems ? kLaneElems : static_cast<int>(left));
    const int64_t block = b0 / QBLOCK;
    uint2 codes[3] = {};
    float absmax[3] = {0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      if (!((used >> k) & 1u)) continue;
      const uint8_t* c = ptr_at<uint8_t>(row[T_S0 + k]);
      absmax[k] = ptr_at<float>(row[T_A0 + k])[block];
      if (n == kLaneElems && codes_aligned) {
        codes[k] = __ldca(reinterpret_cast<const uint2*>(c + i0));  // i0: a multiple of 8
      } else {
#pragma unroll 1
        for (int e = 0; e < n; ++e) {
          const unsigned b = static_cast<unsigned>(c[i0 + e]) << (8 * (e & 3));
          if (e < 4) codes[k].x |= b;
          else codes[k].y |= b;
        }
      }
    }
    if (n == kLaneElems && vector) {
      Opt::template update<ON>(args, QuantIo<B, HAS_SCALE, kLaneElems>{
                                         out, g, grad_in, i0, codes, absmax, maps, shared, 0});
    } else {
#pragma unroll 1
      for (int e = 0; e < n; ++e) {
        Opt::template update<ON>(
            args, QuantIo<B, HAS_SCALE, 1>{out, g, grad_in, i0 + e, codes, absmax, maps, shared, e});
      }
    }
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      if (!((used >> k) & 1u)) continue;
      float m = 0.0f;
#pragma unroll
      for (int e = 0; e < kLaneElems; ++e) {
        if (e < n) m = q8::absmax_step(m, shared.res[k][e][threadIdx.x]);
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        m = q8::absmax_step(m, __shfl_xor_sync(0xFFFFFFFFu, m, off));
      }
      if (lane == 0) ptr_at<float>(row[T_A0 + k])[block] = m;
      const float d = q8::divisor(m);
      uint8_t* dst = ptr_at<uint8_t>(row[T_S0 + k]);
      if (n == kLaneElems && codes_aligned) {
        uint2 c = {0u, 0u};
#pragma unroll
        for (int e = 0; e < kLaneElems; ++e) {
          const unsigned q = q8::nearest(__fdiv_rn(shared.res[k][e][threadIdx.x], d), maps[k]);
          if (e < 4) c.x |= q << (8 * e);
          else c.y |= q << (8 * (e - 4));
        }
        __stwb(reinterpret_cast<uint2*>(dst + i0), c);
      } else {
#pragma unroll 1
        for (int e = 0; e < n; ++e) {
          dst[i0 + e] = q8::nearest(__fdiv_rn(shared.res[k][e][threadIdx.x], d), maps[k]);
        }
      }
    }
  }
}

template <class Opt, typename B, unsigned SLOTS>
cudaError_t launch_variant(const MainArgs& a, cudaStream_t stream) {
  constexpr unsigned ON = compiled_options<Opt>(SLOTS);
  const dim3 grid(static_cast<unsigned>(a.n_chunks));
  constexpr bool kEightBit = std::is_same<typename B::State, uint8_t>::value;
  const auto kernel = [&] {
    if constexpr (kEightBit) {
      return a.grad_scale != nullptr ? main_kernel_8bit<Opt, B, ON, true>
                                     : main_kernel_8bit<Opt, B, ON, false>;
    } else {
      return a.grad_scale != nullptr ? main_kernel<Opt, B, ON, true>
                                     : main_kernel<Opt, B, ON, false>;
    }
  }();
  kernel<<<grid, kBlock, 0, stream>>>(a.tmeta, a.grads, a.scal, a.chunks, a.chunk_size,
                                      a.grad_scale, a.found_inf, a.clip);
  return cudaGetLastError();
}

// The variant for the optional slots in `slots` (a kernel per subset of the slots Opt's options
// use: Adam 2, RMSprop 4, SGD 2).
template <class Opt, typename B, unsigned... SLOTS>
cudaError_t launch_slots(const MainArgs& a, unsigned slots, cudaStream_t stream,
                         std::integer_sequence<unsigned, SLOTS...>) {
  constexpr unsigned kOptional = Opt::kOptions & 0b111u;
  slots &= kOptional;
  cudaError_t err = cudaErrorInvalidValue;
  const auto try_one = [&](auto s) {
    constexpr unsigned S = decltype(s)::value;
    if constexpr ((S & ~kOptional) == 0) {
      if (slots == S) {
        err = launch_variant<Opt, B, S>(a, stream);
        return true;
      }
    }
    return false;
  };
  static_cast<void>((try_one(std::integral_constant<unsigned, SLOTS>{}) || ...));
  return err;
}

}  // namespace

template <class Opt>
cudaError_t UpdatePass<Opt>::launch(const MainArgs& a, int bucket, unsigned slots,
                                    cudaStream_t stream) {
  if (!chunk_grid_fits(a.n_chunks)) return cudaErrorInvalidValue;
  return dispatch_bucket(bucket, [&](auto b) {
    if (a.n_chunks == 0) return cudaSuccess;
    return launch_slots<Opt, decltype(b)>(a, slots, stream,
                                          std::make_integer_sequence<unsigned, 8>{});
  });
}

}  // namespace cuda
}  // namespace fusedopt
