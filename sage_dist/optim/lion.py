"""Lion (docs/ALGORITHMS.md §5), the sign-update baseline."""
from __future__ import annotations

from .base import Rule, StateSpec, check_betas, check_lr, check_nonneg


class LionRule(Rule):
    name = "lion"
    defaults = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.01)
    checks = dict(lr=check_lr, betas=check_betas, weight_decay=check_nonneg)

    def state_spec(self, shape, R, C):
        return StateSpec(elementwise=("m",))

    def run(self, f, p, g, st, group, out):
        yield []
        beta1, beta2 = group["betas"]
        out.lion(p, st["m"], g, group["lr"], beta1, beta2, group["weight_decay"])
