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

import contextlib
import os
import threading
import warnings

import torch

from .shard.span import Span

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
_LION_MULTI_DEVICES = _kernel_devices("sage_dist::lion_update_multi_")
FRAGMENT_OPS = ("colsum_abs", "sq_sums", "sage_update_", "scaled_update_",
                "momentum_scaled_update_", "sinkhorn_rescale", "sinkhorn_scales", "round_bf16_",
                "scaled_update_multi_", "sage_update_multi_")
_FRAGMENT_DEVICES = {op: _kernel_devices(f"sage_dist::{op}") for op in FRAGMENT_OPS}

# The rules call the fused ops unless this is off (SAGE_DIST_FUSED=0 in the environment, or
# `with ops.fused(False):`), in which case they run their original pure-PyTorch code: the
# "reference" the benchmark compares against.
_FUSED = os.environ.get("SAGE_DIST_FUSED", "1") != "0"


def fused_enabled() -> bool:
    """Whether the optimizer rules use the fused ops (default True)."""
    return _FUSED


@contextlib.contextmanager
def fused(enabled: bool):
    """Temporarily switch the rules between the fused ops and their pure-PyTorch code."""
    global _FUSED
    old, _FUSED = _FUSED, bool(enabled)
    try:
        yield
    finally:
        _FUSED = old


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
    if _DEFERRAL.current is not None and param.device.type in _LION_MULTI_DEVICES:
        _check_lion_args(param, exp_avg, grad)
        _DEFERRAL.current.add(("lion_update_", param.device, lr, beta1, beta2, weight_decay),
                      (param, exp_avg, grad))
        return
    if param.device.type in _LION_DEVICES:
        with torch.no_grad():  # an in-place optimizer update, never part of a graph
            torch.ops.sage_dist.lion_update_(param, exp_avg, grad, lr, beta1, beta2,
                                             weight_decay)
    else:
        _warn_fallback_once("lion_update_", param.device.type)
        lion_update_reference(param, exp_avg, grad, lr, beta1, beta2, weight_decay)


def _check_lion_multi_args(params, exp_avgs, grads) -> None:
    if not len(params) == len(exp_avgs) == len(grads):
        raise RuntimeError(f"sage_dist::lion_update_multi_: params, exp_avgs and grads have "
                           f"{len(params)}, {len(exp_avgs)} and {len(grads)} tensors; they must "
                           f"have as many")
    for i, (p, m, g) in enumerate(zip(params, exp_avgs, grads)):
        _check_lion_args(p, m, g)
        if p.device != params[0].device:
            raise RuntimeError(f"sage_dist::lion_update_multi_: params[{i}] is on {p.device} but "
                               f"params[0] is on {params[0].device}; all tensors must be on one "
                               f"device")


def lion_update_multi_reference(params, exp_avgs, grads, lr, beta1, beta2, weight_decay):
    """lion_update_reference on each (param, exp_avg, grad) of the lists."""
    _check_lion_multi_args(params, exp_avgs, grads)
    for p, m, g in zip(params, exp_avgs, grads):
        lion_update_reference(p, m, g, lr, beta1, beta2, weight_decay)


def lion_update_multi_(params, exp_avgs, grads, lr: float, beta1: float, beta2: float,
                       weight_decay: float) -> None:
    """Lion on many tensors at once: one native call (on CUDA, one launch per dtype pair)."""
    args = ([*params], [*exp_avgs], [*grads], float(lr), float(beta1), float(beta2),
            float(weight_decay))
    if params and params[0].device.type in _LION_MULTI_DEVICES:
        with torch.no_grad():
            torch.ops.sage_dist.lion_update_multi_(*args)
    else:
        if params:
            _warn_fallback_once("lion_update_multi_", params[0].device.type)
        lion_update_multi_reference(*args)


class DeferredUpdates:
    """Collects fused element-wise updates issued while it is active (see `deferred`) and runs
    each set that shares an op, hyperparameters and device as ONE multi-tensor call at
    `flush()`. Only ops whose callers are done with the tensors once they have issued the
    update are deferred: lion_update_, scaled_update_ and sage_update_."""

    def __init__(self):
        self.pending: dict[tuple, list] = {}

    def add(self, key: tuple, tensors: tuple) -> None:
        self.pending.setdefault(key, []).append(tensors)

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for (op, device, *hp), items in pending.items():
            lists = [list(t) for t in zip(*items)]
            {"lion_update_": lion_update_multi_, "scaled_update_": scaled_update_multi_,
             "sage_update_": sage_update_multi_}[op](*lists, *hp)


