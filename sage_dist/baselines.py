"""Baselines from their own packages, for the quality benchmark (docs/QUALITY.md).

They run where the package runs: one process (engine single) and DDP (engine ddp; the packages
step replicated parameters, so DDP is the same computation on every rank). They are not rules
of ours: no sharded state, no oracle of ours to match. Each is set up as its authors recommend
for LLM pretraining; the peak lr is the one setting the benchmark sweeps.

    name          package (pinned)      routing and settings
    torch-adamw   torch.optim.AdamW     every parameter; betas (0.9, 0.95), weight decay 0.1
                                        (the LLaMA recipe, Touvron et al. 2023)
    muon          torch.optim.Muon      2-D hidden matrices: momentum 0.95, Nesterov, 5
                  + torch AdamW         Newton-Schulz steps, adjust_lr_fn "match_rms_adamw",
                                        weight decay 0.1; embedding, head and 1-D: AdamW
                                        (0.9, 0.95), 0.1; one lr for both (Liu et al. 2025,
                                        "Muon is scalable for LLM training"). On CPU the
                                        Newton-Schulz iteration runs in fp32 (see CpuMuon)
    galore        galore-torch 1.0      attention and MLP matrices projected: rank hidden/4,
                                        update_proj_gap 200, scale 0.25, proj_type std; the
                                        rest AdamW in the same optimizer (Zhao et al. 2024)
    apollo        apollo-torch 1.0.3    the same matrices: rank hidden/4, random projection,
                                        channel-wise scaling, scale 1, gap 200
    apollo-mini   apollo-torch 1.0.3    rank 1, tensor-wise scaling, scale 128, scale_front
                                        (the authors' setting for small LLaMAs; Zhu et al. 2025)
    adam-mini     adam-mini 1.1.1       every parameter; betas (0.9, 0.95), weight decay 0.1,
                                        the model's hidden size and head counts (Zhang et al.
                                        2024)
    lion-pytorch  lion-pytorch 0.2.5    every parameter; betas (0.9, 0.99), weight decay 1.0
                                        (Chen et al. 2023: lr 3-10x below AdamW's and decay
                                        3-10x above, so lr x decay stays AdamW's)

`weight_decay` from the training config, when given, replaces each baseline's decay. A
baseline does not skip non-finite gradients (the packages have no such option), and keeps its
state in fp32.
"""
from __future__ import annotations

import torch
from torch import nn

from .optim.recipes import classify

from torch.optim import _muon   # whose Newton-Schulz function Muon calls by name each step

PACKAGES = {"galore": "galore_torch", "apollo": "apollo_torch", "apollo-mini": "apollo_torch",
            "adam-mini": "adam_mini", "lion-pytorch": "lion_pytorch"}
BASELINES = ("torch-adamw", "muon", "galore", "apollo", "apollo-mini", "adam-mini",
             "lion-pytorch")
ENGINES = ("single", "ddp")
_LLM_ADAMW = dict(betas=(0.9, 0.95), weight_decay=0.1)


class OptimizerChain:
    """Several torch optimizers stepped as one (Muon for matrices, AdamW for the rest):
    param_groups and state are the union of theirs, so the trainer's lr schedule, memory
    accounting and checkpoints treat the chain like one optimizer."""

    def __init__(self, optimizers):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self):
        out = {}
        for o in self.optimizers:
            out.update(o.state)
        return out

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict):
        states = state_dict["optimizers"]
        if len(states) != len(self.optimizers):
            raise ValueError(f"the checkpoint holds {len(states)} optimizers; this chain has "
                             f"{len(self.optimizers)}")
        for o, s in zip(self.optimizers, states):
            o.load_state_dict(s)

    def __repr__(self):
        return f"OptimizerChain({', '.join(type(o).__name__ for o in self.optimizers)})"


def newton_schulz_fp32(grad, ns_coefficients, ns_steps, eps):
    """Muon's quintic Newton-Schulz orthogonalisation (Jordan et al. 2024: coefficients
    3.4445, -4.7750, 2.0315, 5 steps) in fp32. torch's version casts to bf16 first, which is
    the right trade on a GPU and ~17x slower than fp32 on a CPU without bf16 matmul units;
    fp32 is the same iteration with less rounding. Same signature as torch's function."""
    a, b, c = ns_coefficients
    x = grad.float()
    wide = x.size(0) > x.size(1)
    if wide:   # iterate on the short side: the Gram matrix is min(m, n) square
        x = x.T
    x = x / x.norm().clamp(min=eps)     # spectral norm <= Frobenius norm <= 1
    for _ in range(ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if wide else x).to(grad.dtype)


