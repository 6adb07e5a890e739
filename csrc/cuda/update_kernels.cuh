// The main pass on CUDA, for one optimizer at a time (fusedopt/optim/*.h hold their math; this
// file, how it runs: one block per chunk, N elements per thread and access). update_<name>.cu
// instantiates UpdatePass<Opt> from it: one optimizer's kernels per translation unit.
//
// One kernel per (optimizer, bucket, set of state slots in use, GradScaler's unscaling): the
// bucket (multi_tensor.cuh's Bucket: the dtypes of parameter, grads and state; a shadow when the
// parameter is an fp32 master; stochastic rounding) sets the types and the vector width; an
// option that uses a state slot (Adam's amsgrad, RMSprop's momentum and centered, SGD's
// momentum) is compiled in only when some tensor of the call has that slot; every other option
// (maximize, weight decay, Nesterov, SGD's first update) is a runtime value per tensor, so groups
// that differ in them share one launch. Skipped steps (found_inf) and the clip coefficient are
// runtime values too (multi_tensor.cuh's step_skipped, GradIn). The math runs in float32
// whatever the dtypes.
#pragma once

#include <type_traits>
#include <utility>

#include "fusedopt/optim/all.h"
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

  __device__ __forceinline__ void param(float (&x)[N]) const { cuda::load(a.out.p + i, x); }
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

template <class Opt, typename B, unsigned SLOTS>
cudaError_t launch_variant(const MainArgs& a, cudaStream_t stream) {
  constexpr unsigned ON = compiled_options<Opt>(SLOTS);
  const dim3 grid(static_cast<unsigned>(a.n_chunks));
  const auto kernel = a.grad_scale != nullptr ? main_kernel<Opt, B, ON, true>
                                              : main_kernel<Opt, B, ON, false>;
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
