"""Plain per-tensor implementations of every rule: the oracle.

Written for clarity, straight from docs/ALGORITHMS.md: whole tensors, the Sinkhorn iterate X
materialised, no fragments, no communication. Fused kernels and sharded paths are tested
against these functions on the same inputs. Not used for training.
"""
from __future__ import annotations

import math

import torch


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


def init_state(rule: str, p: torch.Tensor) -> dict:
    z = lambda: torch.zeros(p.shape, dtype=torch.float32)
    if rule == "sage":
        S = torch.zeros(_as_matrix(p).shape[1]) if p.dim() >= 2 else z()
        return {"step": 0, "m": z(), "S": S}
    if rule in ("lion", "scale_head"):
        return {"m": z()}
    if rule in ("adamw", "scale_adamw"):
        return {"step": 0, "exp_avg": z(), "exp_avg_sq": z()}
    return {}


def sage(p, g, st, hp):
    lr, wd, eps = hp["lr"], hp["weight_decay"], hp["eps"]
    b1, b2 = hp["betas"]
    st["step"] += 1
    t = st["step"]
    p.mul_(1 - lr * wd)
    if p.dim() >= 2:
        s = _as_matrix(g).abs().mean(dim=0)
    else:
        s = g.abs()
    st["S"].mul_(b2).add_((1 - b2) * s)
    S_hat = st["S"] / (1 - b2 ** t)
    sigma = S_hat.pow(2).mean().sqrt()
    gamma = s.pow(2).mean().sqrt()
    H = torch.minimum(torch.clamp(sigma / (S_hat + eps), max=1.0), gamma / (s + eps))
    m = st["m"]
    if hp.get("momentum_first", True):
        m.mul_(b2).add_((1 - b2) * g)
        u = torch.sign(b1 * m + (1 - b1) * g)
    else:
        u = torch.sign(b1 * m + (1 - b1) * g)
        m.mul_(b2).add_((1 - b2) * g)
    if p.dim() >= 2:
        _as_matrix(p).sub_(lr * _as_matrix(u) * H[None, :])
    else:
        p.sub_(lr * u * H)


def _sinkhorn_iterate(g, iters, eps, row_target=1.0, col_target=1.0):
    X = _as_matrix(g).clone()
    for _ in range(iters):
        X = row_target * X / (X.norm(dim=1, keepdim=True) + eps)
        X = col_target * X / (X.norm(dim=0, keepdim=True) + eps)
    return X.reshape(g.shape)


def sinkhorn(p, g, st, hp):
    p.mul_(1 - hp["lr"] * hp["weight_decay"])
    X = _sinkhorn_iterate(g, hp["sinkhorn_iters"], hp["eps"])
    p.sub_(hp["lr"] * hp["sinkhorn_scale"] * X)


def sinkgd(p, g, st, hp):
    R, C = _as_matrix(g).shape
    X = _sinkhorn_iterate(g, hp["sinkhorn_iters"], hp["eps"], math.sqrt(C), math.sqrt(R))
    p.mul_(1 - hp["lr"] * hp["weight_decay"]).sub_(hp["linear_lr_scale"] * hp["lr"] * X)


def _rms_normalise(x, dim, floor):
    s = _as_matrix(x).pow(2).mean(dim=dim, keepdim=True).sqrt()
    return (_as_matrix(x) / torch.clamp(s, min=floor)).reshape(x.shape)


def scale_dense(p, g, st, hp):
    u = _rms_normalise(g, 1, hp["floor"])
    p.mul_(1 - hp["lr"] * hp["weight_decay"]).sub_(hp["lr"] * u)


def scale_embedding(p, g, st, hp):
    u = _rms_normalise(g, 0, hp["floor"])
    p.mul_(1 - hp["lr"] * hp["weight_decay"]).sub_(hp["lr"] * u)


def scale_head(p, g, st, hp):
    st["m"].mul_(hp["momentum"]).add_((1 - hp["momentum"]) * g)
    u = _rms_normalise(st["m"], 1, hp["floor"])
    p.mul_(1 - hp["lr"] * hp["weight_decay"]).sub_(hp["lr"] * u)


def scale_adamw(p, g, st, hp):
    b1, b2 = hp["adam_betas"]
    adam_lr = hp["peak_lr"] if hp["adam_lr"] is None else hp["adam_lr"]
    lr1 = adam_lr * hp["lr"] / hp["peak_lr"] if hp["peak_lr"] > 0 else 0.0
    st["step"] += 1
    t = st["step"]
    st["exp_avg"].mul_(b1).add_((1 - b1) * g)
    st["exp_avg_sq"].mul_(b2).add_((1 - b2) * g * g)
    p.mul_(1 - lr1 * hp["weight_decay"])
    p.sub_(lr1 * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
           * st["exp_avg"] / (st["exp_avg_sq"].sqrt() + hp["adam_eps"]))


def lion(p, g, st, hp):
    b1, b2 = hp["betas"]
    p.mul_(1 - hp["lr"] * hp["weight_decay"])
    p.sub_(hp["lr"] * torch.sign(b1 * st["m"] + (1 - b1) * g))
    st["m"].mul_(b2).add_((1 - b2) * g)


def adamw(p, g, st, hp):
    b1, b2 = hp["betas"]
    st["step"] += 1
    t = st["step"]
    p.mul_(1 - hp["lr"] * hp["weight_decay"])
    st["exp_avg"].mul_(b1).add_((1 - b1) * g)
    st["exp_avg_sq"].mul_(b2).add_((1 - b2) * g * g)
    denom = st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** t) + hp["eps"]
    p.sub_(hp["lr"] / (1 - b1 ** t) * st["exp_avg"] / denom)


RULES = dict(sage=sage, sinkhorn=sinkhorn, sinkgd=sinkgd, scale_dense=scale_dense,
             scale_embedding=scale_embedding, scale_head=scale_head, scale_adamw=scale_adamw,
             lion=lion, adamw=adamw)


def step(rule: str, param: torch.Tensor, grad: torch.Tensor, state: dict, hp: dict) -> None:
    """One reference step of `rule` on a whole tensor, fp32 math, written back in its dtype."""
    p = param.detach().float().clone()
    RULES[rule](p, grad.detach().float(), state, hp)
    param.detach().copy_(p)


class ReferenceOptimizer:
    """Mirrors the param groups of a RoutedOptimizer over other (full) tensors."""

    def __init__(self, groups: list[dict], params: list[list[torch.Tensor]]):
        self.groups = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        self.params = params
        self.state = [[init_state(g["rule"], p) for p in ps] for g, ps in zip(groups, params)]

    def step(self, grads: list[list[torch.Tensor | None]]) -> None:
        for g, ps, sts, gs in zip(self.groups, self.params, self.state, grads):
            for p, st, gr in zip(ps, sts, gs):
                if gr is not None:
                    step(g["rule"], p, gr, st, g)
