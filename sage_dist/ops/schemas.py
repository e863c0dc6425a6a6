"""The sage_dist operator library: every schema declared here, once.

Layering, as in bitsandbytes and torchao:
  * schemas: `SCHEMAS` below, defined with torch.library in namespace `sage_dist`;
  * default implementation: each op's pure-PyTorch reference (reference.py), registered as
    CompositeExplicitAutograd, so the dispatcher itself falls back to it on any device without
    a native kernel (one RuntimeWarning per op and device type);
  * native kernels: registered per device by the extension sage_dist._C
    (`TORCH_LIBRARY_IMPL(sage_dist, CPU | CUDA, m)` in csrc/cpu/ and csrc/cuda/), which take
    precedence over the default on their device;
  * fake kernels (for torch.compile and meta tensors): from one table of output shapes.

Annotations: Tensor(a!) marks an argument the op writes in place; each mutated argument has its
own alias set so functionalization knows exactly what changes. A fragment is elements
[start, start + numel) of the row-major flat index of a global [R, C] matrix (it may start and
end mid-row); statistics are partial sums over the elements held, which a sharded run
completes with one all-reduce per phase.
"""
from __future__ import annotations

import os
import warnings

import torch

from . import reference

SCHEMAS = {
    # Lion (docs/ALGORITHMS.md §5), in place on param and exp_avg.
    "lion_update_": "lion_update_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor grad, float lr, "
                    "float beta1, float beta2, float weight_decay) -> ()",
    # SAGE (§1): partial column sums of |grad|, fp32, length C.
    "colsum_abs": "colsum_abs(Tensor grad, int C, int start) -> Tensor",
    # The same sums and, from the same pass, [1.] if grad holds a NaN or an Inf, else [0.].
    "colsum_abs_check": "colsum_abs_check(Tensor grad, int C, int start) -> (Tensor, Tensor)",
    # Sinkhorn / SinkGD / SCALE (§2-4): partial sums of (x[i,j] r[i] c[j])^2 along dim 1 (per
    # row, length R) or dim 0 (per column, length C); r, c fp32 or None (1). x is grad, or with
    # the momentum m, SCALE's head momentum beta m + (1 - beta) grad formed on the fly.
    "sq_sums": "sq_sums(Tensor grad, Tensor? r, Tensor? c, int R, int C, int start, int dim, "
               "Tensor? m=None, float beta=0.) -> Tensor",
    # SAGE: decay, momentum, sign and damped update in one pass; h is the per-column damper.
    "sage_update_": "sage_update_(Tensor(a!) param, Tensor(b!) m, Tensor grad, Tensor h, int C, "
                    "int start, float lr, float beta1, float beta2, float weight_decay, "
                    "bool momentum_first) -> ()",
    # param <- param (1 - lr wd) - step (grad r c); r indexed by global row, both optional.
    "scaled_update_": "scaled_update_(Tensor(a!) param, Tensor grad, Tensor? r, Tensor? c, "
                      "int C, int start, float lr, float weight_decay, float step) -> ()",
    # SCALE's head (§4): m <- beta m + (1 - beta) grad, then the scaled update with m.
    "momentum_scaled_update_": "momentum_scaled_update_(Tensor(a!) param, Tensor(b!) m, "
                               "Tensor grad, Tensor? r, Tensor? c, int C, int start, float beta, "
                               "float lr, float weight_decay, float step) -> ()",
    # One half-iteration's rescale from the complete sums of squares s of each line.
    "sinkhorn_rescale": "sinkhorn_rescale(Tensor scale, Tensor s, float target, float eps) "
                        "-> Tensor",
    # Every iteration of a WHOLE [R, C] matrix held by one process: (r, c).
    "sinkhorn_scales": "sinkhorn_scales(Tensor grad, int R, int C, int iters, float eps, "
                       "float row_target, float col_target) -> (Tensor, Tensor)",
    # One iteration over a fragment of WHOLE rows (FSDP2): each row's sum of (g c)^2 (c None:
    # ones), its new scale into r (the fragment's rows, in place), then the fragment's column
    # sums of (g r)^2 with the new scales (to be all-reduced), and, with check, [1.] if grad
    # holds a NaN or an Inf (else [0.]). The numbers of sq_sums + sinkhorn_rescale, in one pass.
    "sinkhorn_sweep_": "sinkhorn_sweep_(Tensor grad, Tensor(a!) r, Tensor? c, int C, "
                       "float row_target, float eps, bool check) -> (Tensor, Tensor)",
    # sinkhorn_scales of many whole matrices in one call, into rs[i], cs[i]; flags[i] ([1]) <-
    # 1 if grads[i] holds a NaN or an Inf, else 0.
    "sinkhorn_scales_multi_": "sinkhorn_scales_multi_(Tensor[] grads, Tensor(a!)[] rs, "
                              "Tensor(b!)[] cs, Tensor(c!)[] flags, int[] Rs, int[] Cs, "
                              "float[] row_targets, float[] col_targets, int iters, float eps) "
                              "-> ()",
    # The same scales, then for each finite gradient the scaled update of its parameter
    # (scaled_update_ with the scales; a parameter whose gradient is not finite is left as it is).
    "sinkhorn_update_multi_": "sinkhorn_update_multi_(Tensor(a!)[] params, Tensor[] grads, "
                              "Tensor(b!)[] flags, int[] Rs, int[] Cs, float[] row_targets, "
                              "float[] col_targets, int iters, float eps, float lr, "
                              "float weight_decay, float step) -> ()",
    # Many tensors or fragments in one call (one CUDA launch per dtype pair), element for element
    # as the single ops; scaled_update_multi_ takes both scales (pass ones: multiplying by 1 is
    # exact).
    "lion_update_multi_": "lion_update_multi_(Tensor(a!)[] params, Tensor(b!)[] exp_avgs, "
                          "Tensor[] grads, float lr, float beta1, float beta2, "
                          "float weight_decay) -> ()",
    "scaled_update_multi_": "scaled_update_multi_(Tensor(a!)[] params, Tensor[] grads, "
                            "Tensor[] rs, Tensor[] cs, int[] Cs, int[] starts, float lr, "
                            "float weight_decay, float step) -> ()",
    "sage_update_multi_": "sage_update_multi_(Tensor(a!)[] params, Tensor(b!)[] ms, "
                          "Tensor[] grads, Tensor[] hs, int[] Cs, int[] starts, float lr, "
                          "float beta1, float beta2, float weight_decay, bool momentum_first) "
                          "-> ()",
    # out (bf16) <- src (fp32) rounded stochastically; element k draws its random bits from
    # (seed, offset + k), so a fragment rounds exactly as the same elements of the whole tensor.
    "round_bf16_": "round_bf16_(Tensor(a!) out, Tensor src, int seed, int offset) -> ()",
}

