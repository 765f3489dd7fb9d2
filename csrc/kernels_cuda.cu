// CUDA launchers: grid-stride kernels over the work items of fused_math.h, on the current stream.
// Threads along x take consecutive channel groups of one NHWC pixel, so loads and stores coalesce.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "launch.h"

namespace spinenet_fast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;
constexpr int64_t kMaxSumRows = 256;  // blocks over pixels (grid.y) of the reducing kernels

#define SF_DISPATCH(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, name, __VA_ARGS__)

int64_t blocks_for(int64_t items) { return std::max<int64_t>(1, std::min(kMaxBlocks, (items + kThreads - 1) / kThreads)); }

// item.template run<VEC>(pixel, c) for every pixel in [0, pixels) and channel group.
template <int VEC, typename Item>
__global__ void for_each_item_kernel(Item item, int64_t pixels, int64_t channels) {
  const int64_t groups = channels / VEC, items = pixels * groups;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < items; i += int64_t{gridDim.x} * blockDim.x) {
    item.template run<VEC>(i / groups, (i % groups) * VEC);
  }
}

template <int VEC, typename Item>
void for_each_item(const Item& item, int64_t pixels, int64_t channels) {
  const int64_t items = pixels * (channels / VEC);
  for_each_item_kernel<VEC><<<blocks_for(items), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(item, pixels,
                                                                                                    channels);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// item.template run<VEC>(pixel, c, sums) over a (channel groups) × (pixels) grid; each block reduces its threads'
// sums over y in shared memory and adds them atomically into the zeroed (NUM_SUMS, C) `total`.
template <int VEC, int NUM_SUMS, typename acc_t, typename Item>
__global__ void summing_kernel(Item item, int64_t pixels, int64_t channels, acc_t* total) {
  extern __shared__ unsigned char shared_bytes[];
  acc_t* shared = reinterpret_cast<acc_t*>(shared_bytes);
  const int64_t groups = channels / VEC, group = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  acc_t sums[NUM_SUMS][VEC] = {};
  if (group < groups) {
    for (int64_t pixel = blockIdx.y * int64_t{blockDim.y} + threadIdx.y; pixel < pixels;
         pixel += int64_t{gridDim.y} * blockDim.y) {
      item.template run<VEC>(pixel, group * VEC, sums);
    }
  }
  acc_t* mine = shared + (threadIdx.y * blockDim.x + threadIdx.x) * NUM_SUMS * VEC;
#pragma unroll
  for (int s = 0; s < NUM_SUMS; ++s) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) mine[s * VEC + k] = sums[s][k];
  }
  __syncthreads();
  if (threadIdx.y != 0 || group >= groups) return;
  for (unsigned y = 1; y < blockDim.y; ++y) {
    const acc_t* theirs = shared + (y * blockDim.x + threadIdx.x) * NUM_SUMS * VEC;
#pragma unroll
    for (int s = 0; s < NUM_SUMS; ++s) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) sums[s][k] += theirs[s * VEC + k];
    }
  }
#pragma unroll
  for (int s = 0; s < NUM_SUMS; ++s) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) atomicAdd(total + s * channels + group * VEC + k, sums[s][k]);
  }
}

