"""Sinkhorn normalisation of the gradient, stateless (docs/ALGORITHMS.md §2 and §3).

Both rules alternate row and column normalisation L times. They never materialise the
normalised gradient X: X[i, j] = g[i, j] * r[i] * c[j] with a row scale r and a column scale
c, so each half-iteration needs only sums of g^2 weighted by the other scale. Those sums are
what a sharded run all-reduces.
"""
from __future__ import annotations

import math

import torch

from .. import ops
from .base import Rule, check_iters, check_lr, check_nonneg, check_positive
from .batch import has_kernel


def sinkhorn_scales(f, g: torch.Tensor, iters: int, eps: float, row_target: float,
                    col_target: float):
    """Generator: yields row then column statistics `iters` times, returns the scales (r, c).

    A fragment that holds its whole parameter needs no statistic from elsewhere: it yields
    once, empty (to take part in the engine's first phase, which checks the gradient), then
    runs all L iterations in one native call while g is still in cache, instead of one pass
    per phase. Both paths run the same kernels and agree bit for bit. (The rule prefers the
    engine's batch of whole matrices, `SinkhornRule.run`; this is the path without it.) A
    fragment of whole rows yields once per iteration (the column sums), the rows being local."""
    R, C, start = f.rows, f.cols, f.span.start
    if f.whole:
        yield []
        return ops.sinkhorn_scales(g, R, C, iters, eps, row_target, col_target)
    r = torch.ones(R, dtype=torch.float32, device=g.device)
    c = torch.ones(C, dtype=torch.float32, device=g.device)
    if f.rows_local and has_kernel("sinkhorn_sweep_", g.device.type):
        # Whole rows here (FSDP2): one sweep per iteration gives the rows' new scales and the
        # column partials, the first also the finiteness flag; one all-reduce per iteration.
        # The same numbers as the two passes below.
        mine = r[start // C:(start + g.numel()) // C]
        for it in range(iters):
            cols, bad = ops.sinkhorn_sweep_(g, mine, None if it == 0 else c, C, row_target,
                                            eps, it == 0)
            (cols,) = yield ([("nonfinite", bad)] if it == 0 else []) + [("col", cols)]
            c = ops.sinkhorn_rescale(c, cols, col_target, eps)
        return r, c
    span = f.span   # a block when tensor parallelism cuts the columns: the ops see it whole
    lR, lC, lstart = span.op_args
    for _ in range(iters):
        (rows,) = yield [("row", span.global_rows(
            ops.sq_sums(g, None, span.local_cols(c), lR, lC, lstart, 1)))]
        r = ops.sinkhorn_rescale(r, rows, row_target, eps)
        (cols,) = yield [("col", span.global_cols(
            ops.sq_sums(g, span.local_rows(r), None, lR, lC, lstart, 0)))]
        c = ops.sinkhorn_rescale(c, cols, col_target, eps)
    return r, c


class SinkhornRule(Rule):
    """Uniform Sinkhorn (§2): unit-norm rows and columns, step eta * kappa."""

    name = "sinkhorn"
    matrix_only = True
    defaults = dict(lr=2e-3, weight_decay=0.01, sinkhorn_iters=5, sinkhorn_scale=10.0, eps=1e-8)
    checks = dict(lr=check_lr, weight_decay=check_nonneg, sinkhorn_iters=check_iters,
                  sinkhorn_scale=check_positive, eps=check_positive)

    def targets(self, f):
        return 1.0, 1.0

    def step_size(self, group):
        return group["lr"] * group["sinkhorn_scale"]

    def run(self, f, p, g, st, group, out):
        row_t, col_t = self.targets(f)
        iters, eps = group["sinkhorn_iters"], group["eps"]
        lr, wd, step = group["lr"], group["weight_decay"], self.step_size(group)
        queue = getattr(out, "whole_sinkhorn", None) if f.whole else None
        job = queue(p, g, f.rows, f.cols, iters, eps, row_t, col_t, lr, wd, step) if queue \
            else None
        if job is not None:
            # All whole matrices of the step in one native call (optim/batch.py): L sweeps
            # over g, the first of which also checks it ("nonfinite": the engine's flag), and
            # in skip mode the update too, while g is in cache.
            yield [("nonfinite", job.flag)]
            if not job.updated:
                out.scaled(p, g, job.r, job.c, f.cols, 0, lr, wd, step)
            return
        r, c = yield from sinkhorn_scales(f, g, iters, eps, row_t, col_t)
        # The scaled gradient is formed in registers, never in memory.
        span = f.span
        _, lC, lstart = span.op_args
        out.scaled(p, g, span.local_rows(r), span.local_cols(c), lC, lstart, lr, wd, step)


class SinkGDRule(SinkhornRule):
    """SinkGD (§3): rows scaled to norm sqrt(C), columns to sqrt(R), step alpha * eta."""

    name = "sinkgd"
    defaults = dict(lr=2e-2, weight_decay=0.0, sinkhorn_iters=5, linear_lr_scale=0.05, eps=1e-8)
    checks = dict(lr=check_lr, weight_decay=check_nonneg, sinkhorn_iters=check_iters,
                  linear_lr_scale=check_positive, eps=check_positive)

    def targets(self, f):
        return math.sqrt(f.cols), math.sqrt(f.rows)

    def step_size(self, group):
        return group["lr"] * group["linear_lr_scale"]
