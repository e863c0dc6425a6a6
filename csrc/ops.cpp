// Operator schemas of the sage_dist library: declared here, once. Kernels are
// registered per device in csrc/cpu/ and csrc/cuda/; fake (meta) kernels and the
// pure-PyTorch fallbacks live in sage_dist/ops.py.
//
// Annotations: Tensor(a!) marks an argument the op writes in place; each mutated
// argument gets its own alias set so torch.compile / functionalization know exactly
// what changes.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(sage_dist, m) {
  // The fake (meta) kernels are registered from Python; this tells torch where to find
  // them if an op is traced before anyone imported sage_dist.ops.
  m.set_python_module("sage_dist.ops");

  // Lion (spec §5): updates param and exp_avg in place from grad.
  m.def(
      "lion_update_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor grad, float lr, "
      "float beta1, float beta2, float weight_decay) -> ()");
}

// `import sage_dist._C` only needs to load this library (which runs the static
// registrations above and in the kernel files); the module itself is empty. A bare
// module init avoids pybind11 and keeps compile times short.
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
