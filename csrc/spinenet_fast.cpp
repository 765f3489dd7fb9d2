// The one schema registry of spinenet_fast's compiled ops, and the Python module stub that loads it.
//
// Ops are declared here with TORCH_LIBRARY and implemented per dispatch key in <op>_cpu.cpp / <op>.cu.
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
  // Schemas land here with the fused-ops and CUDA issues.
}
