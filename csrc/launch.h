// The interface between the ops (ops.cpp: checks, layouts, outputs) and the per-device launchers
// (kernels_cpu.cpp, kernels_cuda.cu): checked NHWC-contiguous tensors in, kernel arguments built the same way
// for both devices.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/record_function.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "fused_math.h"

namespace spinenet_fast {

// Every kernel the extension launches, for the launch ledger (benchmarks/ledger.py): while logging is on, its name
// goes to a log that `torch.ops.spinenet_fast.ext_launch_log(enable)` returns and clears. The CPU twins log what
// the CUDA launchers launch, so a CPU run counts a GPU's launches.
void log_launch(const char* name);

// Names one kernel launch for the profiler (until the end of the enclosing block) and logs it.
#define SF_KERNEL_SCOPE(name)                                                                 \
  RECORD_FUNCTION("spinenet_fast::kernel::" name, std::vector<c10::IValue>());                \
  log_launch(name)

// Storage bytes one vectorised load moves.
constexpr int kVecBytes = 16;

// VEC for tensors with C channels: a 16-byte pack where C and every pointer allow it, else 1 (scalar).
inline int vec_width(const at::Tensor& like, int64_t channels, const std::vector<const void*>& pointers) {
  const int vec = kVecBytes / static_cast<int>(like.element_size());
  if (channels % vec != 0) return 1;
  for (const void* p : pointers) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % kVecBytes != 0) return 1;
  }
  return vec;
}

// Calls f(std::integral_constant<int, VEC>{}) with VEC = 1 or the 16-byte pack width of scalar_t; the callee reads
// it as `constexpr int VEC = decltype(width)::value;` (C++17: no explicit lambda template parameters).
template <int VEC>
using VecWidth = std::integral_constant<int, VEC>;

template <typename scalar_t, typename F>
void with_vec(int vec, F&& f) {
  if (vec == 1) {
    f(VecWidth<1>{});
  } else {
    f(VecWidth<static_cast<int>(kVecBytes / sizeof(scalar_t))>{});
  }
}

// Merge: parents ordered so that, for the backward, parent 0 is the coarse one. All NHWC-contiguous.
struct MergeTensors {
  std::vector<at::Tensor> parents, scales, shifts;
  std::vector<int64_t> ratios;
  std::optional<at::Tensor> extra;
  std::optional<at::Tensor> row_scale;  // (N,) maths dtype: the per-sample factor of parent `scaled_parent`
  int scaled_parent = 0;
  std::vector<at::Tensor> grads;   // backward: the output gradient's terms (one per reader), summed; NHWC within a
                                   // sample, one sample stride (a multiple of C) for all
  at::Tensor out;                  // forward
  std::vector<at::Tensor> d_parents;  // backward
  std::optional<at::Tensor> d_extra;  // backward
  at::Tensor sums;  // backward: (kNumMergeSums or, with a row scale, kNumRowScaledMergeSums, C) zeroed, maths dtype
  int act;
};

template <typename scalar_t, typename acc_t>
MergeArgs<scalar_t, acc_t> merge_args(const MergeTensors& t) {
  MergeArgs<scalar_t, acc_t> a{};
  a.num_parents = static_cast<int>(t.parents.size());
  for (int i = 0; i < a.num_parents; ++i) {
    a.parent[i] = t.parents[i].const_data_ptr<scalar_t>();
    a.scale[i] = t.scales[i].const_data_ptr<acc_t>();
    a.shift[i] = t.shifts[i].const_data_ptr<acc_t>();
    a.ratio[i] = t.ratios[i];
    if (!t.d_parents.empty()) a.d_parent[i] = t.d_parents[i].mutable_data_ptr<scalar_t>();
  }
  a.extra = t.extra ? t.extra->const_data_ptr<scalar_t>() : nullptr;
  a.row_scale = t.row_scale ? t.row_scale->const_data_ptr<acc_t>() : nullptr;
  a.scaled_parent = t.scaled_parent;
  a.num_grads = static_cast<int>(t.grads.size());
  for (int g = 0; g < a.num_grads; ++g) a.grad[g] = t.grads[g].const_data_ptr<scalar_t>();
  a.grad_sample_stride = a.num_grads > 0 ? t.grads[0].stride(0) : 0;
  a.out = t.out.defined() ? t.out.mutable_data_ptr<scalar_t>() : nullptr;
  a.d_extra = t.d_extra ? t.d_extra->mutable_data_ptr<scalar_t>() : nullptr;
  const at::Tensor& like = t.out.defined() ? t.out : t.grads[0];
  a.N = like.size(0), a.C = like.size(1), a.H = like.size(2), a.W = like.size(3);
  a.act = t.act;
  return a;
}

