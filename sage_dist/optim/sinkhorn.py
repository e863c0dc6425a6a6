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
    fragment whose cut rows are known (FSDP2's row blocks: none; ZeRO's flat ranges: the
    few rows a partition boundary falls inside) yields once per iteration (`_one_reduce`);
    others (tensor parallelism's column blocks) twice, the row sums, then the column sums."""
    R, C = f.rows, f.cols
    if f.whole:
        yield []
        return ops.sinkhorn_scales(g, R, C, iters, eps, row_target, col_target)
    r = torch.ones(R, dtype=torch.float32, device=g.device)
    c = torch.ones(C, dtype=torch.float32, device=g.device)
    straddle = () if f.rows_local else f.straddle_rows
    if straddle is not None and not f.span.is_block \
            and has_kernel("sinkhorn_sweep_", g.device.type):
        return (yield from _one_reduce(f, g, r, c, straddle, iters, eps, row_target,
                                       col_target))
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


def _one_reduce(f, g, r, c, straddle, iters, eps, row_target, col_target):
    """Generator: the iterations of a fragment of a flat range [a, a + n) with one all-reduce
    each. The rows it holds whole: one sweep per iteration (their sums with the current c,
    their new scales, their column partials; the first sweep also checks g). The `straddle`
    rows (cut by some rank's range; the same on every rank): their values travel once, in the
    first all-reduce, each rank adding the pieces it holds to zeros (exact); from then on every
    rank computes their sums, scales and column terms itself and adds the terms to the
    all-reduced column sums, so all ranks hold the same c. Row sums are the canonical sums of
    whole rows either way; the column sums are added in another order than the two-pass path
    (within rounding of it)."""
    C, a, n = f.cols, f.span.start, g.numel()
    first = -(-a // C)                       # the rows [first, end) are held whole
    end = max(first, (a + n) // C)
    whole = g[first * C - a:first * C - a + (end - first) * C] if end > first else g[:0]
    mine = r[first:end]
    pieces = []                              # (row, first column, values) of rows held in part
    if n and a % C:
        pieces.append((a // C, a % C, g[:min(n, C - a % C)]))
    if n and (a + n) % C and (a + n) // C * C >= a:
        pieces.append(((a + n) // C, 0, g[n - (a + n) % C:]))
    slot = {row: k for k, row in enumerate(straddle)}
    held = rows = None                       # (FSDP2's row blocks have none to hold)
    if straddle:
        held = torch.zeros((len(straddle), C), dtype=torch.float32, device=g.device)
        rows = torch.tensor(straddle, dtype=torch.long, device=g.device)
    for row, c0, values in pieces:
        if row not in slot:
            raise RuntimeError(f"{f.name}: row {row} is held here in part, but the layout did "
                               f"not list it among the rows that straddle a partition")
        held[slot[row], c0:c0 + values.numel()] = values
    full = None
    for it in range(iters):
        cols, bad = ops.sinkhorn_sweep_(whole, mine, None if it == 0 else c, C, row_target,
                                        eps, it == 0)
        if it == 0 and straddle:
            bad = torch.maximum(bad, ops.reference.nonfinite(held))
            cols, full = yield [("nonfinite", bad), ("col", cols), ("col", held.view(-1))]
        else:
            (cols,) = yield ([("nonfinite", bad)] if it == 0 else []) + [("col", cols)]
        if straddle:
            S = len(straddle)
            sums = ops.sq_sums(full, None, None if it == 0 else c, S, C, 0, 1)
            r_s = ops.sinkhorn_rescale(r[rows], sums, row_target, eps)
            r[rows] = r_s
            cols = cols + ops.sq_sums(full, r_s, None, S, C, 0, 0)
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