class CpuMuon(torch.optim.Muon):
    """torch.optim.Muon whose Newton-Schulz iteration runs in fp32 when the parameters are
    on the CPU (newton_schulz_fp32) and is torch's own bf16 one elsewhere; momentum,
    Nesterov, the lr adjustment and weight decay are torch's code unchanged."""

    @torch.no_grad()
    def step(self, closure=None):
        on_cpu = all(p.device.type == "cpu" for g in self.param_groups for p in g["params"])
        if not on_cpu:
            return super().step(closure)
        original = _muon._zeropower_via_newtonschulz
        _muon._zeropower_via_newtonschulz = newton_schulz_fp32
        try:
            return super().step(closure)
        finally:
            _muon._zeropower_via_newtonschulz = original


def check_baseline(name: str, engine: str) -> None:
    """Refuse, before any work, a baseline on an engine it cannot run on."""
    if name in BASELINES and engine not in ENGINES:
        raise ValueError(f"recipe={name!r} is a package baseline, which runs with engine "
                         f"{' or '.join(ENGINES)}; engine={engine!r} shards the parameters "
                         f"(use one of sage_dist's recipes there)")


def _split(model: nn.Module):
    """(hidden 2-D matrices, everything else) by sage_dist's routing: the embedding and the
    output head are not hidden matrices whatever their shape."""
    rows = classify(model)
    hidden = [p for _, p, cat in rows if cat == "matrix"]
    rest = [p for _, p, cat in rows if cat != "matrix"]
    return hidden, rest


def _projected(model, name, mc):
    """GaLore / APOLLO: the attention and MLP matrices in a projected group, the rest plain."""
    hidden, rest = _split(model)
    rank = max(1, mc.hidden_size // 4)
    if name == "galore":
        low = dict(rank=rank, update_proj_gap=200, scale=0.25, proj_type="std")
    elif name == "apollo":
        low = dict(rank=rank, proj="random", scale_type="channel", scale=1.0,
                   update_proj_gap=200, proj_type="std")
    else:  # apollo-mini
        low = dict(rank=1, proj="random", scale_type="tensor", scale=128.0,
                   update_proj_gap=200, proj_type="std")
    return [dict(params=rest), dict(params=hidden, **low)]


def build_baseline(model: nn.Module, name: str, lr: float, mc, weight_decay=None):
    """The optimizer of baseline `name` for `model` (a Hugging Face Llama built from `mc`)."""
    if name not in BASELINES:
        raise ValueError(f"recipe={name!r} is not a baseline: allowed are {', '.join(BASELINES)}")
    if name in PACKAGES:
        try:
            __import__(PACKAGES[name])
        except ImportError as e:
            raise ImportError(f"recipe={name!r} needs the package {PACKAGES[name]!r} "
                              f"(pinned in requirements.txt): {e}") from None

    def decay(default):
        return default if weight_decay is None else weight_decay

    if name == "torch-adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=_LLM_ADAMW["betas"],
                                 weight_decay=decay(0.1))
    if name == "muon":
        hidden, rest = _split(model)
        return OptimizerChain([
            CpuMuon(hidden, lr=lr, weight_decay=decay(0.1), momentum=0.95, nesterov=True,
                    ns_steps=5, adjust_lr_fn="match_rms_adamw"),
            torch.optim.AdamW(rest, lr=lr, betas=_LLM_ADAMW["betas"], weight_decay=decay(0.1))])
    if name == "galore":
        from galore_torch import GaLoreAdamW
        return GaLoreAdamW(_projected(model, name, mc), lr=lr, weight_decay=decay(0.0),
                           no_deprecation_warning=True)
    if name in ("apollo", "apollo-mini"):
        from apollo_torch import APOLLOAdamW
        return APOLLOAdamW(_projected(model, name, mc), lr=lr, weight_decay=decay(0.0),
                           scale_front=name == "apollo-mini")
    if name == "adam-mini":
        from adam_mini import Adam_mini
        return Adam_mini(model.named_parameters(), lr=lr, betas=_LLM_ADAMW["betas"],
                         weight_decay=decay(0.1), dim=mc.hidden_size,
                         n_heads=mc.num_attention_heads,
                         n_kv_heads=getattr(mc, "num_key_value_heads", None), verbose=False)
    from lion_pytorch import Lion
    return Lion(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=decay(1.0))
