"""SCALE (docs/ALGORITHMS.md §4): RMS-normalised SGD, momentum on the last layer only.

Dense weights are normalised per output row, embeddings per feature column (one rule, two
axes), the untied output head per vocabulary row of its momentum; 1-D parameters take SCALE's
own AdamW variant.
"""
from __future__ import annotations

from .. import ops
from .base import (Rule, StateSpec, check_betas, check_lr, check_nonneg, check_positive,
                   check_unit)


def _inv_rms(sq_sum, count: int, floor: float):
    """1 / max(sqrt(sq_sum / count), floor)."""
    return (sq_sum / count).sqrt().clamp_(min=floor).reciprocal_()


class ScaleNormRule(Rule):
    """SCALE's stateless rule: g divided by its RMS along `axis` — per output row of a dense
    weight (axis 1, over the input dim), per feature column of an embedding (axis 0)."""

    matrix_only = True
    defaults = dict(lr=1e-3, weight_decay=0.0, floor=1e-8)
    checks = dict(lr=check_lr, weight_decay=check_nonneg, floor=check_positive)

    def __init__(self, name: str, axis: int):
        self.name, self.axis = name, axis

    def run(self, f, p, g, st, group, out):
        span = f.span
        lR, lC, lstart = span.op_args       # the local block, if columns are cut (TP)
        kind, count = ("row", f.cols) if self.axis == 1 else ("col", f.rows)
        sums = ops.sq_sums(g, None, None, lR, lC, lstart, self.axis)
        (sums,) = yield [(kind, span.global_rows(sums) if self.axis == 1
                          else span.global_cols(sums))]
        scale = _inv_rms(sums, count, group["floor"])
        row, col = (span.local_rows(scale), None) if self.axis == 1 \
            else (None, span.local_cols(scale))
        lr = group["lr"]
        out.scaled(p, g, row, col, lC, lstart, lr, group["weight_decay"], lr)


class ScaleHeadRule(Rule):
    name = "scale_head"
    matrix_only = True
    defaults = dict(lr=1e-3, weight_decay=0.0, momentum=0.9, floor=1e-8)
    checks = dict(lr=check_lr, weight_decay=check_nonneg, momentum=check_unit,
                  floor=check_positive)

    def state_spec(self, shape, R, C):
        return StateSpec(elementwise=("m",))

    def run(self, f, p, g, st, group, out):
        # The new momentum is formed in registers in both passes; m is written by the update.
        beta = group["momentum"]
        span = f.span
        lR, lC, lstart = span.op_args
        (rows,) = yield [("row", span.global_rows(
            ops.sq_sums(g, None, None, lR, lC, lstart, 1, st["m"], beta)))]
        scale = _inv_rms(rows, f.cols, group["floor"])
        lr = group["lr"]
        ops.momentum_scaled_update_(p, st["m"], g, span.local_rows(scale), None, lC, lstart,
                                    beta, lr, group["weight_decay"], lr)


class ScaleAdamWRule(Rule):
    """SCALE's rule for 1-D parameters: eps outside the bias correction, lr following the
    schedule of the main lr (eta_1 = adam_lr * lr / peak_lr)."""

    name = "scale_adamw"
    defaults = dict(lr=1e-3, adam_lr=None, adam_betas=(0.9, 0.999), adam_eps=1e-8,
                    weight_decay=0.0)
    checks = dict(lr=check_lr, adam_betas=check_betas, adam_eps=check_positive,
                  weight_decay=check_nonneg, peak_lr=check_lr)

    def validate(self, group, where):
        group.setdefault("peak_lr", group["lr"])
        if group["adam_lr"] is not None:
            check_lr(f"{where}adam_lr", group["adam_lr"])
        super().validate(group, where)

    def state_spec(self, shape, R, C):
        return StateSpec(elementwise=("exp_avg", "exp_avg_sq"), step=True)

    def run(self, f, p, g, st, group, out):
        yield []
        beta1, beta2 = group["adam_betas"]
        peak = group["peak_lr"]
        adam_lr = peak if group["adam_lr"] is None else group["adam_lr"]  # None: the main lr
        lr1 = adam_lr * (group["lr"] / peak) if peak > 0 else 0.0
        t = self.next_step(st)
        self.commit_step(st)
        m1, m2 = st["exp_avg"], st["exp_avg_sq"]
        m1.mul_(beta1).add_(g, alpha=1 - beta1)
        m2.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        p.mul_(1 - lr1 * group["weight_decay"])
        step = lr1 * (1 - beta2 ** t) ** 0.5 / (1 - beta1 ** t)
        p.addcdiv_(m1, m2.sqrt().add_(group["adam_eps"]), value=-step)