template <int VEC, int NUM_SUMS, typename acc_t, typename Item>
void add_sums(const Item& item, const at::Tensor& total, int64_t pixels, int64_t channels) {
  const int64_t groups = channels / VEC;
  const unsigned bx = static_cast<unsigned>(std::min<int64_t>(groups, 32)), by = kThreads / bx;
  const dim3 grid(static_cast<unsigned>((groups + bx - 1) / bx),
                  static_cast<unsigned>(std::max<int64_t>(1, std::min(kMaxSumRows, (pixels + by - 1) / by))));
  const size_t shared = size_t{bx} * by * NUM_SUMS * VEC * sizeof(acc_t);
  summing_kernel<VEC, NUM_SUMS><<<grid, dim3(bx, by), shared, c10::cuda::getCurrentCUDAStream()>>>(
      item, pixels, channels, total.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
struct MergeForward {
  MergeArgs<scalar_t, acc_t> a;
  template <int VEC>
  __device__ void run(int64_t pixel, int64_t c) const { merge_forward_item<VEC>(a, pixel, c); }
};

template <typename scalar_t, typename acc_t>
struct MergeBackward {
  MergeArgs<scalar_t, acc_t> a;
  template <int VEC, int NUM_SUMS>
  __device__ void run(int64_t pixel, int64_t c, acc_t (&sums)[NUM_SUMS][VEC]) const {
    merge_backward_item<VEC>(a, pixel, c, sums);
  }
};

template <typename scalar_t, typename acc_t>
struct PoolForward {
  PoolArgs<scalar_t, acc_t> a;
  template <int VEC>
  __device__ void run(int64_t pixel, int64_t c) const { maxpool_forward_item<VEC>(a, pixel, c); }
};

template <typename scalar_t, typename acc_t>
struct PoolBackward {
  PoolArgs<scalar_t, acc_t> a;
  template <int VEC>
  __device__ void run(int64_t pixel, int64_t c, acc_t (&sums)[kNumPrologueSums][VEC]) const {
    maxpool_backward_item<VEC>(a, pixel, c, sums);
  }
};

template <typename scalar_t, typename acc_t, typename sum_t>
struct DepthwiseForward {
  DepthwiseArgs<scalar_t, acc_t> a;
  template <int VEC>
  __device__ void run(int64_t pixel, int64_t c, sum_t (&sums)[kNumStatSums][VEC]) const {
    depthwise_forward_item(a, pixel, c, sums);
  }
};

template <typename scalar_t, typename acc_t>
struct DepthwiseDgrad {
  DepthwiseArgs<scalar_t, acc_t> a;
  template <int VEC>
  __device__ void run(int64_t pixel, int64_t c, acc_t (&sums)[kNumPrologueSums][VEC]) const {
    depthwise_dgrad_item(a, pixel, c, sums);
  }
};

template <typename scalar_t, typename acc_t>
struct DepthwiseWgrad {
  DepthwiseArgs<scalar_t, acc_t> a;
  template <int VEC>
  __device__ void run(int64_t pixel, int64_t c, acc_t (&sums)[kNumDepthwiseWeightSums][VEC]) const {
    depthwise_wgrad_item(a, pixel, c, sums);
  }
};

template <typename scalar_t, typename acc_t>
struct LossForward {
  LossArgs<scalar_t, acc_t> a;
  template <int VEC>
  __device__ void run(int64_t r, int64_t k, acc_t (&sums)[kNumLossSums][VEC]) const {
    retinanet_loss_item<VEC>(a, r, k, sums);
  }
};

template <typename scalar_t, typename acc_t>
struct LossBackward {
  LossArgs<scalar_t, acc_t> a;
  template <int VEC>
  __device__ void run(int64_t r, int64_t k) const { retinanet_loss_backward_item(a, r, k); }
};

template <typename T, typename S>
__global__ void bn_finalize_kernel(const BnFinalizeArgs<T, S> a, int64_t channels) {
  const int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (c < channels) bn_finalize_channel(a, c);
}

template <typename T>
__global__ void bn_finalize_backward_kernel(const T* d_scale, const T* d_shift, const T* d_mean, const T* d_var,
                                            const T* weight, const T* mean, const T* var, T count, T eps,
                                            int64_t channels, T* d_sums, T* d_sumsq, T* d_weight, T* d_bias) {
  const int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (c < channels) {
    bn_finalize_backward_channel(d_scale, d_shift, d_mean, d_var, weight, mean, var, count, eps, c, d_sums, d_sumsq,
                                 d_weight, d_bias);
  }
}


}  // namespace

void depthwise_forward(const DepthwiseTensors& t) {
  SF_KERNEL_SCOPE("depthwise3x3_forward");
  SF_DISPATCH(t.x.scalar_type(), "spinenet_fast::ext_depthwise3x3", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_sums_type<acc_t>(t.sums, [&](auto zero) {
      using sum_t = decltype(zero);
      const DepthwiseForward<scalar_t, acc_t, sum_t> item{depthwise_args<scalar_t, acc_t>(t)};
      add_sums<1, kNumStatSums, sum_t>(item, t.sums, item.a.N * item.a.OH * item.a.OW, item.a.C);
    });
  });
}

void depthwise_backward(const DepthwiseTensors& t) {
  SF_DISPATCH(t.x.scalar_type(), "spinenet_fast::ext_depthwise3x3_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto a = depthwise_args<scalar_t, acc_t>(t);
    {
      SF_KERNEL_SCOPE("depthwise3x3_dgrad");
      add_sums<1, kNumPrologueSums, acc_t>(DepthwiseDgrad<scalar_t, acc_t>{a}, t.sums, a.N * a.H * a.W, a.C);
    }
    SF_KERNEL_SCOPE("depthwise3x3_wgrad");
    add_sums<1, kNumDepthwiseWeightSums, acc_t>(DepthwiseWgrad<scalar_t, acc_t>{a}, t.weight_sums,
                                                a.N * a.OH * a.OW, a.C);
  });
}

void retinanet_loss(const LossTensors& t) {
  SF_KERNEL_SCOPE("retinanet_loss");
  SF_DISPATCH(t.logits.scalar_type(), "spinenet_fast::ext_retinanet_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LossForward<scalar_t, acc_t> item{loss_args<scalar_t, acc_t>(t)};
    add_sums<1, kNumLossSums, acc_t>(item, t.sums, t.logits.size(0) * item.a.A, item.a.K);
  });
}