class _Deferral(threading.local):
    """The active DeferredUpdates of this thread: two optimizers stepping in two threads
    never see each other's updates."""

    current: DeferredUpdates | None = None


_DEFERRAL = _Deferral()


@contextlib.contextmanager
def deferred():
    """Within this context lion_update_, scaled_update_ and sage_update_ calls are collected,
    not run (when the extension has their multi-tensor kernels); the caller must call
    flush() on the yielded object before it reads the updated tensors (it is flushed on exit
    too). The optimizer engine uses this to issue one multi-tensor update per phase."""
    old, batch = _DEFERRAL.current, DeferredUpdates()
    _DEFERRAL.current = batch
    try:
        yield batch
        batch.flush()
    finally:
        _DEFERRAL.current = old


# --------------------------------------------------------------------------------------
# Fragment ops. A fragment is elements [start, start + numel) of the row-major flat index of a
# global [R, C] matrix (it may start and end mid-row); element k is at row (start + k) // C,
# column (start + k) % C. Statistics are partial sums over the elements held.
# --------------------------------------------------------------------------------------
def _check_fragment_tensor(op, name, t, ref=None):
    _check_storage_dtype(op, name, t)
    if ref is not None and t.device != ref.device:
        raise RuntimeError(f"{op}: {name} is on {t.device} but param is on {ref.device}; "
                           "all tensors must be on one device")
    if not t.is_contiguous():
        raise RuntimeError(f"{op}: {name} must be contiguous (got sizes {list(t.shape)}, "
                           f"strides {list(t.stride())})")


def _check_geometry(op, C, start):
    if C < 1:
        raise RuntimeError(f"{op}: C={C} is invalid; allowed: C >= 1")
    if start < 0:
        raise RuntimeError(f"{op}: start={start} is invalid; allowed: start >= 0")


def _check_state(op, name, v, ref, ref_name):
    """fp32, on ref's device, contiguous: what every state or scale tensor of an op must be."""
    if v.dtype != torch.float32:
        raise RuntimeError(f"{op}: {name} (optimizer state) has dtype {v.dtype}; allowed: Float")
    if v.device != ref.device:
        raise RuntimeError(f"{op}: {name} is on {v.device} but {ref_name} is on {ref.device}; "
                           "all tensors must be on one device")
    if not v.is_contiguous():
        raise RuntimeError(f"{op}: {name} must be contiguous (got sizes {list(v.shape)}, "
                           f"strides {list(v.stride())})")


def _check_vector(op, name, v, ref, length):
    _check_state(op, name, v, ref, "grad")
    if v.dim() != 1:
        raise RuntimeError(f"{op}: {name} must be 1-D (got sizes {list(v.shape)})")
    if length is not None and v.numel() != length:
        raise RuntimeError(f"{op}: {name} has {v.numel()} entries; it must have {length}")


def _check_colsum_abs_args(grad, C, start):
    op = "sage_dist::colsum_abs"
    _check_fragment_tensor(op, "grad", grad)
    _check_geometry(op, C, start)


def _check_momentum(op, m, ref, ref_name):
    _check_state(op, "m", m, ref, ref_name)
    _check_same_numel(op, "m", m, ref, ref_name)


def _check_sq_sums_args(grad, r, c, R, C, start, dim, m=None):
    op = "sage_dist::sq_sums"
    if m is not None:
        _check_momentum(op, m, grad, "grad")
    _check_fragment_tensor(op, "grad", grad)
    _check_geometry(op, C, start)
    if R < 1:
        raise RuntimeError(f"{op}: R={R} is invalid; allowed: R >= 1")
    if dim not in (0, 1):
        raise RuntimeError(f"{op}: dim={dim} is invalid; allowed: 0, 1")
    if start + grad.numel() > R * C:
        raise RuntimeError(f"{op}: the fragment [{start}, {start + grad.numel()}) is outside "
                           f"a [{R}, {C}] matrix")
    if r is not None:
        _check_vector(op, "r", r, grad, R)
    if c is not None:
        _check_vector(op, "c", c, grad, C)