# Output shapes of the ops that return tensors (the others return nothing).
_f32 = dict(dtype=torch.float32)
FAKE_OUTPUTS = {
    "colsum_abs": lambda grad, C, start: grad.new_empty((C,), **_f32),
    "colsum_abs_check": lambda grad, C, start: (grad.new_empty((C,), **_f32),
                                                grad.new_empty((1,), **_f32)),
    "sinkhorn_sweep_": lambda grad, r, c, C, row_target, eps, check: (
        grad.new_empty((C,), **_f32), grad.new_empty((1,), **_f32)),
    "sq_sums": lambda grad, r, c, R, C, start, dim, m=None, beta=0.0:
        grad.new_empty((C if dim == 0 else R,), **_f32),
    "sinkhorn_rescale": lambda scale, s, target, eps: torch.empty_like(scale),
    "sinkhorn_scales": lambda grad, R, C, *_: (grad.new_empty((R,), **_f32),
                                               grad.new_empty((C,), **_f32)),
}

_lib = torch.library.Library("sage_dist", "DEF")  # kept alive: it owns the registrations
_warned: set[tuple[str, str]] = set()

# The native library registers its kernels against the schemas above; SAGE_DIST_NO_EXTENSION=1
# leaves it out (every op then runs its reference), for tests and debugging.
if os.environ.get("SAGE_DIST_NO_EXTENSION") == "1":
    HAS_EXTENSION, EXTENSION_ERROR = False, "not loaded: SAGE_DIST_NO_EXTENSION=1"
else:
    try:
        from .. import _C  # noqa: F401  (loading it registers the kernels)
    except ImportError as exc:  # not built, or built against another torch
        HAS_EXTENSION, EXTENSION_ERROR = False, f"{type(exc).__name__}: {exc}"
    else:
        HAS_EXTENSION, EXTENSION_ERROR = True, None


def _device_type(args) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0].device.type
    return "cpu"


def warn_fallback_once(op: str, device_type: str) -> None:
    if (op, device_type) in _warned:
        return
    _warned.add((op, device_type))
    why = (f"the native extension sage_dist._C is not loaded ({EXTENSION_ERROR}); build it "
           f"with `pip install --no-build-isolation -e .`" if not HAS_EXTENSION
           else "sage_dist._C has none for this device")
    warnings.warn(f"sage_dist: no native {device_type} kernel for sage_dist::{op} ({why}); "
                  f"using the slower pure-PyTorch fallback.", RuntimeWarning, stacklevel=4)


def _default(name: str):
    ref = getattr(reference, name)

    def run_reference(*args):
        warn_fallback_once(name, _device_type(args))
        return ref(*args)

    run_reference.__name__ = f"{name}_default"
    return run_reference


def _fake(name: str):
    shape = FAKE_OUTPUTS.get(name)
    return shape if shape is not None else (lambda *args: None)


for _name, _schema in SCHEMAS.items():
    _lib.define(_schema)
    _lib.impl(_name, _default(_name), "CompositeExplicitAutograd")
    torch.library.register_fake(f"sage_dist::{_name}", _fake(_name), lib=_lib)


def has_kernel(op: str, device_type: str) -> bool:
    """Whether a native kernel of `op` is registered for this device type ("cpu", "cuda")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"sage_dist::{op}", device_type.upper())
