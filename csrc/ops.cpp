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

  // Lion on many tensors at once (one CUDA launch per dtype combination): element-wise the
  // same as lion_update_ on each (params[i], exp_avgs[i], grads[i]).
  m.def(
      "lion_update_multi_(Tensor(a!)[] params, Tensor(b!)[] exp_avgs, Tensor[] grads, float lr, "
      "float beta1, float beta2, float weight_decay) -> ()");

  // Fragment ops. A fragment is elements [start, start + numel) of the row-major flat index
  // of a global [R, C] matrix (it may start and end mid-row); statistics are partial sums
  // over the elements held, which a sharded run completes with one all-reduce per phase.

  // SAGE (spec §1): partial column sums of |grad|, fp32, length C.
  m.def("colsum_abs(Tensor grad, int C, int start) -> Tensor");

  // Sinkhorn / SinkGD / SCALE (spec §2-4): partial sums of (x[i,j] r[i] c[j])^2 along
  // dim 1 (one per row, length R) or dim 0 (one per column, length C); r, c fp32 or None (1).
  // x is grad, or, given the momentum m (fp32), SCALE's head momentum beta m + (1 - beta) grad
  // formed on the fly (m is not written).
  m.def(
      "sq_sums(Tensor grad, Tensor? r, Tensor? c, int R, int C, int start, int dim, "
      "Tensor? m=None, float beta=0.) -> Tensor");

  // SAGE (spec §1): weight decay, momentum, sign and damped update in one pass;
  // h is the per-column damper H (length C, fp32).
  m.def(
      "sage_update_(Tensor(a!) param, Tensor(b!) m, Tensor grad, Tensor h, int C, int start, "
      "float lr, float beta1, float beta2, float weight_decay, bool momentum_first) -> ()");

  // Sinkhorn / SinkGD / SCALE: param <- param (1 - lr wd) - step (grad r c), with the row
  // scale r (indexed by global row) and column scale c optional.
  m.def(
      "scaled_update_(Tensor(a!) param, Tensor grad, Tensor? r, Tensor? c, int C, int start, "
      "float lr, float weight_decay, float step) -> ()");

  // One Sinkhorn half-iteration's rescale (spec §2-3), given the complete sums of squares s
  // of each line: scale * target / (scale * sqrt(s) + eps) where s > 0, else scale.
  m.def("sinkhorn_rescale(Tensor scale, Tensor s, float target, float eps) -> Tensor");

  // Uniform Sinkhorn / SinkGD (spec §2-3) on a WHOLE [R, C] matrix held by one process:
  // all `iters` row-then-column iterations (sq_sums, then the rescale of each scale), returning
  // the row and column scales (r, c). The same numbers as the phase-by-phase path, without a
  // round trip to Python between passes.
  m.def(
      "sinkhorn_scales(Tensor grad, int R, int C, int iters, float eps, float row_target, "
      "float col_target) -> (Tensor, Tensor)");

  // Many fragments at once (one CUDA launch per dtype pair): element-wise the same as
  // scaled_update_ / sage_update_ on each entry of the lists. Here r and c are required
  // (pass ones for an absent scale: multiplying by 1 is exact).
  m.def(
      "scaled_update_multi_(Tensor(a!)[] params, Tensor[] grads, Tensor[] rs, Tensor[] cs, "
      "int[] Cs, int[] starts, float lr, float weight_decay, float step) -> ()");
  m.def(
      "sage_update_multi_(Tensor(a!)[] params, Tensor(b!)[] ms, Tensor[] grads, Tensor[] hs, "
      "int[] Cs, int[] starts, float lr, float beta1, float beta2, float weight_decay, "
      "bool momentum_first) -> ()");

  // SCALE's head (spec §4): m <- beta m + (1 - beta) grad, then scaled_update_ with m in
  // place of grad, in one pass.
  m.def(
      "momentum_scaled_update_(Tensor(a!) param, Tensor(b!) m, Tensor grad, Tensor? r, "
      "Tensor? c, int C, int start, float beta, float lr, float weight_decay, float step) -> ()");

  // out (bf16) <- src (fp32) rounded stochastically; element k draws its random bits from
  // (seed, offset + k), so a fragment starting at flat index `offset` rounds exactly as the
  // same elements of the whole tensor would.
  m.def("round_bf16_(Tensor(a!) out, Tensor src, int seed, int offset) -> ()");
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
