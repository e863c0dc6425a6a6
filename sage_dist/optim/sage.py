"""SAGE (docs/ALGORITHMS.md §1): a Lion-style sign step damped per column by an O(C) statistic."""
from __future__ import annotations

import torch

from .. import ops
from .base import (Rule, StateSpec, check_betas, check_bool, check_lr, check_nonneg,
                   check_positive)
from .batch import has_kernel


def sage_damper(S_hat: torch.Tensor, s: torch.Tensor, sigma, gamma, eps: float) -> torch.Tensor:
    """H = min(min(sigma / (S_hat + eps), 1), gamma / (s + eps)), 0 <= H <= 1."""
    return torch.minimum((sigma / (S_hat + eps)).clamp_(max=1.0), gamma / (s + eps))


class SAGERule(Rule):
    name = "sage"
    defaults = dict(lr=2e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, momentum_first=True)
    checks = dict(lr=check_lr, betas=check_betas, eps=check_positive,
                  weight_decay=check_nonneg, momentum_first=check_bool)

    def state_spec(self, shape, R, C):
        if len(shape) >= 2:
            return StateSpec(elementwise=("m",), replicated={"S": C}, step=True)
        return StateSpec(elementwise=("m", "S"), step=True)

    def run(self, f, p, g, st, group, out):
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        t = self.next_step(st)
        bc = 1 - beta2 ** t
        if f.is_matrix:
            span = f.span
            _, C, start = span.op_args          # the local block, if columns are cut (TP)
            if has_kernel("colsum_abs_check", g.device.type):
                # The column sums and the engine's finiteness flag in one pass over g.
                col_abs, bad = ops.colsum_abs_check(g, C, start)
                (col_abs,) = yield [("nonfinite", bad), ("col", span.global_cols(col_abs))]
            else:
                (col_abs,) = yield [("col", span.global_cols(ops.colsum_abs(g, C, start)))]
            s = col_abs / f.rows                      # global row count, zero rows included
            S = st["S"].mul_(beta2).add_(s, alpha=1 - beta2)
            S_hat = S / bc
            sigma = S_hat.square().mean().sqrt()
            gamma = s.square().mean().sqrt()
            H = span.local_cols(sage_damper(S_hat, s, sigma, gamma, eps))  # per column
        else:
            absg = g.abs()
            S_new = st["S"] * beta2 + absg * (1 - beta2)
            S_hat = S_new / bc
            sq_hat, sq_s = yield [("row", S_hat.square().sum().reshape(1)),
                                  ("row", absg.square().sum().reshape(1))]
            st["S"].copy_(S_new)
            n = f.cols
            H = sage_damper(S_hat, absg, (sq_hat / n).sqrt(), (sq_s / n).sqrt(), eps)
            C, start = max(1, H.numel()), 0                # elementwise: H indexed like g
        self.commit_step(st)
        if g.numel():
            out.sage(p, st["m"], g, H, C, start, lr, beta1, beta2, wd, group["momentum_first"])
