"""The pure-PyTorch reference of every op: the oracle the native kernels are tested against,
and the dispatcher's default implementation on a device without a native kernel.

Each function has its op's name and schema. They round like the kernels (fp32 math, each
product and sum rounded on its own, hyperparameters rounded once from Python floats), so on
the CPU the two agree bitwise except where torch's sqrt is not correctly rounded (an ulp in
Sinkhorn's scales). Argument checks live in the kernels (csrc/include/sage_dist/checks.h);
these functions check only what their own math needs.

A fragment is elements [start, start + numel) of the row-major flat index of a global [R, C]
matrix; element k sits at row (start + k) // C, column (start + k) % C (see span.py).
"""
from __future__ import annotations

import torch

from .span import Span


def _span(n: int, C: int, start: int, R: int | None = None) -> Span:
    """The Span of a fragment; R defaults to the rows it reaches."""
    if R is None:
        R = max(1, -(-(start + n) // C))
    return Span(R, C, start, start + n)


def _same_numel(op: str, **tensors) -> None:
    """The references read and write through flat views: every tensor must match the first."""
    (ref_name, ref), *rest = tensors.items()
    for name, t in rest:
        if t.numel() != ref.numel():
            raise RuntimeError(f"sage_dist::{op}: {name} has {t.numel()} elements but "
                               f"{ref_name} has {ref.numel()}; they must have the same number "
                               f"of elements")


# -- Lion (docs/ALGORITHMS.md §5) ------------------------------------------------------------------
@torch.no_grad()
def lion_update_(param, exp_avg, grad, lr, beta1, beta2, weight_decay) -> None:
    """p <- p(1 - lr wd);  u <- sign(b1 m + (1-b1) g);  p <- p - lr u;  m <- b2 m + (1-b2) g,
    in place on param (fp32 or bf16) and exp_avg (fp32); the direction uses the OLD m."""
    _same_numel("lion_update_", param=param, exp_avg=exp_avg, grad=grad)
    g = grad.reshape(-1).float()
    m = exp_avg.view(-1)
    u = torch.sign(m * beta1 + g * (1.0 - beta1))
    p = param.reshape(-1).float() * (1.0 - lr * weight_decay)
    p = p - lr * u
    m.copy_(m * beta2 + g * (1.0 - beta2))
    param.copy_(p.view_as(param))


def lion_update_multi_(params, exp_avgs, grads, lr, beta1, beta2, weight_decay) -> None:
    """lion_update_ on every (param, exp_avg, grad) of the lists."""
    _same_lengths("lion_update_multi_", params, exp_avgs, grads)
    for p, m, g in zip(params, exp_avgs, grads):
        lion_update_(p, m, g, lr, beta1, beta2, weight_decay)


def _same_lengths(op: str, *lists) -> None:
    if len({len(x) for x in lists}) > 1:
        raise RuntimeError(f"sage_dist::{op}: the argument lists have different lengths "
                           f"({', '.join(str(len(x)) for x in lists)}); they must have one "
                           f"entry per fragment")


# -- statistics ------------------------------------------------------------------------------------
@torch.no_grad()
def colsum_abs(grad, C, start) -> torch.Tensor:
    """Partial column sums of |grad| over a fragment: fp32, length C (SAGE's statistic)."""
    return _span(grad.numel(), C, start).col_sum(grad.reshape(-1).float().abs())


def nonfinite(grad) -> torch.Tensor:
    """[1.] if grad holds a NaN or an Inf, else [0.] (fp32)."""
    return (~torch.isfinite(grad.reshape(-1))).any().float().reshape(1)


@torch.no_grad()
def colsum_abs_check(grad, C, start):
    """colsum_abs and the finiteness flag of the same elements: (sums, [1.] or [0.])."""
    return colsum_abs(grad, C, start), nonfinite(grad)


def _momentum(m, grad, beta):
    """SCALE's head momentum beta m + (1 - beta) g, fp32, as the rule writes it."""
    return m.reshape(-1) * beta + grad.reshape(-1).float() * (1 - beta)


@torch.no_grad()
def sq_sums(grad, r, c, R, C, start, dim, m=None, beta=0.0) -> torch.Tensor:
    """Partial sums of (x[i,j] r[i] c[j])^2 per row (dim=1, length R) or per column (dim=0,
    length C); x is grad, or with m given SCALE's head momentum beta m + (1 - beta) grad."""
    if dim not in (0, 1):
        raise RuntimeError(f"sage_dist::sq_sums: dim={dim} is invalid; allowed: 0, 1")
    span = _span(grad.numel(), C, start, R)
    x = grad.reshape(-1).float() if m is None else _momentum(m, grad, beta)
    x = span.scale(x, row=r, col=c)
    x = x * x
    return span.col_sum(x) if dim == 0 else span.row_sum(x)


# -- updates ---------------------------------------------------------------------------------------
@torch.no_grad()
def sage_update_(param, m, grad, h, C, start, lr, beta1, beta2, weight_decay,
                 momentum_first) -> None:
    """SAGE's elementwise step (docs/ALGORITHMS.md §1) given the per-column damper h."""
    _same_numel("sage_update_", param=param, m=m, grad=grad)
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
def scaled_update_(param, grad, r, c, C, start, lr, weight_decay, step) -> None:
    """param <- param (1 - lr wd) - step (grad r c) over the fragment (r, c optional)."""
    _same_numel("scaled_update_", param=param, grad=grad)
    span = _span(param.numel(), C, start)
    x = span.scale(grad.reshape(-1).float(), row=r, col=c)
    p = param.reshape(-1).float() * (1.0 - lr * weight_decay)
    p = p - step * x
    param.copy_(p.view_as(param))


@torch.no_grad()
def momentum_scaled_update_(param, m, grad, r, c, C, start, beta, lr, weight_decay,
                            step) -> None:
    """m <- beta m + (1 - beta) grad; param <- param (1 - lr wd) - step (m r c)."""
    _same_numel("momentum_scaled_update_", param=param, m=m, grad=grad)
    x = _momentum(m, grad, beta)
    m.copy_(x.view_as(m))
    span = _span(param.numel(), C, start)
    p = param.reshape(-1).float() * (1.0 - lr * weight_decay)
    p = p - step * span.scale(x, row=r, col=c)
    param.copy_(p.view_as(param))


def scaled_update_multi_(params, grads, rs, cs, Cs, starts, lr, weight_decay, step) -> None:
    """scaled_update_ on every entry of the lists."""
    _same_lengths("scaled_update_multi_", params, grads, rs, cs, Cs, starts)
    for args in zip(params, grads, rs, cs, Cs, starts):
        scaled_update_(*args, lr, weight_decay, step)


def sage_update_multi_(params, ms, grads, hs, Cs, starts, lr, beta1, beta2, weight_decay,
                       momentum_first) -> None:
    """sage_update_ on every entry of the lists."""
    _same_lengths("sage_update_multi_", params, ms, grads, hs, Cs, starts)
    for args in zip(params, ms, grads, hs, Cs, starts):
        sage_update_(*args, lr, beta1, beta2, weight_decay, momentum_first)


# -- Sinkhorn (docs/ALGORITHMS.md §2-3) ------------------------------------------------------------
@torch.no_grad()
def sinkhorn_rescale(scale, s, target, eps) -> torch.Tensor:
    """scale <- target * scale / (norm + eps), norm = scale * sqrt(s), given the complete sums
    of squares s of each line. A line that is exactly zero keeps its scale: dividing by eps
    there would grow the scale each iteration until it overflowed."""
    norm = scale * s.sqrt()
    return torch.where(s > 0, scale * target / (norm + eps), scale)


@torch.no_grad()
def sinkhorn_scales(grad, R, C, iters, eps, row_target, col_target):
    """Every row-then-column iteration on a whole [R, C] matrix: the scales (r, c)."""
    if grad.numel() != R * C:
        raise RuntimeError(f"sage_dist::sinkhorn_scales: grad has {grad.numel()} elements; the "
                           f"whole [{R}, {C}] matrix has {R * C}")
    r = torch.ones(R, dtype=torch.float32, device=grad.device)
    c = torch.ones(C, dtype=torch.float32, device=grad.device)
    for _ in range(iters):
        r = sinkhorn_rescale(r, sq_sums(grad, None, c, R, C, 0, 1), row_target, eps)
        c = sinkhorn_rescale(c, sq_sums(grad, r, None, R, C, 0, 0), col_target, eps)
    return r, c


@torch.no_grad()
def sinkhorn_sweep_(grad, r, c, C, row_target, eps, check):
    """One iteration on a fragment of whole rows: r <- the rows' new scales (in place), then
    (the fragment's column sums of (g r)^2, [1.] if check and grad is not finite, else [0.])."""
    R = grad.numel() // C
    if R * C != grad.numel():
        raise RuntimeError(f"sage_dist::sinkhorn_sweep_: grad has {grad.numel()} elements, not "
                           f"whole rows of {C} columns")
    if R == 0:
        return grad.new_zeros(C, dtype=torch.float32), grad.new_zeros(1, dtype=torch.float32)
    rows = sq_sums(grad, None, c, R, C, 0, 1)
    r.copy_(sinkhorn_rescale(r, rows, row_target, eps))
    flag = nonfinite(grad) if check else grad.new_zeros(1, dtype=torch.float32)
    return sq_sums(grad, r, None, R, C, 0, 0), flag


@torch.no_grad()
def sinkhorn_scales_multi_(grads, rs, cs, flags, Rs, Cs, row_targets, col_targets, iters,
                           eps) -> None:
    """sinkhorn_scales of every whole matrix into rs[i], cs[i]; flags[i] <- nonfinite(grads[i])."""
    _same_lengths("sinkhorn_scales_multi_", grads, rs, cs, flags, Rs, Cs, row_targets,
                  col_targets)
    for g, r, c, f, R, C, rt, ct in zip(grads, rs, cs, flags, Rs, Cs, row_targets, col_targets):
        f.copy_(nonfinite(g))
        r_new, c_new = sinkhorn_scales(g, R, C, iters, eps, rt, ct)
        r.copy_(r_new)
        c.copy_(c_new)


@torch.no_grad()
def sinkhorn_update_multi_(params, grads, flags, Rs, Cs, row_targets, col_targets, iters, eps,
                           lr, weight_decay, step) -> None:
    """For each whole matrix: flags[i] <- nonfinite(grads[i]); if finite, its scales and
    scaled_update_ of params[i] with them (a non-finite gradient leaves params[i] as it is)."""
    _same_lengths("sinkhorn_update_multi_", params, grads, flags, Rs, Cs, row_targets,
                  col_targets)
    for p, g, f, R, C, rt, ct in zip(params, grads, flags, Rs, Cs, row_targets, col_targets):
        bad = nonfinite(g)
        f.copy_(bad)
        if bad.item() == 0:
            r, c = sinkhorn_scales(g, R, C, iters, eps, rt, ct)
            scaled_update_(p, g, r, c, C, 0, lr, weight_decay, step)


# -- stochastic rounding to bf16 (elementwise.h: random_bits, bf16_bits_stochastic) ----------------
def _u64(x: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 holding uint64 bits."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def random_bits(seed: int, index: torch.Tensor) -> torch.Tensor:
    """elementwise.h random_bits (SplitMix64 of seed and index) on int64 tensors: uint32."""
    z = index * _u64(0x9E3779B97F4A7C15) ^ _u64(seed & ((1 << 64) - 1))
    z = (z ^ _shr(z, 30)) * _u64(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _u64(0x94D049BB133111EB)
    return _shr(z ^ _shr(z, 31), 32)


@torch.no_grad()
def round_bf16_(out, src, seed, offset) -> None:
    """out (bf16) <- src (fp32) rounded stochastically with the random bits of
    (seed, offset + k) for element k, bit for bit as the kernels."""
    _same_numel("round_bf16_", out=out, src=src)
    x = src.reshape(-1)
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device) + offset
    rand = random_bits(seed, index) & 0xFFFF
    b = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    special = (b & 0x7F800000) == 0x7F800000
    nan_quiet = torch.where((b & 0x007FFFFF) != 0, 0x0040, 0)
    top = torch.where(special, (b >> 16) | nan_quiet, ((b + rand) >> 16) & 0xFFFF)
    top = torch.where(top >= 1 << 15, top - (1 << 16), top)  # as int16 bits
    out.copy_(top.to(torch.int16).view(torch.bfloat16).view_as(out))
