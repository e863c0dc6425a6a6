// The module init of sage_dist._C. The op schemas are declared once, in Python
// (sage_dist/ops/schemas.py), with each op's pure-PyTorch reference as the dispatcher's
// default; this library only adds native kernels per device, registered where they are
// written (TORCH_LIBRARY_IMPL(sage_dist, CPU, m) in csrc/cpu/, CUDA in csrc/cuda/). The
// dispatcher accepts those registrations before the schemas exist and checks each kernel's
// signature against its schema when the schema is defined.
//
// `import sage_dist._C` only needs to load this library (which runs the static
// registrations in the kernel files); the module itself is empty. A bare module init avoids
// pybind11 and keeps compile times short.

#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "sage_dist native kernels; the ops are under torch.ops.sage_dist",
      -1,  // no per-module state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
