// The one schema registry of spinenet_fast's compiled ops, and the Python module stub that loads it.
//
// The public ops (spinenet_fast::merge, ::bn_act_maxpool, ::bn_finalize, ...) are torch.library custom ops
// defined in Python, so that they exist without this extension; their "cuda" backend calls the compiled
// kernels declared here (implemented in ops.cpp for the CPU and CUDA dispatch keys). Layouts and argument
// conventions are those of the Python ops; every 4-D output is channels_last.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import spinenet_fast._C` runs the static TORCH_LIBRARY registration below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(spinenet_fast, m) {
  // act(Σ_i scale_i·parents_i[h/ρ_i, w/ρ_i] + shift_i + extra); 1 or 2 parents.
  m.def(
      "ext_merge(Tensor[] parents, Tensor[] scales, Tensor[] shifts, int[] ratios, Tensor? extra, str activation)"
      " -> Tensor");
  // [*d_parents, *d_scales, *d_shifts, (d_extra)]
  m.def(
      "ext_merge_backward(Tensor grad, Tensor[] parents, Tensor[] scales, Tensor[] shifts, int[] ratios,"
      " Tensor? extra, str activation) -> Tensor[]");
  // num_pools chained 3×3/s2 max-pools of act(scale·y + shift) (of y without scale/shift).
  m.def(
      "ext_bn_act_maxpool(Tensor y, Tensor? scale, Tensor? shift, str activation, int num_pools, str padding)"
      " -> Tensor");
  // [d_y, (d_scale, d_shift)]
  m.def(
      "ext_bn_act_maxpool_backward(Tensor grad, Tensor y, Tensor? scale, Tensor? shift, str activation,"
      " int num_pools, str padding) -> Tensor[]");
  // [scale, shift, mean, var] from per-channel Σ, Σ² of `count` values.
  m.def("ext_bn_finalize(Tensor sums, Tensor sumsq, int count, Tensor weight, Tensor bias, float eps) -> Tensor[]");
}
