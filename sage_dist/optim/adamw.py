"""AdamW exactly as torch.optim.AdamW computes it (the hybrids' fallback rule)."""
from __future__ import annotations

from .base import Rule, StateSpec, check_betas, check_lr, check_nonneg, check_positive


class AdamWRule(Rule):
    name = "adamw"
    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    checks = dict(lr=check_lr, betas=check_betas, eps=check_positive, weight_decay=check_nonneg)

    def state_spec(self, shape, R, C):
        return StateSpec(elementwise=("exp_avg", "exp_avg_sq"), step=True)

    def run(self, f, p, g, st, group, out):
        yield []
        lr, (beta1, beta2) = group["lr"], group["betas"]
        t = self.next_step(st)
        self.commit_step(st)
        m1, m2 = st["exp_avg"], st["exp_avg_sq"]
        p.mul_(1 - lr * group["weight_decay"])
        m1.lerp_(g, 1 - beta1)
        m2.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (m2.sqrt() / (1 - beta2 ** t) ** 0.5).add_(group["eps"])
        p.addcdiv_(m1, denom, value=-lr / (1 - beta1 ** t))