inline std::vector<const void*> merge_pointers(const MergeTensors& t) {
  std::vector<const void*> p;
  for (const auto& v : {t.parents, t.d_parents, t.grads}) {
    for (const auto& x : v) p.push_back(x.const_data_ptr());
  }
  for (const auto* x : {&t.extra, &t.d_extra}) {
    if (*x) p.push_back((*x)->const_data_ptr());
  }
  if (t.out.defined()) p.push_back(t.out.const_data_ptr());
  return p;
}

// Max-pool: y (N, C, H, W) NHWC-contiguous; scale/shift acc-dtype vectors or undefined (no affine).
struct PoolTensors {
  at::Tensor y, scale, shift;
  at::Tensor out;        // forward
  at::Tensor route;      // int32 (N, OH, OW, C): written by the forward where defined, read by the backward
  at::Tensor grad;       // backward: output gradient
  at::Tensor d_y;        // backward
  at::Tensor sums;       // backward: (kNumPrologueSums, C) zero-initialised accumulator, maths dtype
  int levels, pad, act;
};

template <typename scalar_t, typename acc_t>
PoolArgs<scalar_t, acc_t> pool_args(const PoolTensors& t) {
  PoolArgs<scalar_t, acc_t> a{};
  a.y = t.y.const_data_ptr<scalar_t>();
  a.scale = t.scale.defined() ? t.scale.const_data_ptr<acc_t>() : nullptr;
  a.shift = t.shift.defined() ? t.shift.const_data_ptr<acc_t>() : nullptr;
  a.out = t.out.defined() ? t.out.mutable_data_ptr<scalar_t>() : nullptr;
  a.route = t.route.defined() ? t.route.data_ptr<int32_t>() : nullptr;
  a.grad = t.grad.defined() ? t.grad.const_data_ptr<scalar_t>() : nullptr;
  a.d_y = t.d_y.defined() ? t.d_y.mutable_data_ptr<scalar_t>() : nullptr;
  a.N = t.y.size(0), a.C = t.y.size(1), a.H = t.y.size(2), a.W = t.y.size(3);
  a.OH = a.H >> t.levels, a.OW = a.W >> t.levels;
  a.levels = t.levels, a.pad = t.pad, a.act = t.act;
  return a;
}

// Calls f(sum_t{}) with sum_t the element type of `sums`: double for float64 sums, else Fallback (their type).
template <typename Fallback, typename F>
void with_sums_type(const at::Tensor& sums, const F& f) {
  if (sums.scalar_type() == at::kDouble) {
    f(double{});
  } else {
    f(Fallback{});
  }
}

// BN finalisation: inputs Σ, Σ² (float32 or float64), γ, β; outputs scale, shift, mean, var (γ's dtype); all 1-D
// and contiguous; running statistics and the batch counter undefined where not updated.
struct FinalizeTensors {
  at::Tensor sums, sumsq, weight, bias;
  at::Tensor scale, shift, mean, var;
  at::Tensor running_mean, running_var, batches;
  double count, eps, momentum, unbias;
};

template <typename T, typename S>
BnFinalizeArgs<T, S> finalize_args(const FinalizeTensors& t) {
  auto out = [](const at::Tensor& v) { return v.defined() ? v.mutable_data_ptr<T>() : nullptr; };
  return {t.sums.const_data_ptr<S>(), t.sumsq.const_data_ptr<S>(), t.weight.const_data_ptr<T>(),
          t.bias.const_data_ptr<T>(), static_cast<T>(t.count), static_cast<T>(t.eps), out(t.scale), out(t.shift),
          out(t.mean), out(t.var), out(t.running_mean), out(t.running_var), static_cast<T>(t.momentum),
          static_cast<T>(t.unbias), t.batches.defined() ? t.batches.mutable_data_ptr<int64_t>() : nullptr};
}

// RetinaNet loss: cls_logits, box_regression contiguous in one storage dtype; matched, gt_labels int64; gt_boxes,
// anchors contiguous in the maths dtype; grad (3,) and the d_ outputs for the backward.
struct LossTensors {
  at::Tensor logits, regression, matched, labels, boxes, anchors;
  at::Tensor grad, d_logits, d_regression;  // backward
  at::Tensor sums;                          // forward: (kNumLossSums, K) zeroed accumulator, maths dtype
  double alpha, gamma, delta;
};

