"""sage_dist custom ops: native kernels when built, pure-PyTorch fallbacks otherwise.

Layering (one place for each thing):
  * schemas: declared once, in C++ (csrc/ops.cpp), as ``torch.ops.sage_dist.<name>``;
  * kernels: one per device, registered from csrc/cpu/ and csrc/cuda/; their per-element
    math is in csrc/include/sage_dist/elementwise.h;
  * here: a fake kernel per op (so the ops trace under torch.compile), the pure-PyTorch
    reference of each op (the oracle the kernel tests compare against, and the fallback),
    and one public function per op that picks the kernel or the fallback.

The reference rounds like the kernels (fp32 math, each product and sum rounded on its own,
hyperparameters rounded once from Python floats), so on CPU the two agree bitwise.
"""

from __future__ import annotations

import warnings

import torch

try:
    from . import _C  # noqa: F401  (loading the library registers the schemas and kernels)
except ImportError as exc:  # not built, or built against another torch
    HAS_EXTENSION = False
    EXTENSION_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    HAS_EXTENSION = True
    EXTENSION_ERROR = None

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_STORAGE_DTYPES = (torch.float32, torch.bfloat16)


def _kernel_devices(qualname: str) -> frozenset[str]:
    """Device types ("cpu", "cuda") for which the extension registered a kernel of the op."""
    if not HAS_EXTENSION:
        return frozenset()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return frozenset(dev for dev, key in _DISPATCH_KEYS.items() if has(qualname, key))


# Computed once at import: a constant set is also what torch.compile can trace through.
_LION_DEVICES = _kernel_devices("sage_dist::lion_update_")


def has_cuda_kernels() -> bool:
    """True when sage_dist._C was compiled with its CUDA kernels."""
    return "cuda" in _LION_DEVICES


_warned: set[tuple[str, str]] = set()


def _warn_fallback_once(op: str, device_type: str) -> None:
    if (op, device_type) in _warned:
        return
    _warned.add((op, device_type))
    if not HAS_EXTENSION:
        why = (f"the native extension sage_dist._C is not built ({EXTENSION_ERROR}); build it "
               "with `pip install --no-build-isolation -e .`")
    else:
        why = f"sage_dist._C has no {device_type} kernel for {op}"
    warnings.warn(f"sage_dist: {why}; using the slower pure-PyTorch fallback.",
                  RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------------------
# Argument checks: the same rules and messages as csrc/include/sage_dist/checks.h
# (RuntimeError, like TORCH_CHECK), so every path rejects the same inputs.
# --------------------------------------------------------------------------------------
def _check_storage_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in _STORAGE_DTYPES:
        raise RuntimeError(f"{op}: {name} has dtype {t.dtype}; allowed: Float, BFloat16")


def _check_lion_args(param: torch.Tensor, exp_avg: torch.Tensor, grad: torch.Tensor) -> None:
    op = "sage_dist::lion_update_"
    _check_storage_dtype(op, "param", param)
    _check_storage_dtype(op, "grad", grad)
    if exp_avg.dtype != torch.float32:
        raise RuntimeError(f"{op}: exp_avg (optimizer state) has dtype {exp_avg.dtype}; "
                           "allowed: Float")
    for name, t in (("exp_avg", exp_avg), ("grad", grad)):
        if t.numel() != param.numel():
            raise RuntimeError(
                f"{op}: {name} has {t.numel()} elements (sizes {list(t.shape)}) but param has "
                f"{param.numel()} (sizes {list(param.shape)}); they must have the same number "
                "of elements")
        if t.device != param.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but param is on {param.device}; "
                               "all tensors must be on one device")
    for name, t in (("param", param), ("exp_avg", exp_avg), ("grad", grad)):
        if not t.is_contiguous():
            raise RuntimeError(f"{op}: {name} must be contiguous (got sizes {list(t.shape)}, "
                               f"strides {list(t.stride())})")


# --------------------------------------------------------------------------------------
# Lion (spec §5)
# --------------------------------------------------------------------------------------
@torch.no_grad()
def lion_update_reference(param: torch.Tensor, exp_avg: torch.Tensor, grad: torch.Tensor,
                          lr: float, beta1: float, beta2: float, weight_decay: float) -> None:
    """Pure-PyTorch Lion step, in place on param and exp_avg; the kernels' oracle.

    p <- p(1 - lr wd);  u <- sign(b1 m + (1-b1) g);  p <- p - lr u;  m <- b2 m + (1-b2) g
    fp32 math whatever the storage dtype; param is written back in its own dtype."""
    _check_lion_args(param, exp_avg, grad)
    g = grad.float()
    u = torch.sign(exp_avg * beta1 + g * (1.0 - beta1))  # uses the OLD m
    p = param.float() * (1.0 - lr * weight_decay)
    p = p - lr * u
    exp_avg.copy_(exp_avg * beta2 + g * (1.0 - beta2))
    param.copy_(p)


def lion_update_(param: torch.Tensor, exp_avg: torch.Tensor, grad: torch.Tensor,
                 lr: float, beta1: float, beta2: float, weight_decay: float) -> None:
    """One fused Lion step, in place on param (fp32 or bf16) and exp_avg (fp32).

    Runs torch.ops.sage_dist.lion_update_ when the extension has a kernel for the tensors'
    device, else lion_update_reference (warning once). All tensors: same number of elements,
    contiguous, one device; grad fp32 or bf16."""
    lr, beta1, beta2, weight_decay = float(lr), float(beta1), float(beta2), float(weight_decay)
    if param.device.type in _LION_DEVICES:
        with torch.no_grad():  # an in-place optimizer update, never part of a graph
            torch.ops.sage_dist.lion_update_(param, exp_avg, grad, lr, beta1, beta2,
                                             weight_decay)
    else:
        _warn_fallback_once("lion_update_", param.device.type)
        lion_update_reference(param, exp_avg, grad, lr, beta1, beta2, weight_decay)


# --------------------------------------------------------------------------------------
# Fake kernels: checks only (the ops return nothing; they mutate their inputs in place).
# --------------------------------------------------------------------------------------
if HAS_EXTENSION:

    @torch.library.register_fake("sage_dist::lion_update_")
    def _lion_update_fake(param, exp_avg, grad, lr, beta1, beta2, weight_decay):
        _check_lion_args(param, exp_avg, grad)
        return None