def _check_same_numel(op, name, t, param, ref_name="param"):
    if t.numel() != param.numel():
        raise RuntimeError(
            f"{op}: {name} has {t.numel()} elements (sizes {list(t.shape)}) but {ref_name} has "
            f"{param.numel()} (sizes {list(param.shape)}); they must have the same number "
            "of elements")


def _check_sage_update_args(param, m, grad, h, C, start):
    op = "sage_dist::sage_update_"
    _check_fragment_tensor(op, "param", param)
    _check_fragment_tensor(op, "grad", grad, param)
    _check_state(op, "m", m, param, "param")
    _check_same_numel(op, "m", m, param)
    _check_same_numel(op, "grad", grad, param)
    _check_geometry(op, C, start)
    _check_vector(op, "h", h, param, C)


def _check_scaled_update_args(param, grad, r, c, C, start, op="sage_dist::scaled_update_"):
    _check_fragment_tensor(op, "param", param)
    _check_fragment_tensor(op, "grad", grad, param)
    _check_same_numel(op, "grad", grad, param)
    _check_geometry(op, C, start)
    if r is not None:
        _check_vector(op, "r", r, param, None)
        if param.numel() and r.numel() <= (start + param.numel() - 1) // C:
            raise RuntimeError(f"{op}: r has {r.numel()} entries but the fragment reaches row "
                               f"{(start + param.numel() - 1) // C}")
    if c is not None:
        _check_vector(op, "c", c, param, C)


def _check_sinkhorn_scales_args(grad, R, C, iters, eps):
    op = "sage_dist::sinkhorn_scales"
    _check_fragment_tensor(op, "grad", grad)
    if R < 1 or C < 1:
        raise RuntimeError(f"{op}: R={R}, C={C} is invalid; allowed: R, C >= 1")
    if grad.numel() != R * C:
        raise RuntimeError(f"{op}: grad has {grad.numel()} elements; the whole [{R}, {C}] "
                           f"matrix has {R * C}")
    if iters < 1:
        raise RuntimeError(f"{op}: iters={iters} is invalid; allowed: iters >= 1")
    if not eps > 0:
        raise RuntimeError(f"{op}: eps={eps} is invalid; allowed: eps > 0")


def _check_momentum_scaled_update_args(param, m, grad, r, c, C, start):
    op = "sage_dist::momentum_scaled_update_"
    _check_scaled_update_args(param, grad, r, c, C, start, op)
    _check_momentum(op, m, param, "param")


