// CPU launchers: the same work items as the CUDA kernels (fused_math.h), over at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "launch.h"

namespace spinenet_fast::cpu {
namespace {

constexpr int64_t kMaxChunks = 64;  // partial-sum rows: enough for any CPU's threads, deterministic sums

#define SF_DISPATCH(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, name, __VA_ARGS__)

// Calls item(pixel, c, sums) for every pixel in [0, pixels) and channel group of `vec`; each of the (≤ kMaxChunks)
// chunks of pixels accumulates into its own row, and the rows are added in order into the zeroed (NUM_SUMS, C)
// `total` (the CUDA kernel's atomics, deterministically).
template <typename acc_t, int VEC, int NUM_SUMS, typename Item>
void add_sums(const at::Tensor& total, int64_t pixels, int64_t channels, Item item) {
  const int64_t chunks = std::max<int64_t>(1, std::min(kMaxChunks, pixels)), row_size = NUM_SUMS * channels;
  std::vector<acc_t> rows(chunks * row_size, acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      acc_t* row = rows.data() + chunk * row_size;
      for (int64_t pixel = chunk * pixels / chunks; pixel < (chunk + 1) * pixels / chunks; ++pixel) {
        for (int64_t c = 0; c < channels; c += VEC) {
          acc_t sums[NUM_SUMS][VEC] = {};
          item(pixel, c, sums);
          for (int s = 0; s < NUM_SUMS; ++s) {
            for (int k = 0; k < VEC; ++k) row[s * channels + c + k] += sums[s][k];
          }
        }
      }
    }
  });
  acc_t* out = total.mutable_data_ptr<acc_t>();
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    for (int64_t i = 0; i < row_size; ++i) out[i] += rows[chunk * row_size + i];
  }
}

// Calls item(pixel, c) for every pixel and channel group, in parallel over pixels.
template <int VEC, typename Item>
void for_each_item(int64_t pixels, int64_t channels, Item item) {
  at::parallel_for(0, pixels, std::max<int64_t>(1, 4096 / channels), [&](int64_t begin, int64_t end) {
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      for (int64_t c = 0; c < channels; c += VEC) item(pixel, c);
    }
  });
}

}  // namespace

void depthwise_forward(const DepthwiseTensors& t) {
  SF_KERNEL_SCOPE("depthwise3x3_forward");
  SF_DISPATCH(t.x.scalar_type(), "spinenet_fast::ext_depthwise3x3", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto a = depthwise_args<scalar_t, acc_t>(t);
    with_sums_type<acc_t>(t.sums, [&](auto zero) {
      using sum_t = decltype(zero);
      add_sums<sum_t, 1, kNumStatSums>(t.sums, a.N * a.OH * a.OW, a.C,
                                       [&](int64_t pixel, int64_t c, sum_t(&sums)[kNumStatSums][1]) {
                                         depthwise_forward_item(a, pixel, c, sums);
                                       });
    });
  });
}

void depthwise_backward(const DepthwiseTensors& t) {
  SF_DISPATCH(t.x.scalar_type(), "spinenet_fast::ext_depthwise3x3_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto a = depthwise_args<scalar_t, acc_t>(t);
    {
      SF_KERNEL_SCOPE("depthwise3x3_dgrad");
      add_sums<acc_t, 1, kNumPrologueSums>(t.sums, a.N * a.H * a.W, a.C,
                                           [&](int64_t pixel, int64_t c, acc_t(&sums)[kNumPrologueSums][1]) {
                                             depthwise_dgrad_item(a, pixel, c, sums);
                                           });
    }
    SF_KERNEL_SCOPE("depthwise3x3_wgrad");
    add_sums<acc_t, 1, kNumDepthwiseWeightSums>(
        t.weight_sums, a.N * a.OH * a.OW, a.C,
        [&](int64_t pixel, int64_t c, acc_t(&sums)[kNumDepthwiseWeightSums][1]) {
          depthwise_wgrad_item(a, pixel, c, sums);
        });
  });
}

void retinanet_loss(const LossTensors& t) {
  SF_KERNEL_SCOPE("retinanet_loss");
  SF_DISPATCH(t.logits.scalar_type(), "spinenet_fast::ext_retinanet_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto a = loss_args<scalar_t, acc_t>(t);
    add_sums<acc_t, 1, kNumLossSums>(t.sums, t.logits.size(0) * a.A, a.K,
                                     [&](int64_t r, int64_t k, acc_t(&sums)[kNumLossSums][1]) {
                                       retinanet_loss_item<1>(a, r, k, sums);
                                     });
  });
}

void retinanet_loss_backward(const LossTensors& t) {
  SF_KERNEL_SCOPE("retinanet_loss_backward");
  SF_DISPATCH(t.logits.scalar_type(), "spinenet_fast::ext_retinanet_loss_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto a = loss_args<scalar_t, acc_t>(t);
    for_each_item<1>(t.logits.size(0) * a.A, a.K,
                     [&](int64_t r, int64_t k) { retinanet_loss_backward_item(a, r, k); });
  });
}

