// The extension's ops: argument checks (before any launch), NHWC layouts, outputs and the final per-channel
// reductions, for both devices; the launchers in kernels_cpu.cpp / kernels_cuda.cu run the shared maths.
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <string>
#include <tuple>
#include <utility>

#include "launch.h"

namespace spinenet_fast {
namespace {

constexpr auto kNHWC = at::MemoryFormat::ChannelsLast;

// ATen work around the kernels that launches kernels of its own, logged like them (launch.h).
at::Tensor contiguous_logged(const at::Tensor& x, at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  if (x.is_contiguous(format)) return x;
  log_launch("aten::copy (layout)");
  return x.contiguous(format);
}

at::Tensor to_logged(const at::Tensor& x, at::ScalarType dtype) {
  if (x.scalar_type() == dtype) return x;
  log_launch("aten::copy (dtype)");
  return x.to(dtype);
}

at::Tensor zeros_logged(at::IntArrayRef size, const at::TensorOptions& options) {
  log_launch("aten::zeros");
  return at::zeros(size, options);
}

int parse_activation(c10::string_view activation) {
  if (activation == "identity") return kIdentity;
  if (activation == "relu") return kRelu;
  if (activation == "swish") return kSwish;
  TORCH_CHECK_VALUE(false, "activation must be one of ('identity', 'relu', 'swish'), got '", std::string(activation),
                    "'");
}

int parse_padding(c10::string_view padding) {
  if (padding == "torch") return 1;
  if (padding == "tf_same") return 0;
  TORCH_CHECK_VALUE(false, "padding must be one of ('torch', 'tf_same'), got '", std::string(padding), "'");
}

// The dtype of the maths, statistics and affines: float for fp32/bf16/fp16 storage, double for double.
at::ScalarType stats_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A tensor of a storage dtype the kernels take, on a device they run on.
void check_storage_dtype(const std::string& name, const at::Tensor& x) {
  TORCH_CHECK_TYPE(x.defined(), name, " must be a tensor, got None");
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                   name, " must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(x.is_cpu() || x.is_cuda(), name, " must be on the CPU or a CUDA device, got ", x.device());
}

void check_storage(const std::string& name, const at::Tensor& x) {
  check_storage_dtype(name, x);
  TORCH_CHECK_VALUE(x.dim() == 4, name, " must be 4-D (N, C, H, W), got shape ", x.sizes());
}

void check_like(const std::string& name, const at::Tensor& x, const at::Tensor& like, at::IntArrayRef shape) {
  TORCH_CHECK_TYPE(x.scalar_type() == like.scalar_type() && x.device() == like.device(), name, " must be ",
                   like.scalar_type(), " on ", like.device(), ", got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK_VALUE(x.sizes() == shape, name, " must have shape ", shape, ", got ", x.sizes());
}

// Whether x (N, C, H, W) is NHWC-contiguous within each sample, its samples a multiple of C elements apart and not
// overlapping (a dimension of size 1 may have any stride).
bool nhwc_samples(const at::Tensor& x) {
  const int64_t c = x.size(1), h = x.size(2), w = x.size(3);
  const bool inner = (c == 1 || x.stride(1) == 1) && (w == 1 || x.stride(3) == c) && (h == 1 || x.stride(2) == w * c);
  return inner && (x.size(0) == 1 || (x.stride(0) % c == 0 && x.stride(0) >= h * w * c));
}

// A per-channel (C,) vector in the maths dtype of `like`, on its device; returned contiguous.
at::Tensor channel_vector(const std::string& name, const at::Tensor& v, const at::Tensor& like) {
  TORCH_CHECK_TYPE(v.defined(), name, " must be a tensor, got None");
  TORCH_CHECK_TYPE(v.scalar_type() == stats_dtype(like), name, " must be ", stats_dtype(like), ", got ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == like.size(1) && v.device() == like.device(), name,
                    " must be a (", like.size(1), ",) tensor on ", like.device(), ", got shape ", v.sizes(), " on ",
                    v.device());
  return contiguous_logged(v);
}

// Checks the merge arguments and fills `t` with NHWC-contiguous inputs, coarse parent first; returns the output
// shape and sets `swapped` when the parents were reordered.
std::vector<int64_t> prepare_merge(MergeTensors& t, bool& swapped, at::TensorList parents, at::TensorList scales,
                                   at::TensorList shifts, at::IntArrayRef ratios, const std::optional<at::Tensor>& extra,
                                   const std::optional<at::Tensor>& row_scale, c10::string_view activation) {
  const auto k = parents.size();
  TORCH_CHECK_VALUE(k == 1 || k == 2, "parents: the extension's merge takes 1 or 2 parents, got ", k);
  TORCH_CHECK_VALUE(scales.size() == k && shifts.size() == k && ratios.size() == k,
                    "scales, shifts and ratios must have one entry per parent (", k, "), got ", scales.size(), ", ",
                    shifts.size(), " and ", ratios.size());
  t.act = parse_activation(activation);
  const at::Tensor& first = parents[0];
  check_storage("parents[0]", first);
  std::vector<int64_t> target;
  for (size_t i = 0; i < k; ++i) {
    const std::string name = "parents[" + std::to_string(i) + "]";
    check_storage(name, parents[i]);
    TORCH_CHECK_VALUE(ratios[i] >= 1, "ratios[", i, "] must be a positive int, got ", ratios[i]);
    const std::vector<int64_t> size{parents[i].size(0), parents[i].size(1), parents[i].size(2) * ratios[i],
                                    parents[i].size(3) * ratios[i]};
    if (i == 0) target = size;
    check_like(name, parents[i], first, {first.size(0), first.size(1), parents[i].size(2), parents[i].size(3)});
    TORCH_CHECK_VALUE(size == target, name, " of shape ", parents[i].sizes(), " upsampled ×", ratios[i], " gives ",
                      at::IntArrayRef(size), ", but parents[0] gives ", at::IntArrayRef(target));
    t.parents.push_back(contiguous_logged(parents[i], kNHWC));
    t.scales.push_back(channel_vector("scales[" + std::to_string(i) + "]", scales[i], first));
    t.shifts.push_back(channel_vector("shifts[" + std::to_string(i) + "]", shifts[i], first));
    t.ratios.push_back(ratios[i]);
  }
  if (extra) {
    check_like("extra", *extra, first, target);
    t.extra = contiguous_logged(*extra, kNHWC);
  }
  if (row_scale) {
    TORCH_CHECK_VALUE(row_scale->dim() == 1 && row_scale->size(0) == first.size(0) &&
                          row_scale->device() == first.device(),
                      "row_scale must be a (", first.size(0), ",) tensor on ", first.device(), ", got shape ",
                      row_scale->sizes(), " on ", row_scale->device());
    TORCH_CHECK_TYPE(row_scale->scalar_type() == t.scales[0].scalar_type(), "row_scale must be ",
                     t.scales[0].scalar_type(), ", got ", row_scale->scalar_type());
    t.row_scale = contiguous_logged(*row_scale);
  }
  swapped = k == 2 && t.ratios[1] > t.ratios[0];
  if (swapped) {
    for (auto* v : {&t.parents, &t.scales, &t.shifts}) std::swap((*v)[0], (*v)[1]);
    std::swap(t.ratios[0], t.ratios[1]);
  }
  t.scaled_parent = swapped ? 1 : 0;
  return target;
}

at::Tensor ext_merge(at::TensorList parents, at::TensorList scales, at::TensorList shifts, at::IntArrayRef ratios,
                     const std::optional<at::Tensor>& extra, const std::optional<at::Tensor>& row_scale,
                     c10::string_view activation) {
  MergeTensors t;
  bool swapped = false;
  const auto shape = prepare_merge(t, swapped, parents, scales, shifts, ratios, extra, row_scale, activation);
  t.out = at::empty(shape, parents[0].options().memory_format(kNHWC));
  const c10::DeviceGuard guard(t.out.device());
  if (t.out.numel() > 0) t.out.is_cuda() ? cuda::merge_forward(t) : cpu::merge_forward(t);
  return t.out;
}

// The (rows, channels) accumulator a backward adds its channel sums into: the caller's zeroed `sums_out` (checked),
// or a zeroed one (a fill).
at::Tensor sums_accumulator(const std::optional<at::Tensor>& sums_out, int64_t rows, int64_t channels,
                            const at::TensorOptions& options) {
  if (!sums_out) return zeros_logged({rows, channels}, options);
  const auto& out = *sums_out;
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef({rows, channels}) && out.is_contiguous() &&
                        out.device() == options.device(),
                    "sums_out must be a contiguous (", rows, ", ", channels, ") tensor on ", options.device(),
                    ", got ", out.sizes(), " on ", out.device());
  TORCH_CHECK_TYPE(out.scalar_type() == options.dtype().toScalarType(), "sums_out must be ",
                   options.dtype().toScalarType(), ", got ", out.scalar_type());
  return out;
}

std::vector<at::Tensor> ext_merge_backward(at::TensorList grads, at::TensorList parents, at::TensorList scales,
                                           at::TensorList shifts, at::IntArrayRef ratios,
                                           const std::optional<at::Tensor>& extra,
                                           const std::optional<at::Tensor>& row_scale, c10::string_view activation,
                                           const std::optional<at::Tensor>& sums_out) {
  MergeTensors t;
  bool swapped = false;
  const auto shape = prepare_merge(t, swapped, parents, scales, shifts, ratios, extra, row_scale, activation);
  TORCH_CHECK_VALUE(t.ratios[0] % t.ratios.back() == 0,
                    "ratios: the extension's merge backward needs one ratio to divide the other, got ", ratios);
  TORCH_CHECK_VALUE(!grads.empty() && grads.size() <= kMaxMergeGrads, "grads: the extension's merge backward sums 1 to ",
                    kMaxMergeGrads, " output gradients, got ", grads.size());
  for (size_t g = 0; g < grads.size(); ++g) check_like("grads[" + std::to_string(g) + "]", grads[g], parents[0], shape);
  // Read in place where every term is NHWC within a sample at one sample stride (a slice of a level-packed gradient,
  // as a RetinaNet head's backward returns it); else each copied NHWC-contiguous.
  const bool in_place = std::all_of(grads.begin(), grads.end(), [&](const at::Tensor& g) {
    return nhwc_samples(g) && g.stride(0) == grads[0].stride(0);
  });
  for (const auto& g : grads) t.grads.push_back(in_place ? g : contiguous_logged(g, kNHWC));
  const at::Tensor& grad = t.grads[0];
  for (const auto& p : t.parents) t.d_parents.push_back(at::empty_like(p, kNHWC));
  if (t.extra) t.d_extra = at::empty_like(*t.extra, kNHWC);
  const c10::DeviceGuard guard(grad.device());
  const int rows = t.row_scale ? kNumRowScaledMergeSums : kNumMergeSums;
  t.sums = sums_accumulator(sums_out, rows, grad.size(1), t.scales[0].options());
  if (grad.numel() > 0) grad.is_cuda() ? cuda::merge_backward(t) : cpu::merge_backward(t);
  if (swapped) std::swap(t.d_parents[0], t.d_parents[1]);
  // The sums stay in the kernel's coarse-first order (rows kScale0, kScale1, kShift, kShiftScaled): the op's contract,
  // which the Python side maps back to its parents as views, so no row is copied.
  std::vector<at::Tensor> out = t.d_parents;
  out.push_back(t.sums);
  if (t.d_extra) out.push_back(*t.d_extra);
  return out;
}

PoolTensors prepare_pool(const at::Tensor& y, const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& shift, c10::string_view activation, int64_t num_pools,
                         c10::string_view padding) {
  check_storage("y", y);
  TORCH_CHECK_VALUE(num_pools >= 1 && num_pools <= 16, "num_pools must be an int in [1, 16], got ", num_pools);
  const int64_t multiple = int64_t{1} << num_pools;
  TORCH_CHECK_VALUE(y.size(2) % multiple == 0 && y.size(3) % multiple == 0,
                    "y: H and W must be multiples of 2^num_pools = ", multiple, ", got shape ", y.sizes());
  TORCH_CHECK_VALUE(scale.has_value() == shift.has_value(),
                    "scale and shift must be given together (the BN affine) or both be None");
  PoolTensors t;
  t.y = contiguous_logged(y, kNHWC);
  if (scale) {
    t.scale = channel_vector("scale", *scale, y);
    t.shift = channel_vector("shift", *shift, y);
  }
  t.levels = static_cast<int>(num_pools);
  t.pad = parse_padding(padding);
  t.act = parse_activation(activation);
  return t;
}

std::tuple<at::Tensor, at::Tensor> ext_bn_act_maxpool(const at::Tensor& y, const std::optional<at::Tensor>& scale,
                                                      const std::optional<at::Tensor>& shift,
                                                      c10::string_view activation, int64_t num_pools,
                                                      c10::string_view padding, bool with_route) {
  PoolTensors t = prepare_pool(y, scale, shift, activation, num_pools, padding);
  const std::vector<int64_t> shape{y.size(0), y.size(1), y.size(2) >> num_pools, y.size(3) >> num_pools};
  t.out = at::empty(shape, y.options().memory_format(kNHWC));
  if (with_route) t.route = at::empty(shape, y.options().dtype(at::kInt).memory_format(kNHWC));
  const c10::DeviceGuard guard(y.device());
  if (t.out.numel() > 0) y.is_cuda() ? cuda::maxpool_forward(t) : cpu::maxpool_forward(t);
  return {t.out, with_route ? t.route : at::empty({0}, y.options().dtype(at::kInt))};
}

std::vector<at::Tensor> ext_bn_act_maxpool_backward(const at::Tensor& grad, const at::Tensor& y,
                                                    const at::Tensor& route, const std::optional<at::Tensor>& scale,
                                                    const std::optional<at::Tensor>& shift,
                                                    c10::string_view activation, int64_t num_pools,
                                                    c10::string_view padding,
                                                    const std::optional<at::Tensor>& sums_out) {
  PoolTensors t = prepare_pool(y, scale, shift, activation, num_pools, padding);
  const std::vector<int64_t> shape{y.size(0), y.size(1), y.size(2) >> num_pools, y.size(3) >> num_pools};
  check_like("grad", grad, y, shape);
  TORCH_CHECK_VALUE(route.scalar_type() == at::kInt && route.sizes() == at::IntArrayRef(shape) &&
                        route.device() == y.device(),
                    "route must be the forward's int32 ", at::IntArrayRef(shape), " route on ", y.device(), ", got ",
                    route.scalar_type(), " ", route.sizes(), " on ", route.device());
  t.grad = contiguous_logged(grad, kNHWC);
  t.route = contiguous_logged(route, kNHWC);
  t.sums = sums_accumulator(sums_out, kNumPrologueSums, y.size(1), y.options().dtype(stats_dtype(y)));
  t.d_y = at::empty_like(t.y, kNHWC);
  const c10::DeviceGuard guard(y.device());
  if (y.numel() > 0) y.is_cuda() ? cuda::maxpool_backward(t) : cpu::maxpool_backward(t);
  if (!t.scale.defined()) return {t.d_y};
  return {t.d_y, t.sums};  // rows kPrologueScale, kPrologueShift: the op's d_affine = [d_scale; d_shift]
}

// Checks the depthwise conv's arguments and fills `t` (x NHWC-contiguous, vectors contiguous).
DepthwiseTensors prepare_depthwise(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                                   c10::string_view activation, int64_t stride, int64_t pad) {
  check_storage("x", x);
  TORCH_CHECK_VALUE(stride == 1 || stride == 2, "stride must be 1 or 2, got ", stride);
  TORCH_CHECK_VALUE(pad == 0 || pad == 1, "pad must be 0 or 1 (the top/left padding), got ", pad);
  TORCH_CHECK_VALUE(x.size(2) % stride == 0 && x.size(3) % stride == 0, "x: H and W must be multiples of the stride ",
                    stride, ", got shape ", x.sizes());
  TORCH_CHECK_VALUE(scale.has_value() == shift.has_value(),
                    "scale and shift must be given together (the BN affine) or both be None");
  TORCH_CHECK_TYPE(weight.scalar_type() == stats_dtype(x), "weight must be ", stats_dtype(x), ", got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.sizes() == at::IntArrayRef({x.size(1), 9}) && weight.device() == x.device(),
                    "weight must be a (", x.size(1), ", 9) tensor on ", x.device(), ", got shape ", weight.sizes(),
                    " on ", weight.device());
  DepthwiseTensors t;
  t.x = contiguous_logged(x, kNHWC);
  t.weight = contiguous_logged(weight);
  if (bias) t.bias = channel_vector("bias", *bias, x);
  if (scale) {
    t.scale = channel_vector("scale", *scale, x);
    t.shift = channel_vector("shift", *shift, x);
  }
  t.stride = static_cast<int>(stride);
  t.pad = static_cast<int>(pad);
  t.act = parse_activation(activation);
  return t;
}

std::tuple<at::Tensor, at::Tensor> ext_depthwise3x3(const at::Tensor& x, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias,
                                                    const std::optional<at::Tensor>& scale,
                                                    const std::optional<at::Tensor>& shift,
                                                    c10::string_view activation, int64_t stride, int64_t pad,
                                                    const std::optional<at::Tensor>& stats_out) {
  DepthwiseTensors t = prepare_depthwise(x, weight, bias, scale, shift, activation, stride, pad);
  t.y = at::empty({x.size(0), x.size(1), x.size(2) / stride, x.size(3) / stride}, x.options().memory_format(kNHWC));
  // The statistics in float64 (summed in double), or in the maths dtype where stats_out has it.
  const bool maths_out = stats_out.has_value() && stats_out->scalar_type() == stats_dtype(x);
  t.sums = sums_accumulator(stats_out, kNumStatSums, x.size(1), x.options().dtype(maths_out ? stats_dtype(x)
                                                                                              : at::kDouble));
  const c10::DeviceGuard guard(x.device());
  if (t.y.numel() > 0) x.is_cuda() ? cuda::depthwise_forward(t) : cpu::depthwise_forward(t);
  return {t.y, t.sums};
}

std::vector<at::Tensor> ext_depthwise3x3_backward(const at::Tensor& dy, const std::optional<at::Tensor>& d_sum,
                                                  const std::optional<at::Tensor>& d_sumsq,
                                                  const std::optional<at::Tensor>& y, const at::Tensor& x,
                                                  const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                                                  const std::optional<at::Tensor>& shift, c10::string_view activation,
                                                  int64_t stride, int64_t pad,
                                                  const std::optional<at::Tensor>& prologue_sums_out) {
  DepthwiseTensors t = prepare_depthwise(x, weight, std::nullopt, scale, shift, activation, stride, pad);
  const std::vector<int64_t> shape{x.size(0), x.size(1), x.size(2) / stride, x.size(3) / stride};
  check_like("dy", dy, x, shape);
  t.dy = contiguous_logged(dy, kNHWC);
  TORCH_CHECK_VALUE(d_sum.has_value() == d_sumsq.has_value(),
                    "ext_depthwise3x3_backward: d_sum and d_sumsq must be given together (the statistics' gradients)"
                    " or both be None, got ", d_sum.has_value() ? "d_sum" : "d_sumsq", " alone");
  if (d_sum.has_value()) {  // without the statistics' gradients y is not read
    TORCH_CHECK_VALUE(y.has_value(),
                      "ext_depthwise3x3_backward: y is needed with the statistics' gradients, got None");
    check_like("y", *y, x, shape);
    t.y = contiguous_logged(*y, kNHWC);
    t.d_sum = channel_vector("d_sum", *d_sum, x);
    t.d_sumsq = channel_vector("d_sumsq", *d_sumsq, x);
  }
  t.dx = at::empty_like(t.x, kNHWC);
  const auto options = x.options().dtype(stats_dtype(x));
  t.sums = sums_accumulator(prologue_sums_out, kNumPrologueSums, x.size(1), options);
  t.weight_sums = zeros_logged({kNumDepthwiseWeightSums, x.size(1)}, options);
  const c10::DeviceGuard guard(x.device());
  if (x.numel() > 0) x.is_cuda() ? cuda::depthwise_backward(t) : cpu::depthwise_backward(t);
  // [dx, weight sums (9 taps' rows, then the bias' row), (prologue sums = [d_scale; d_shift])]
  if (!t.scale.defined()) return {t.dx, t.weight_sums};
  return {t.dx, t.weight_sums, t.sums};
}

// The per-channel vectors of the bn_finalize ops: `anchor` (float32/float64, 1-D, CPU or CUDA) and `others` (null:
// an absent optional, returned undefined), each checked against it and returned contiguous in its dtype.
std::vector<at::Tensor> statistics_vectors(const char* anchor_name, const at::Tensor& anchor,
                                           std::initializer_list<std::pair<const char*, const at::Tensor*>> others) {
  TORCH_CHECK_TYPE(anchor.scalar_type() == at::kFloat || anchor.scalar_type() == at::kDouble, anchor_name,
                   " must be float32 or float64, got ", anchor.scalar_type());
  TORCH_CHECK_VALUE(anchor.dim() == 1 && (anchor.is_cpu() || anchor.is_cuda()), anchor_name,
                    " must be a 1-D tensor on the CPU or a CUDA device, got shape ", anchor.sizes(), " on ",
                    anchor.device());
  std::vector<at::Tensor> vectors;
  for (const auto& [name, v] : others) {
    if (v == nullptr) {
      vectors.emplace_back();
      continue;
    }
    TORCH_CHECK_VALUE(v->sizes() == anchor.sizes() && v->device() == anchor.device(), name, " must have shape ",
                      anchor.sizes(), " on ", anchor.device(), ", got ", v->sizes(), " on ", v->device());
    TORCH_CHECK_TYPE(v->is_floating_point(), name, " must be floating-point, got ", v->scalar_type());
    vectors.push_back(contiguous_logged(to_logged(*v, anchor.scalar_type())));
  }
  return vectors;
}

void check_count_and_eps(int64_t count, double eps) {
  TORCH_CHECK_VALUE(count >= 1, "count must be a positive int (values per channel), got ", count);
  TORCH_CHECK_VALUE(eps > 0, "eps must be positive, got ", eps);
}

// The running statistics the finalize kernel updates: both given (then of the statistics' dtype, contiguous), or
// neither; the counter one int64 on the same device, or absent.
void check_running(const at::Tensor& anchor, const std::optional<at::Tensor>& running_mean,
                   const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& batches) {
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(),
                    "running_mean and running_var must be given together");
  for (const auto& [name, v] : {std::pair{"running_mean", &running_mean}, std::pair{"running_var", &running_var}}) {
    if (!v->has_value()) continue;
    TORCH_CHECK_VALUE((*v)->sizes() == anchor.sizes() && (*v)->device() == anchor.device() && (*v)->is_contiguous(),
                      name, " must be a contiguous tensor of shape ", anchor.sizes(), " on ", anchor.device(),
                      ", got ", (*v)->sizes(), " on ", (*v)->device());
    TORCH_CHECK_TYPE((*v)->scalar_type() == anchor.scalar_type(), name, " must be ", anchor.scalar_type(),
                     " like the statistics, got ", (*v)->scalar_type());
  }
  if (batches.has_value()) {
    TORCH_CHECK_VALUE(batches->numel() == 1 && batches->scalar_type() == at::kLong &&
                          batches->device() == anchor.device(),
                      "batches must be one int64 on ", anchor.device(), ", got ", batches->numel(), " ",
                      batches->scalar_type(), " on ", batches->device());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ext_bn_finalize(
    const at::Tensor& sums, const at::Tensor& sumsq, int64_t count, const at::Tensor& weight, const at::Tensor& bias,
    double eps, const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& batches, double momentum, double unbias) {
  // Σ, Σ² in their dtype (float32 or float64); γ, β and the outputs in γ's dtype, at least float32.
  const std::vector<at::Tensor> stats = statistics_vectors("sums", sums, {{"sums", &sums}, {"sumsq", &sumsq}});
  TORCH_CHECK_VALUE(weight.sizes() == sums.sizes() && weight.device() == sums.device(), "weight must have shape ",
                    sums.sizes(), " on ", sums.device(), " like the statistics, got ", weight.sizes(), " on ",
                    weight.device());
  TORCH_CHECK_TYPE(weight.is_floating_point(), "weight must be floating-point, got ", weight.scalar_type());
  const at::Tensor affine = to_logged(weight, weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const std::vector<at::Tensor> in = statistics_vectors("weight", affine, {{"weight", &weight}, {"bias", &bias}});
  check_count_and_eps(count, eps);
  check_running(in[0], running_mean, running_var, batches);
  FinalizeTensors t{stats[0], stats[1], in[0], in[1]};
  t.scale = at::empty_like(in[0]), t.shift = at::empty_like(in[0]);
  t.mean = at::empty_like(in[0]), t.var = at::empty_like(in[0]);
  t.running_mean = running_mean.value_or(at::Tensor()), t.running_var = running_var.value_or(at::Tensor());
  t.batches = batches.value_or(at::Tensor());
  t.count = static_cast<double>(count), t.eps = eps, t.momentum = momentum, t.unbias = unbias;
  const c10::DeviceGuard guard(sums.device());
  if (sums.numel() > 0) {
    sums.is_cuda() ? cuda::bn_finalize(t) : cpu::bn_finalize(t);
  } else if (t.batches.defined()) {
    t.batches.add_(1);  // no channel to count the batch: nothing else to do either
  }
  return {t.scale, t.shift, t.mean, t.var};
}

std::vector<at::Tensor> ext_bn_finalize_backward(const at::Tensor& d_scale, const at::Tensor& d_shift,
                                                 const std::optional<at::Tensor>& d_mean,
                                                 const std::optional<at::Tensor>& d_var, const at::Tensor& weight,
                                                 const at::Tensor& mean, const at::Tensor& var, int64_t count,
                                                 double eps) {
  const std::vector<at::Tensor> in = statistics_vectors(
      "mean", mean,
      {{"d_scale", &d_scale}, {"d_shift", &d_shift}, {"d_mean", d_mean ? &*d_mean : nullptr},
       {"d_var", d_var ? &*d_var : nullptr}, {"weight", &weight}, {"mean", &mean}, {"var", &var}});
  check_count_and_eps(count, eps);
  at::Tensor d_stats = at::empty({2, mean.numel()}, mean.options());
  std::vector<at::Tensor> out{d_stats[0], d_stats[1], at::empty_like(in[5]), at::empty_like(in[5])};
  const c10::DeviceGuard guard(mean.device());
  if (mean.numel() > 0) {
    mean.is_cuda() ? cuda::bn_finalize_backward(in, out, static_cast<double>(count), eps)
                   : cpu::bn_finalize_backward(in, out, static_cast<double>(count), eps);
  }
  return {d_stats, out[2], out[3]};
}

// Checks the loss arguments (shapes, dtypes, device) and fills `t` with contiguous ones: logits and regression in
// their storage dtype, the boxes in the maths dtype.
LossTensors prepare_loss(const at::Tensor& cls_logits, const at::Tensor& box_regression, const at::Tensor& matched,
                         const at::Tensor& gt_labels, const at::Tensor& gt_boxes, const at::Tensor& anchors,
                         double alpha, double gamma, double delta) {
  TORCH_CHECK_VALUE(cls_logits.dim() == 3 && cls_logits.size(2) >= 1, "cls_logits must be (N, A, K) with K >= 1, got ",
                    cls_logits.sizes());
  const int64_t n = cls_logits.size(0), a = cls_logits.size(1);
  TORCH_CHECK_VALUE(gt_labels.dim() == 2, "gt_labels must be (N, G), got ", gt_labels.sizes());
  const int64_t g = gt_labels.size(1);
  check_like("box_regression", box_regression, cls_logits, {n, a, 4});
  const std::initializer_list<std::tuple<const char*, const at::Tensor*, at::ScalarType, std::vector<int64_t>>> small{
      {"matched", &matched, at::kLong, {n, a}},
      {"gt_labels", &gt_labels, at::kLong, {n, g}},
      {"gt_boxes", &gt_boxes, stats_dtype(cls_logits), {n, g, 4}},
      {"anchors", &anchors, stats_dtype(cls_logits), {n, a, 4}}};
  for (const auto& [name, x, dtype, shape] : small) {
    TORCH_CHECK_VALUE(x->sizes() == at::IntArrayRef(shape) && x->device() == cls_logits.device(), name,
                      " must have shape ", at::IntArrayRef(shape), " on ", cls_logits.device(), ", got ", x->sizes(),
                      " on ", x->device());
    TORCH_CHECK_TYPE(x->scalar_type() == dtype, name, " must be ", dtype, ", got ", x->scalar_type());
  }
  TORCH_CHECK_VALUE(alpha >= 0 && alpha <= 1 && gamma >= 0 && delta > 0,
                    "alpha must be in [0, 1], gamma >= 0 and delta > 0, got ", alpha, ", ", gamma, ", ", delta);
  LossTensors t;
  t.logits = contiguous_logged(cls_logits), t.regression = contiguous_logged(box_regression);
  t.matched = contiguous_logged(matched), t.labels = contiguous_logged(gt_labels);
  t.boxes = contiguous_logged(gt_boxes), t.anchors = contiguous_logged(anchors);
  t.alpha = alpha, t.gamma = gamma, t.delta = delta;
  return t;
}

at::Tensor ext_retinanet_loss(const at::Tensor& cls_logits, const at::Tensor& box_regression, const at::Tensor& matched,
                              const at::Tensor& gt_labels, const at::Tensor& gt_boxes, const at::Tensor& anchors,
                              double alpha, double gamma, double delta) {
  check_storage_dtype("cls_logits", cls_logits);
  LossTensors t = prepare_loss(cls_logits, box_regression, matched, gt_labels, gt_boxes, anchors, alpha, gamma, delta);
  const c10::DeviceGuard guard(cls_logits.device());
  t.sums = zeros_logged({kNumLossSums, cls_logits.size(2)}, cls_logits.options().dtype(stats_dtype(cls_logits)));
  if (cls_logits.numel() > 0) cls_logits.is_cuda() ? cuda::retinanet_loss(t) : cpu::retinanet_loss(t);
  log_launch("aten::sum");
  return t.sums.sum(1);
}

std::tuple<at::Tensor, at::Tensor> ext_retinanet_loss_backward(
    const at::Tensor& grad, const at::Tensor& cls_logits, const at::Tensor& box_regression, const at::Tensor& matched,
    const at::Tensor& gt_labels, const at::Tensor& gt_boxes, const at::Tensor& anchors, double alpha, double gamma,
    double delta) {
  check_storage_dtype("cls_logits", cls_logits);
  LossTensors t = prepare_loss(cls_logits, box_regression, matched, gt_labels, gt_boxes, anchors, alpha, gamma, delta);
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({kNumLossSums}) && grad.device() == cls_logits.device(),
                    "grad must have shape (3,) on ", cls_logits.device(), ", got ", grad.sizes(), " on ",
                    grad.device());
  t.grad = contiguous_logged(to_logged(grad, stats_dtype(cls_logits)));
  t.d_logits = at::empty_like(t.logits), t.d_regression = at::empty_like(t.regression);
  const c10::DeviceGuard guard(cls_logits.device());
  if (cls_logits.numel() > 0) cls_logits.is_cuda() ? cuda::retinanet_loss_backward(t) : cpu::retinanet_loss_backward(t);
  return {t.d_logits, t.d_regression};
}

// The same functions serve both dispatch keys: they pick the launchers by the tensors' device.
void register_impls(torch::Library& m) {
  m.impl("ext_retinanet_loss", &ext_retinanet_loss);
  m.impl("ext_retinanet_loss_backward", &ext_retinanet_loss_backward);
  m.impl("ext_depthwise3x3", &ext_depthwise3x3);
  m.impl("ext_depthwise3x3_backward", &ext_depthwise3x3_backward);
  m.impl("ext_merge", &ext_merge);
  m.impl("ext_merge_backward", &ext_merge_backward);
  m.impl("ext_bn_act_maxpool", &ext_bn_act_maxpool);
  m.impl("ext_bn_act_maxpool_backward", &ext_bn_act_maxpool_backward);
  m.impl("ext_bn_finalize", &ext_bn_finalize);
  m.impl("ext_bn_finalize_backward", &ext_bn_finalize_backward);
}

}  // namespace

TORCH_LIBRARY_IMPL(spinenet_fast, CPU, m) { register_impls(m); }

TORCH_LIBRARY_IMPL(spinenet_fast, CUDA, m) { register_impls(m); }

}  // namespace spinenet_fast
