// The one schema registry of spinenet_fast's compiled ops, and the Python module stub that loads it.
//
// The public ops (spinenet_fast::merge, ::bn_act_maxpool, ::bn_finalize, ...) are torch.library custom ops
// defined in Python, so that they exist without this extension; their "cuda" backend calls the compiled
// kernels declared here (implemented in ops.cpp for the CPU and CUDA dispatch keys). Layouts and argument
// conventions are those of the Python ops; every 4-D output is channels_last.
#include <Python.h>
#include <torch/library.h>

#include <atomic>
#include <mutex>
#include <string>
#include <vector>

namespace spinenet_fast {
namespace {
std::atomic<bool> logging{false};  // off unless benchmarks/ledger.py asks: nothing is kept otherwise
std::mutex log_mutex;
std::vector<std::string> launch_log;
}  // namespace

void log_launch(const char* name) {
  if (!logging.load(std::memory_order_relaxed)) return;
  const std::lock_guard<std::mutex> lock(log_mutex);
  launch_log.emplace_back(name);
}

// The kernels logged since the last call (and clears them); logging continues while `enable` is true.
std::vector<std::string> launch_log_take(bool enable) {
  const std::lock_guard<std::mutex> lock(log_mutex);
  logging.store(enable);
  std::vector<std::string> taken;
  taken.swap(launch_log);
  return taken;
}
}  // namespace spinenet_fast

extern "C" {
// `import spinenet_fast._C` runs the static TORCH_LIBRARY registration below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(spinenet_fast, m) {
  // act(Σ_i f_i·(scale_i·parents_i[h/ρ_i, w/ρ_i] + shift_i) + extra); 1 or 2 parents; f_0 = row_scale[n] (a
  // per-sample factor; 1 without), f_1 = 1.
  m.def(
      "ext_merge(Tensor[] parents, Tensor[] scales, Tensor[] shifts, int[] ratios, Tensor? extra, Tensor? row_scale,"
      " str activation) -> Tensor");
  // [*d_parents, sums (coarse-first Σ f_i·d_pre·y_i rows, Σ d_pre, with a row_scale Σ row_scale·d_pre), (d_extra)]
  // for the output gradient Σ grads (1 to 4 terms, one per reader of the output); with `sums_out` (zeroed, (3, C) or
  // (4, C)) the sums are added into it and the returned sums are that tensor.
  m.def(
      "ext_merge_backward(Tensor[] grads, Tensor[] parents, Tensor[] scales, Tensor[] shifts, int[] ratios,"
      " Tensor? extra, Tensor? row_scale, str activation, Tensor(a!)? sums_out=None) -> Tensor[]");
  // Depthwise 3×3 conv of stride 1 or 2 (top/left padding `pad`, bottom/right up to the window) of act(scale·x +
  // shift) (of x without them): (y (N, C, H/s, W/s) channels_last, [Σy; Σy²] (2, C)); weight (C, 9) and bias (C,) in
  // the maths dtype (rounded to x's dtype by the caller); with `stats_out` (zeroed, (2, C)) the statistics are added
  // into it and returned.
  m.def(
      "ext_depthwise3x3(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? shift, str activation,"
      " int stride, int pad, Tensor(a!)? stats_out=None) -> (Tensor, Tensor)");
  // [dx, (10, C) sums: Σ g·a per tap (rows 0-8) and Σ g (row 9, the bias), ([d_scale; d_shift])] for g = dy + d_sum
  // + 2·y·d_sumsq (g = dy with d_sum, d_sumsq None: y not read, may be None); two launches (dgrad, wgrad); with
  // `prologue_sums_out` (zeroed (2, C)) the prologue's sums are added into it and returned.
  m.def(
      "ext_depthwise3x3_backward(Tensor dy, Tensor? d_sum, Tensor? d_sumsq, Tensor? y, Tensor x, Tensor weight,"
      " Tensor? scale, Tensor? shift, str activation, int stride, int pad, Tensor(a!)? prologue_sums_out=None)"
      " -> Tensor[]");
  // num_pools chained 3×3/s2 max-pools of act(scale·y + shift) (of y without scale/shift), and with `with_route`
  // the int32 (N, C, OH, OW) channels_last route: the level-0 pixel h·W + w each output's gradient goes to (else an
  // empty tensor).
  m.def(
      "ext_bn_act_maxpool(Tensor y, Tensor? scale, Tensor? shift, str activation, int num_pools, str padding,"
      " bool with_route) -> (Tensor, Tensor)");
  // [d_y, (sums = [d_scale; d_shift])], gathered through the forward's route; with `sums_out` (zeroed, (2, C)) the
  // sums are added into it and the returned sums are that tensor.
  m.def(
      "ext_bn_act_maxpool_backward(Tensor grad, Tensor y, Tensor route, Tensor? scale, Tensor? shift,"
      " str activation, int num_pools, str padding, Tensor(a!)? sums_out=None) -> Tensor[]");
  // (scale, shift, mean, var) from per-channel Σ, Σ² of `count` values; in the same kernel, where given, the running
  // statistics ← lerp(running, batch, momentum) (variance × unbias) and `batches` + 1.
  m.def(
      "ext_bn_finalize(Tensor sums, Tensor sumsq, int count, Tensor weight, Tensor bias, float eps,"
      " Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? batches, float momentum, float unbias)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  // [d_stats = [dΣ; dΣ²] (2, C), dγ, dβ] (in the statistics' dtype) of ext_bn_finalize's scale and shift (and mean,
  // var where their gradients are given).
  m.def(
      "ext_bn_finalize_backward(Tensor d_scale, Tensor d_shift, Tensor? d_mean, Tensor? d_var, Tensor weight,"
      " Tensor mean, Tensor var, int count, float eps) -> Tensor[]");
  // RetinaNet's loss sums (3,) [Σ focal (rows not ignored), Σ box Huber / 4 (matched rows), matched rows] of
  // cls_logits (N, A, K) and box_regression (N, A, 4) for matched (N, A) (ground-truth index, −1 background, −2
  // ignored), gt_labels (N, G), gt_boxes (N, G, 4), anchors (N, A, 4); and its backward (d_cls_logits,
  // d_box_regression) for the sums' gradient (3,).
  m.def(
      "ext_retinanet_loss(Tensor cls_logits, Tensor box_regression, Tensor matched, Tensor gt_labels, Tensor gt_boxes,"
      " Tensor anchors, float alpha, float gamma, float delta) -> Tensor");
  m.def(
      "ext_retinanet_loss_backward(Tensor grad, Tensor cls_logits, Tensor box_regression, Tensor matched,"
      " Tensor gt_labels, Tensor gt_boxes, Tensor anchors, float alpha, float gamma, float delta)"
      " -> (Tensor, Tensor)");
  // The names of the kernels the extension launched since the last call, logged while enabled (launch.h), for
  // benchmarks/ledger.py; `enable` switches logging on or off from now on.
  m.def("ext_launch_log(bool enable) -> str[]", &spinenet_fast::launch_log_take);
}