void merge_forward(const MergeTensors& t) {
  SF_KERNEL_SCOPE("merge_forward");
  SF_DISPATCH(t.out.scalar_type(), "spinenet_fast::ext_merge", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto a = merge_args<scalar_t, acc_t>(t);
    with_vec<scalar_t>(vec_width(t.out, a.C, merge_pointers(t)), [&](auto width) {
      constexpr int VEC = decltype(width)::value;
      for_each_item<VEC>(a.N * a.H * a.W, a.C,
                         [&](int64_t pixel, int64_t c) { merge_forward_item<VEC>(a, pixel, c); });
    });
  });
}

void merge_backward(const MergeTensors& t) {
  SF_KERNEL_SCOPE("merge_backward");
  SF_DISPATCH(t.grads[0].scalar_type(), "spinenet_fast::ext_merge_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto a = merge_args<scalar_t, acc_t>(t);
    const int64_t coarse_pixels = a.N * (a.H / a.ratio[0]) * (a.W / a.ratio[0]);
    with_vec<scalar_t>(vec_width(t.grads[0], a.C, merge_pointers(t)), [&](auto width) {
      constexpr int VEC = decltype(width)::value;
      const auto item = [&](int64_t pixel, int64_t c, auto& sums) { merge_backward_item<VEC>(a, pixel, c, sums); };
      if (t.row_scale) {
        add_sums<acc_t, VEC, kNumRowScaledMergeSums>(t.sums, coarse_pixels, a.C, item);
      } else {
        add_sums<acc_t, VEC, kNumMergeSums>(t.sums, coarse_pixels, a.C, item);
      }
    });
  });
}

void maxpool_forward(const PoolTensors& t) {
  SF_KERNEL_SCOPE("maxpool_forward");
  SF_DISPATCH(t.y.scalar_type(), "spinenet_fast::ext_bn_act_maxpool", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto a = pool_args<scalar_t, acc_t>(t);
    with_vec<scalar_t>(vec_width(t.y, a.C, {t.y.const_data_ptr(), t.out.const_data_ptr()}), [&](auto width) {
      constexpr int VEC = decltype(width)::value;
      for_each_item<VEC>(a.N * a.OH * a.OW, a.C,
                         [&](int64_t pixel, int64_t c) { maxpool_forward_item<VEC>(a, pixel, c); });
    });
  });
}

void maxpool_backward(const PoolTensors& t) {
  SF_KERNEL_SCOPE("maxpool_backward");
  SF_DISPATCH(t.y.scalar_type(), "spinenet_fast::ext_bn_act_maxpool_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto a = pool_args<scalar_t, acc_t>(t);
    with_vec<scalar_t>(vec_width(t.y, a.C, {t.y.const_data_ptr(), t.d_y.const_data_ptr()}), [&](auto width) {
      constexpr int VEC = decltype(width)::value;
      add_sums<acc_t, VEC, kNumPrologueSums>(
          t.sums, a.N * a.H * a.W, a.C,
          [&](int64_t pixel, int64_t c, acc_t(&sums)[kNumPrologueSums][VEC]) {
            maxpool_backward_item<VEC>(a, pixel, c, sums);
          });
    });
  });
}

void bn_finalize(const FinalizeTensors& t) {
  SF_KERNEL_SCOPE("bn_finalize");
  AT_DISPATCH_FLOATING_TYPES(t.weight.scalar_type(), "spinenet_fast::ext_bn_finalize", [&] {
    with_sums_type<float>(t.sums, [&](auto zero) {
      const auto a = finalize_args<scalar_t, decltype(zero)>(t);
      for (int64_t c = 0; c < t.sums.numel(); ++c) bn_finalize_channel(a, c);
    });
  });
}

void bn_finalize_backward(const std::vector<at::Tensor>& in, const std::vector<at::Tensor>& out, double count,
                          double eps) {
  SF_KERNEL_SCOPE("bn_finalize_backward");
  AT_DISPATCH_FLOATING_TYPES(in[0].scalar_type(), "spinenet_fast::ext_bn_finalize_backward", [&] {
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
    for (int64_t c = 0; c < in[0].numel(); ++c) {
      bn_finalize_backward_channel<scalar_t>(ptr(in[0]), ptr(in[1]), ptr(in[2]), ptr(in[3]), ptr(in[4]), ptr(in[5]),
                                             ptr(in[6]), static_cast<scalar_t>(count), static_cast<scalar_t>(eps), c,
                                             out[0].mutable_data_ptr<scalar_t>(), out[1].mutable_data_ptr<scalar_t>(),
                                             out[2].mutable_data_ptr<scalar_t>(), out[3].mutable_data_ptr<scalar_t>());
    }
  });
}

}  // namespace spinenet_fast::cpu