def _span(n, C, start, R=None):
    """The Span of a fragment; R defaults to the rows it reaches."""
    if R is None:
        R = max(1, -(-(start + n) // C))
    return Span(R, C, start, start + n)


@torch.no_grad()
def colsum_abs_reference(grad, C, start):
    _check_colsum_abs_args(grad, C, start)
    return _span(grad.numel(), C, start).col_sum(grad.reshape(-1).float().abs())


def _momentum(m, grad, beta):
    """SCALE's head momentum beta m + (1 - beta) g, fp32, as the rule writes it."""
    return m.reshape(-1) * beta + grad.reshape(-1).float() * (1 - beta)


@torch.no_grad()
def sq_sums_reference(grad, r, c, R, C, start, dim, m=None, beta=0.0):
    _check_sq_sums_args(grad, r, c, R, C, start, dim, m)
    span = _span(grad.numel(), C, start, R)
    x = grad.reshape(-1).float() if m is None else _momentum(m, grad, beta)
    x = span.scale(x, row=r, col=c)
    x = x * x
    return span.col_sum(x) if dim == 0 else span.row_sum(x)


@torch.no_grad()
def sage_update_reference(param, m, grad, h, C, start, lr, beta1, beta2, weight_decay,
                          momentum_first):
    """SAGE's elementwise step (spec §1) given the per-column damper h."""
    _check_sage_update_args(param, m, grad, h, C, start)
    g = grad.reshape(-1).float()
    mf = m.view(-1)
    H = _span(g.numel(), C, start).expand_col(h)
    if momentum_first:
        mf.copy_(mf * beta2 + g * (1.0 - beta2))
        u = torch.sign(mf * beta1 + g * (1.0 - beta1))
    else:
        u = torch.sign(mf * beta1 + g * (1.0 - beta1))
        mf.copy_(mf * beta2 + g * (1.0 - beta2))
    p = param.reshape(-1).float() * (1.0 - lr * weight_decay)
    p = p - lr * (u * H)
    param.copy_(p.view_as(param))


@torch.no_grad()
def scaled_update_reference(param, grad, r, c, C, start, lr, weight_decay, step):
    """param <- param (1 - lr wd) - step (grad r c) over the fragment."""
    _check_scaled_update_args(param, grad, r, c, C, start)
    span = _span(param.numel(), C, start)
    x = span.scale(grad.reshape(-1).float(), row=r, col=c)
    p = param.reshape(-1).float() * (1.0 - lr * weight_decay)
    p = p - step * x
    param.copy_(p.view_as(param))


def _check_sinkhorn_rescale_args(scale, s):
    op = "sage_dist::sinkhorn_rescale"
    _check_vector(op, "scale", scale, scale, None)
    _check_vector(op, "s", s, scale, scale.numel())


@torch.no_grad()
def sinkhorn_rescale_reference(scale: torch.Tensor, sq_sum: torch.Tensor, target: float,
                               eps: float) -> torch.Tensor:
    """scale <- target * scale / (norm + eps), norm = scale * sqrt(sq_sum) (elementwise.h:
    sinkhorn_rescale). A line of X that is exactly zero keeps its scale: dividing by eps
    there would grow the scale each iteration until it overflowed. (torch's CPU sqrt is not
    always correctly rounded, so this can differ from the kernels by an ulp.)"""
    _check_sinkhorn_rescale_args(scale, sq_sum)
    norm = scale * sq_sum.sqrt()
    return torch.where(sq_sum > 0, scale * target / (norm + eps), scale)


@torch.no_grad()
def sinkhorn_scales_reference(grad, R, C, iters, eps, row_target, col_target):
    """All Sinkhorn iterations on a whole [R, C] matrix: the scales (r, c)."""
    _check_sinkhorn_scales_args(grad, R, C, iters, eps)
    r = torch.ones(R, dtype=torch.float32, device=grad.device)
    c = torch.ones(C, dtype=torch.float32, device=grad.device)
    for _ in range(iters):
        r = sinkhorn_rescale_reference(r, sq_sums_reference(grad, None, c, R, C, 0, 1),
                                       row_target, eps)
        c = sinkhorn_rescale_reference(c, sq_sums_reference(grad, r, None, R, C, 0, 0),
                                       col_target, eps)
    return r, c


@torch.no_grad()
def momentum_scaled_update_reference(param, m, grad, r, c, C, start, beta, lr, weight_decay,
                                     step):
    """m <- beta m + (1 - beta) grad; param <- param (1 - lr wd) - step (m r c)."""
    _check_momentum_scaled_update_args(param, m, grad, r, c, C, start)
    x = _momentum(m, grad, beta)
    m.copy_(x.view_as(m))
    span = _span(param.numel(), C, start)
    p = param.reshape(-1).float() * (1.0 - lr * weight_decay)
    p = p - step * span.scale(x, row=r, col=c)
    param.copy_(p.view_as(param))


def _use_kernel(op: str, t: torch.Tensor) -> bool:
    if t.device.type in _FRAGMENT_DEVICES[op]:
        return True
    _warn_fallback_once(op, t.device.type)
    return False


def colsum_abs(grad: torch.Tensor, C: int, start: int) -> torch.Tensor:
    """Partial column sums of |grad| over a fragment: fp32, length C (SAGE's statistic)."""
    if _use_kernel("colsum_abs", grad):
        return torch.ops.sage_dist.colsum_abs(grad, int(C), int(start))
    return colsum_abs_reference(grad, int(C), int(start))


def sq_sums(grad: torch.Tensor, r: torch.Tensor | None, c: torch.Tensor | None, R: int, C: int,
            start: int, dim: int, m: torch.Tensor | None = None,
            beta: float = 0.0) -> torch.Tensor:
    """Partial sums of (x[i,j] r[i] c[j])^2 over a fragment: per row (dim=1, length R) or
    per column (dim=0, length C). r, c: fp32 scale vectors, or None for 1. x is grad, or with
    the momentum m given, beta m + (1 - beta) grad (formed on the fly; m is not written)."""
    args = (grad, r, c, int(R), int(C), int(start), int(dim), m, float(beta))
    if _use_kernel("sq_sums", grad):
        return torch.ops.sage_dist.sq_sums(*args)
    return sq_sums_reference(*args)


def sage_update_(param, m, grad, h, C: int, start: int, lr: float, beta1: float, beta2: float,
                 weight_decay: float, momentum_first: bool) -> None:
    """SAGE's step in one pass, in place on param (fp32 or bf16) and m (fp32)."""
    args = (param, m, grad, h, int(C), int(start), float(lr), float(beta1), float(beta2),
            float(weight_decay), bool(momentum_first))
    if _DEFERRAL.current is not None and param.device.type in _FRAGMENT_DEVICES["sage_update_multi_"]:
        _check_sage_update_args(param, m, grad, h, int(C), int(start))
        _DEFERRAL.current.add(("sage_update_", param.device, *args[6:]), args[:6])
        return
    if _use_kernel("sage_update_", param):
        with torch.no_grad():
            torch.ops.sage_dist.sage_update_(*args)
    else:
        sage_update_reference(*args)


def scaled_update_(param, grad, r, c, C: int, start: int, lr: float, weight_decay: float,
                   step: float) -> None:
    """param <- param (1 - lr wd) - step (grad r c) over a fragment, in place."""
    args = (param, grad, r, c, int(C), int(start), float(lr), float(weight_decay), float(step))
    if _DEFERRAL.current is not None and param.device.type in _FRAGMENT_DEVICES["scaled_update_multi_"]:
        _check_scaled_update_args(*args[:6])
        n, C, start = param.numel(), int(C), int(start)
        if r is None:  # the multi-tensor op takes both scales; 1 is exact
            r = torch.ones((start + n - 1) // C + 1 if n else 1, dtype=torch.float32,
                           device=param.device)
        if c is None:
            c = torch.ones(C, dtype=torch.float32, device=param.device)
        _DEFERRAL.current.add(("scaled_update_", param.device, *args[6:]), (param, grad, r, c, C, start))
        return
    if _use_kernel("scaled_update_", param):
        with torch.no_grad():
            torch.ops.sage_dist.scaled_update_(*args)
    else:
        scaled_update_reference(*args)


def _check_multi_lengths(op, *lists):
    if len({len(x) for x in lists}) > 1:
        raise RuntimeError(f"{op}: the argument lists have different lengths "
                           f"({', '.join(str(len(x)) for x in lists)}); they must have one "
                           f"entry per fragment")


def _check_scaled_update_multi_args(params, grads, rs, cs, Cs, starts):
    op = "sage_dist::scaled_update_multi_"
    _check_multi_lengths(op, params, grads, rs, cs, Cs, starts)
    for args in zip(params, grads, rs, cs, Cs, starts):
        _check_scaled_update_args(*args, op=op)


def _check_sage_update_multi_args(params, ms, grads, hs, Cs, starts):
    _check_multi_lengths("sage_dist::sage_update_multi_", params, ms, grads, hs, Cs, starts)
    for args in zip(params, ms, grads, hs, Cs, starts):
        _check_sage_update_args(*args)


def scaled_update_multi_reference(params, grads, rs, cs, Cs, starts, lr, weight_decay, step):
    _check_scaled_update_multi_args(params, grads, rs, cs, Cs, starts)
    for args in zip(params, grads, rs, cs, Cs, starts):
        scaled_update_reference(*args, lr, weight_decay, step)


def sage_update_multi_reference(params, ms, grads, hs, Cs, starts, lr, beta1, beta2,
                                weight_decay, momentum_first):
    _check_sage_update_multi_args(params, ms, grads, hs, Cs, starts)
    for args in zip(params, ms, grads, hs, Cs, starts):
        sage_update_reference(*args, lr, beta1, beta2, weight_decay, momentum_first)


def scaled_update_multi_(params, grads, rs, cs, Cs, starts, lr: float, weight_decay: float,
                         step: float) -> None:
    """scaled_update_ on every entry of the lists in one call (r, c required)."""
    args = ([*params], [*grads], [*rs], [*cs], [int(x) for x in Cs], [int(x) for x in starts],
            float(lr), float(weight_decay), float(step))
    if params and _use_kernel("scaled_update_multi_", params[0]):
        with torch.no_grad():
            torch.ops.sage_dist.scaled_update_multi_(*args)
    else:
        scaled_update_multi_reference(*args)


def sage_update_multi_(params, ms, grads, hs, Cs, starts, lr: float, beta1: float, beta2: float,
                       weight_decay: float, momentum_first: bool) -> None:
    """sage_update_ on every entry of the lists in one call."""
    args = ([*params], [*ms], [*grads], [*hs], [int(x) for x in Cs], [int(x) for x in starts],
            float(lr), float(beta1), float(beta2), float(weight_decay), bool(momentum_first))
    if params and _use_kernel("sage_update_multi_", params[0]):
        with torch.no_grad():
            torch.ops.sage_dist.sage_update_multi_(*args)
    else:
        sage_update_multi_reference(*args)


def sinkhorn_rescale(scale: torch.Tensor, sq_sum: torch.Tensor, target: float,
                     eps: float) -> torch.Tensor:
    """One Sinkhorn rescale of a row or column scale vector, given its complete sums of
    squares (the kernels and sinkhorn_scales share this math bit for bit)."""
    if _use_kernel("sinkhorn_rescale", scale):
        return torch.ops.sage_dist.sinkhorn_rescale(scale, sq_sum, float(target), float(eps))
    return sinkhorn_rescale_reference(scale, sq_sum, float(target), float(eps))


def sinkhorn_scales(grad: torch.Tensor, R: int, C: int, iters: int, eps: float,
                    row_target: float, col_target: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every Sinkhorn iteration of a whole [R, C] matrix in one call: its scales (r, c)."""
    args = (grad, int(R), int(C), int(iters), float(eps), float(row_target), float(col_target))
    if _use_kernel("sinkhorn_scales", grad):
        return torch.ops.sage_dist.sinkhorn_scales(*args)
    return sinkhorn_scales_reference(*args)


def momentum_scaled_update_(param, m, grad, r, c, C: int, start: int, beta: float, lr: float,
                            weight_decay: float, step: float) -> None:
    """SCALE's head in one pass: m <- beta m + (1 - beta) grad, then
    param <- param (1 - lr wd) - step (m r c), in place on param and m (fp32)."""
    args = (param, m, grad, r, c, int(C), int(start), float(beta), float(lr),
            float(weight_decay), float(step))
    if _use_kernel("momentum_scaled_update_", param):
        with torch.no_grad():
            torch.ops.sage_dist.momentum_scaled_update_(*args)
    else:
        momentum_scaled_update_reference(*args)


# --------------------------------------------------------------------------------------
# Stochastic rounding to bf16 (elementwise.h: random_bits, bf16_bits_stochastic)
# --------------------------------------------------------------------------------------
def _check_round_bf16_args(out, src, offset):
    op = "sage_dist::round_bf16_"
    if out.dtype != torch.bfloat16:
        raise RuntimeError(f"{op}: out has dtype {out.dtype}; allowed: BFloat16")
    if src.dtype != torch.float32:
        raise RuntimeError(f"{op}: src has dtype {src.dtype}; allowed: Float")
    if offset < 0:
        raise RuntimeError(f"{op}: offset={offset} is invalid; allowed: offset >= 0")
    _check_same_numel(op, "src", src, out, "out")
    if src.device != out.device:
        raise RuntimeError(f"{op}: src is on {src.device} but out is on {out.device}; "
                           f"all tensors must be on one device")
    for name, t in (("out", out), ("src", src)):
        if not t.is_contiguous():
            raise RuntimeError(f"{op}: {name} must be contiguous")


def _u64(x: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 holding uint64 bits."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def random_bits_reference(seed: int, index: torch.Tensor) -> torch.Tensor:
    """elementwise.h random_bits on int64 tensors (wrapping arithmetic): uint32 in int64."""
    z = index * _u64(0x9E3779B97F4A7C15) ^ _u64(seed & ((1 << 64) - 1))
    z = (z ^ _shr(z, 30)) * _u64(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _u64(0x94D049BB133111EB)
    return _shr(z ^ _shr(z, 31), 32)


@torch.no_grad()
def round_bf16_reference(out, src, seed, offset):
    """out <- src rounded to bf16 stochastically, bit for bit as the kernels."""
    _check_round_bf16_args(out, src, offset)
    x = src.reshape(-1)
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device) + offset
    rand = random_bits_reference(seed, index) & 0xFFFF
    b = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    special = (b & 0x7F800000) == 0x7F800000
    nan_quiet = torch.where((b & 0x007FFFFF) != 0, 0x0040, 0)
    top = torch.where(special, (b >> 16) | nan_quiet, ((b + rand) >> 16) & 0xFFFF)
    top = torch.where(top >= 1 << 15, top - (1 << 16), top)  # as int16 bits
    out.copy_(top.to(torch.int16).view(torch.bfloat16).view_as(out))


def round_bf16_(out: torch.Tensor, src: torch.Tensor, seed: int, offset: int = 0) -> None:
    """out (bf16) <- src (fp32) with stochastic rounding; element k uses the random bits of
    (seed, offset + k), so any fragment of a tensor rounds as the whole tensor would."""
    args = (out, src, int(seed), int(offset))
    if _use_kernel("round_bf16_", out):
        with torch.no_grad():
            torch.ops.sage_dist.round_bf16_(*args)
    else:
        round_bf16_reference(*args)


# --------------------------------------------------------------------------------------
# Fake kernels: checks only (the ops return nothing; they mutate their inputs in place).
# --------------------------------------------------------------------------------------
if HAS_EXTENSION:

    @torch.library.register_fake("sage_dist::lion_update_")
    def _lion_update_fake(param, exp_avg, grad, lr, beta1, beta2, weight_decay):
        _check_lion_args(param, exp_avg, grad)
        return None

    @torch.library.register_fake("sage_dist::colsum_abs")
    def _colsum_abs_fake(grad, C, start):
        _check_colsum_abs_args(grad, C, start)
        return grad.new_empty((C,), dtype=torch.float32)

    @torch.library.register_fake("sage_dist::sq_sums")
    def _sq_sums_fake(grad, r, c, R, C, start, dim, m=None, beta=0.0):
        _check_sq_sums_args(grad, r, c, R, C, start, dim, m)
        return grad.new_empty((C if dim == 0 else R,), dtype=torch.float32)

    @torch.library.register_fake("sage_dist::sage_update_")
    def _sage_update_fake(param, m, grad, h, C, start, lr, beta1, beta2, weight_decay,
                          momentum_first):
        _check_sage_update_args(param, m, grad, h, C, start)
        return None

    @torch.library.register_fake("sage_dist::scaled_update_")
    def _scaled_update_fake(param, grad, r, c, C, start, lr, weight_decay, step):
        _check_scaled_update_args(param, grad, r, c, C, start)
        return None

    @torch.library.register_fake("sage_dist::round_bf16_")
    def _round_bf16_fake(out, src, seed, offset):
        _check_round_bf16_args(out, src, offset)
        return None

    @torch.library.register_fake("sage_dist::momentum_scaled_update_")
    def _momentum_scaled_update_fake(param, m, grad, r, c, C, start, beta, lr, weight_decay,
                                     step):
        _check_momentum_scaled_update_args(param, m, grad, r, c, C, start)
        return None

    @torch.library.register_fake("sage_dist::sinkhorn_scales")
    def _sinkhorn_scales_fake(grad, R, C, iters, eps, row_target, col_target):
        _check_sinkhorn_scales_args(grad, R, C, iters, eps)
        return (grad.new_empty((R,), dtype=torch.float32),
                grad.new_empty((C,), dtype=torch.float32))

    @torch.library.register_fake("sage_dist::sinkhorn_rescale")
    def _sinkhorn_rescale_fake(scale, s, target, eps):
        _check_sinkhorn_rescale_args(scale, s)
        return torch.empty_like(scale)

    @torch.library.register_fake("sage_dist::lion_update_multi_")
    def _lion_update_multi_fake(params, exp_avgs, grads, lr, beta1, beta2, weight_decay):
        _check_lion_multi_args(params, exp_avgs, grads)
        return None

    @torch.library.register_fake("sage_dist::scaled_update_multi_")
    def _scaled_update_multi_fake(params, grads, rs, cs, Cs, starts, lr, weight_decay, step):
        _check_scaled_update_multi_args(params, grads, rs, cs, Cs, starts)
        return None

    @torch.library.register_fake("sage_dist::sage_update_multi_")
    def _sage_update_multi_fake(params, ms, grads, hs, Cs, starts, lr, beta1, beta2,
                                weight_decay, momentum_first):
        _check_sage_update_multi_args(params, ms, grads, hs, Cs, starts)
        return None