template <typename scalar_t, typename acc_t>
LossArgs<scalar_t, acc_t> loss_args(const LossTensors& t) {
  LossArgs<scalar_t, acc_t> a{};
  a.logits = t.logits.const_data_ptr<scalar_t>();
  a.regression = t.regression.const_data_ptr<scalar_t>();
  a.matched = t.matched.const_data_ptr<int64_t>();
  a.labels = t.labels.const_data_ptr<int64_t>();
  a.boxes = t.boxes.const_data_ptr<acc_t>();
  a.anchors = t.anchors.const_data_ptr<acc_t>();
  a.grad = t.grad.defined() ? t.grad.const_data_ptr<acc_t>() : nullptr;
  a.d_logits = t.d_logits.defined() ? t.d_logits.mutable_data_ptr<scalar_t>() : nullptr;
  a.d_regression = t.d_regression.defined() ? t.d_regression.mutable_data_ptr<scalar_t>() : nullptr;
  a.A = t.logits.size(1), a.K = t.logits.size(2), a.G = t.labels.size(1);
  a.alpha = static_cast<acc_t>(t.alpha), a.gamma = static_cast<acc_t>(t.gamma), a.delta = static_cast<acc_t>(t.delta);
  return a;
}

// Depthwise 3×3 conv: x (N, C, H, W) and y, dy, dx NHWC-contiguous in one storage dtype; weight (C, 9), bias,
// scale, shift, d_sum, d_sumsq contiguous in the maths dtype (undefined where absent).
struct DepthwiseTensors {
  at::Tensor x, weight, bias, scale, shift;
  at::Tensor y;              // forward output, backward input
  at::Tensor dy, d_sum, d_sumsq, dx;  // backward
  at::Tensor sums;           // forward: (2, C) statistics; dgrad: (2, C) prologue sums; zeroed, maths dtype
  at::Tensor weight_sums;    // wgrad: (kNumDepthwiseWeightSums, C) zeroed, maths dtype
  int stride, pad, act;
};

template <typename scalar_t, typename acc_t>
DepthwiseArgs<scalar_t, acc_t> depthwise_args(const DepthwiseTensors& t) {
  auto vector = [](const at::Tensor& v) { return v.defined() ? v.const_data_ptr<acc_t>() : nullptr; };
  DepthwiseArgs<scalar_t, acc_t> a{};
  a.x = t.x.const_data_ptr<scalar_t>();
  a.weight = t.weight.const_data_ptr<acc_t>();
  a.bias = vector(t.bias), a.scale = vector(t.scale), a.shift = vector(t.shift);
  a.y = t.y.defined() ? t.y.mutable_data_ptr<scalar_t>() : nullptr;
  a.dy = t.dy.defined() ? t.dy.const_data_ptr<scalar_t>() : nullptr;
  a.d_sum = vector(t.d_sum), a.d_sumsq = vector(t.d_sumsq);
  a.dx = t.dx.defined() ? t.dx.mutable_data_ptr<scalar_t>() : nullptr;
  a.N = t.x.size(0), a.C = t.x.size(1), a.H = t.x.size(2), a.W = t.x.size(3);
  a.OH = a.H / t.stride, a.OW = a.W / t.stride;
  a.stride = t.stride, a.pad = t.pad, a.act = t.act;
  return a;
}

// Where an op reduces over pixels, its launcher adds the per-channel sums into the tensors' zeroed `sums` (atomics
// on CUDA; per-chunk rows added up in the same call on the CPU): no separate reduction.
namespace cpu {
void depthwise_forward(const DepthwiseTensors& t);
// Two launches: the dgrad (dx, the prologue's sums) and the wgrad (weight_sums).
void depthwise_backward(const DepthwiseTensors& t);
void retinanet_loss(const LossTensors& t);
void retinanet_loss_backward(const LossTensors& t);
void merge_forward(const MergeTensors& t);
void merge_backward(const MergeTensors& t);
void maxpool_forward(const PoolTensors& t);
void maxpool_backward(const PoolTensors& t);
void bn_finalize(const FinalizeTensors& t);
// in: d_scale, d_shift, d_mean, d_var (undefined: none), weight, mean, var; out: d_sums, d_sumsq, d_weight, d_bias.
void bn_finalize_backward(const std::vector<at::Tensor>& in, const std::vector<at::Tensor>& out, double count,
                          double eps);
}  // namespace cpu

namespace cuda {
void depthwise_forward(const DepthwiseTensors& t);
// Two launches: the dgrad (dx, the prologue's sums) and the wgrad (weight_sums).
void depthwise_backward(const DepthwiseTensors& t);
void retinanet_loss(const LossTensors& t);
void retinanet_loss_backward(const LossTensors& t);
void merge_forward(const MergeTensors& t);
void merge_backward(const MergeTensors& t);
void maxpool_forward(const PoolTensors& t);
void maxpool_backward(const PoolTensors& t);
void bn_finalize(const FinalizeTensors& t);
// in: d_scale, d_shift, d_mean, d_var (undefined: none), weight, mean, var; out: d_sums, d_sumsq, d_weight, d_bias.
void bn_finalize_backward(const std::vector<at::Tensor>& in, const std::vector<at::Tensor>& out, double count,
                          double eps);
}  // namespace cuda

}  // namespace spinenet_fast