void retinanet_loss_backward(const LossTensors& t) {
  SF_KERNEL_SCOPE("retinanet_loss_backward");
  SF_DISPATCH(t.logits.scalar_type(), "spinenet_fast::ext_retinanet_loss_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LossBackward<scalar_t, acc_t> item{loss_args<scalar_t, acc_t>(t)};
    for_each_item<1>(item, t.logits.size(0) * item.a.A, item.a.K);
  });
}

void merge_forward(const MergeTensors& t) {
  SF_KERNEL_SCOPE("merge_forward");
  SF_DISPATCH(t.out.scalar_type(), "spinenet_fast::ext_merge", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const MergeForward<scalar_t, acc_t> item{merge_args<scalar_t, acc_t>(t)};
    with_vec<scalar_t>(vec_width(t.out, item.a.C, merge_pointers(t)), [&](auto width) {
      for_each_item<decltype(width)::value>(item, item.a.N * item.a.H * item.a.W, item.a.C);
    });
  });
}

void merge_backward(const MergeTensors& t) {
  SF_KERNEL_SCOPE("merge_backward");
  SF_DISPATCH(t.grads[0].scalar_type(), "spinenet_fast::ext_merge_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const MergeBackward<scalar_t, acc_t> item{merge_args<scalar_t, acc_t>(t)};
    const auto& a = item.a;
    const int64_t coarse_pixels = a.N * (a.H / a.ratio[0]) * (a.W / a.ratio[0]);
    with_vec<scalar_t>(vec_width(t.grads[0], a.C, merge_pointers(t)), [&](auto width) {
      constexpr int VEC = decltype(width)::value;
      if (t.row_scale) {
        add_sums<VEC, kNumRowScaledMergeSums, acc_t>(item, t.sums, coarse_pixels, a.C);
      } else {
        add_sums<VEC, kNumMergeSums, acc_t>(item, t.sums, coarse_pixels, a.C);
      }
    });
  });
}

void maxpool_forward(const PoolTensors& t) {
  SF_KERNEL_SCOPE("maxpool_forward");
  SF_DISPATCH(t.y.scalar_type(), "spinenet_fast::ext_bn_act_maxpool", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const PoolForward<scalar_t, acc_t> item{pool_args<scalar_t, acc_t>(t)};
    const auto& a = item.a;
    with_vec<scalar_t>(vec_width(t.y, a.C, {t.y.const_data_ptr(), t.out.const_data_ptr()}),
                       [&](auto width) { for_each_item<decltype(width)::value>(item, a.N * a.OH * a.OW, a.C); });
  });
}

void maxpool_backward(const PoolTensors& t) {
  SF_KERNEL_SCOPE("maxpool_backward");
  SF_DISPATCH(t.y.scalar_type(), "spinenet_fast::ext_bn_act_maxpool_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const PoolBackward<scalar_t, acc_t> item{pool_args<scalar_t, acc_t>(t)};
    const auto& a = item.a;
    with_vec<scalar_t>(vec_width(t.y, a.C, {t.y.const_data_ptr(), t.d_y.const_data_ptr()}), [&](auto width) {
      constexpr int VEC = decltype(width)::value;
      add_sums<VEC, kNumPrologueSums, acc_t>(item, t.sums, a.N * a.H * a.W, a.C);
    });
  });
}

void bn_finalize(const FinalizeTensors& t) {
  SF_KERNEL_SCOPE("bn_finalize");
  AT_DISPATCH_FLOATING_TYPES(t.weight.scalar_type(), "spinenet_fast::ext_bn_finalize", [&] {
    with_sums_type<float>(t.sums, [&](auto zero) {
      using sum_t = decltype(zero);
      const int64_t channels = t.sums.numel();
      bn_finalize_kernel<scalar_t, sum_t><<<blocks_for(channels), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          finalize_args<scalar_t, sum_t>(t), channels);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void bn_finalize_backward(const std::vector<at::Tensor>& in, const std::vector<at::Tensor>& out, double count,
                          double eps) {
  SF_KERNEL_SCOPE("bn_finalize_backward");
  AT_DISPATCH_FLOATING_TYPES(in[0].scalar_type(), "spinenet_fast::ext_bn_finalize_backward", [&] {
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
    const int64_t channels = in[0].numel();
    bn_finalize_backward_kernel<scalar_t><<<blocks_for(channels), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        ptr(in[0]), ptr(in[1]), ptr(in[2]), ptr(in[3]), ptr(in[4]), ptr(in[5]), ptr(in[6]),
        static_cast<scalar_t>(count), static_cast<scalar_t>(eps), channels, out[0].mutable_data_ptr<scalar_t>(),
        out[1].mutable_data_ptr<scalar_t>(), out[2].mutable_data_ptr<scalar_t>(), out[3].mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace spinenet_fast::cuda
