"""Single-rule optimizers, torch.optim style, for users who route parameters themselves."""
from __future__ import annotations

from .optimizer import RoutedOptimizer


class _SingleRule(RoutedOptimizer):
    rule = ""

    def __init__(self, params, *, nonfinite: str = "skip", **hyperparameters):
        super().__init__(params, {"rule": self.rule, **hyperparameters}, nonfinite=nonfinite)
        if not any(p.requires_grad for g in self.param_groups for p in g["params"]):
            raise ValueError(f"{type(self).__name__}: the parameters given hold no trainable "
                             f"parameters (every one has requires_grad=False)")


class SAGE(_SingleRule):
    """SAGE (docs/ALGORITHMS.md §1). Defaults: lr=2e-3, betas=(0.9, 0.99), eps=1e-8,
    weight_decay=0.01, momentum_first=True (the authors' order)."""
    rule = "sage"

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01,
                 momentum_first=True, *, nonfinite="skip"):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         momentum_first=momentum_first, nonfinite=nonfinite)


class Sinkhorn(_SingleRule):
    """Uniform Sinkhorn (§2), stateless. Needs >=2-D parameters."""
    rule = "sinkhorn"

    def __init__(self, params, lr=2e-3, weight_decay=0.01, sinkhorn_iters=5,
                 sinkhorn_scale=10.0, eps=1e-8, *, nonfinite="skip"):
        super().__init__(params, lr=lr, weight_decay=weight_decay, sinkhorn_iters=sinkhorn_iters,
                         sinkhorn_scale=sinkhorn_scale, eps=eps, nonfinite=nonfinite)


class SinkGD(_SingleRule):
    """SinkGD (§3), stateless. Needs >=2-D parameters."""
    rule = "sinkgd"

    def __init__(self, params, lr=2e-2, weight_decay=0.0, sinkhorn_iters=5,
                 linear_lr_scale=0.05, eps=1e-8, *, nonfinite="skip"):
        super().__init__(params, lr=lr, weight_decay=weight_decay, sinkhorn_iters=sinkhorn_iters,
                         linear_lr_scale=linear_lr_scale, eps=eps, nonfinite=nonfinite)


class ScaleDense(_SingleRule):
    """SCALE's dense rule (§4): per-output-row RMS normalisation, stateless."""
    rule = "scale_dense"

    def __init__(self, params, lr=1e-3, weight_decay=0.0, floor=1e-8, *, nonfinite="skip"):
        super().__init__(params, lr=lr, weight_decay=weight_decay, floor=floor,
                         nonfinite=nonfinite)


class ScaleEmbedding(_SingleRule):
    """SCALE's embedding rule (§4): per-feature-column RMS normalisation, stateless."""
    rule = "scale_embedding"

    def __init__(self, params, lr=1e-3, weight_decay=0.0, floor=1e-8, *, nonfinite="skip"):
        super().__init__(params, lr=lr, weight_decay=weight_decay, floor=floor,
                         nonfinite=nonfinite)


class ScaleHead(_SingleRule):
    """SCALE's last-layer rule (§4): momentum, then per-row RMS normalisation."""
    rule = "scale_head"

    def __init__(self, params, lr=1e-3, weight_decay=0.0, momentum=0.9, floor=1e-8, *,
                 nonfinite="skip"):
        super().__init__(params, lr=lr, weight_decay=weight_decay, momentum=momentum,
                         floor=floor, nonfinite=nonfinite)


class ScaleAdamW(_SingleRule):
    """SCALE's AdamW for 1-D parameters (§4); its lr follows lr / peak_lr of the group."""
    rule = "scale_adamw"

    def __init__(self, params, lr=1e-3, adam_lr=None, adam_betas=(0.9, 0.999), adam_eps=1e-8,
                 weight_decay=0.0, *, nonfinite="skip"):
        super().__init__(params, lr=lr, adam_lr=adam_lr, adam_betas=adam_betas,
                         adam_eps=adam_eps, weight_decay=weight_decay, nonfinite=nonfinite)


class Lion(_SingleRule):
    """Lion (§5)."""
    rule = "lion"

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.01, *,
                 nonfinite="skip"):
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay,
                         nonfinite=nonfinite)


class AdamW(_SingleRule):
    """AdamW with torch.optim.AdamW's exact math, on fragments."""
    rule = "adamw"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, *,
                 nonfinite="skip"):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         nonfinite=nonfinite)
