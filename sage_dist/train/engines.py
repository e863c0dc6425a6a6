"""One small adapter per engine: build the model and optimizer, run a micro-step (forward +
backward), an optimizer step (clip, set the learning rate, step), evaluate, save and load.

    single     one process, plain module
    ddp        torch DistributedDataParallel (gloo on CPU, nccl on CUDA)
    fsdp2      torch fully_shard on a 1-D mesh via sage_dist.fsdp.shard_llama; with tp > 1 a
               (world / tp, tp) mesh via sage_dist.fsdp.parallelize_llama (FSDP2 x TP)
    deepspeed  sage_dist.deepspeed.initialize with a DeepSpeed JSON naming our recipe
               (deepspeed_engine.py, with the reconciliation of that JSON and the config)

Every engine starts from the same seeded initialisation and computes the loss as the mean over
the global batch, so in fp32 they follow the same trajectory up to rounding. The learning rate
is set on the optimizer's param groups before each step (peak x config.lr_factor), so the
schedule is a pure function of the step on every engine and needs no state of its own.
Memory is sage_dist.memory.measure of the wrapped model and our optimizer, on every engine.
Checkpoint payloads: single/ddp torch.save of model + optimizer states (rank 0), fsdp2
torch.distributed.checkpoint with get_state_dict/set_state_dict, deepspeed
engine.save_checkpoint/load_checkpoint. The loop makes them atomic (tmp dir, then rename).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from sage_dist.baselines import BASELINES, build_baseline
from sage_dist.models import build_model

from .config import TrainConfig


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def optimizer_kwargs(cfg: TrainConfig) -> dict:
    kw = {}
    if cfg.lr is not None:
        kw["lr"] = cfg.lr
    if cfg.weight_decay is not None:
        kw["weight_decay"] = cfg.weight_decay
    if cfg.state_dtype != "float32":
        kw["state_dtype"] = cfg.state_dtype
    if cfg.stochastic_rounding:
        kw["stochastic_rounding"] = True
        kw["rounding_seed"] = cfg.seed
    if cfg.nonfinite != "skip":
        kw["nonfinite"] = cfg.nonfinite
    return kw


FAULT_NAN_ENV = "SAGE_DIST_FAULT_NAN"


def fault_nan_spec(rank: int) -> tuple[int | None, str | None]:
    """Test hook (not a config key): SAGE_DIST_FAULT_NAN="STEP:RANK[:PARAM]" puts a NaN into
    element 0 of rank RANK's local gradient of PARAM (default: the first matrix by name) in
    step STEP, before the engine reduces it, as a bad kernel on one rank would. (single, ddp
    and DeepSpeed; not fsdp2, whose sharded parameters get their gradients outside autograd.)"""
    spec = os.environ.get(FAULT_NAN_ENV, "").strip()
    if not spec:
        return None, None
    parts = spec.split(":", 2)
    try:
        step, r = int(parts[0]), int(parts[1] if len(parts) > 1 else 0)
    except ValueError:
        from .config import ConfigError
        raise ConfigError(f"{FAULT_NAN_ENV}={spec!r}: allowed is STEP:RANK[:PARAM]") from None
    return (step if r == rank else None), (parts[2] if len(parts) > 2 else None)


def inject_nan_hook(module, param_name: str | None):
    """Register a one-shot gradient hook writing NaN into element 0; returns (name, handle)."""
    named = sorted((n, p) for n, p in module.named_parameters() if p.requires_grad)
    name, p = next(((n, p) for n, p in named if (param_name is None and p.dim() == 2)
                    or n == param_name), (None, None))
    if p is None:
        raise ValueError(f"{FAULT_NAN_ENV}: no parameter {param_name!r}")

    def hook(g):
        g = g.clone()
        g.view(-1)[0] = float("nan")
        return g
    return name, p.register_hook(hook)


class Engine:
    name = "?"

    def __init__(self, cfg: TrainConfig, mc, device: torch.device, rank: int, world: int):
        self.cfg, self.mc, self.device, self.rank, self.world = cfg, mc, device, rank, world
        self.base_lrs: list[float] = []

    # -- hooks -------------------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _remember_lrs(self, groups) -> None:
        self.base_lrs = [g["lr"] for g in groups]

    def set_lr(self, factor: float) -> float:
        for g, base in zip(self.lr_groups(), self.base_lrs):
            g["lr"] = base * factor
        return self.base_lrs[0] * factor

    def describe(self) -> str:
        lrs = sorted(set(self.base_lrs))
        return (f"engine {self.name}, recipe {self.cfg.recipe}, {type(self.sage).__name__} with "
                f"{len(self.base_lrs)} param groups, peak lr {', '.join(f'{x:.3g}' for x in lrs)}")

    @torch.no_grad()
    def eval_loss(self, x, y) -> torch.Tensor:
        self.module().eval()
        with self._autocast():
            loss = lm_loss(self.forward(x), y)
        self.module().train()
        return loss.detach()

    def forward(self, x):
        return self.wrapped(input_ids=x).logits

    def memory(self) -> dict:
        """This rank's memory: sage_dist.memory.measure's breakdown (parameters by dtype,
        gradients, fp32 masters, optimizer state elementwise/replicated per rule, peak)."""
        from sage_dist.memory import measure

        return measure(self.wrapped, self.sage)

    def nonfinite_skips(self) -> int:
        """Parameters (fragments) our optimizer has skipped for a NaN/Inf gradient, so far."""
        return int(getattr(self.sage, "nonfinite_count", 0))

    def step_skipped(self) -> bool:
        """Whether the engine itself skipped the whole last step (DeepSpeed's overflow)."""
        return False

    def param_digest(self) -> str:
        """sha256 of every full parameter in fp32, in name order: equal across ranks when the
        replicas agree. A collective for sharded engines: call on every rank."""
        h = hashlib.sha256()
        for name, t in self.full_params():
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


class PlainEngine(Engine):
    """single and ddp."""

    def __init__(self, cfg, mc, device, rank, world):
        super().__init__(cfg, mc, device, rank, world)
        from sage_dist import build_optimizer

        self.model = build_model(mc, cfg.seed).to(device)
        self.name = cfg.engine
        if cfg.engine == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.wrapped = DDP(self.model, device_ids=[device.index] if device.type == "cuda"
                               else None)
        else:
            self.wrapped = self.model
        if cfg.recipe in BASELINES:   # a package's optimizer (the quality benchmark)
            self.sage = self.opt = build_baseline(self.model, cfg.recipe, cfg.lr or 1e-3, mc,
                                                  cfg.weight_decay)
        else:
            self.sage = self.opt = build_optimizer(self.model, cfg.recipe,
                                                   **optimizer_kwargs(cfg))
        self._remember_lrs(self.opt.param_groups)

    def module(self):
        return self.model

    def lr_groups(self):
        return self.opt.param_groups

    def micro_step(self, x, y, last: bool) -> torch.Tensor:
        sync = contextlib.nullcontext() if last or self.cfg.engine != "ddp" \
            else self.wrapped.no_sync()
        with sync:
            with self._autocast():
                loss = lm_loss(self.forward(x), y)
            (loss / self.cfg.grad_accum).backward()
        return loss.detach()

    def _clip(self) -> float:
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        n = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return float(n.full_tensor() if hasattr(n, "full_tensor") else n)

    def step(self) -> float:
        norm = self._clip()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return norm

    def full_params(self):
        yield from sorted(self.model.named_parameters())

    def save(self, path: Path) -> None:
        if self.rank == 0:
            torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict()},
                       path / "state.pt")

    def load(self, path: Path) -> None:
        state = torch.load(path / "state.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])  # the loop sets the lr before each step


class FSDP2Engine(PlainEngine):
    def __init__(self, cfg, mc, device, rank, world):
        Engine.__init__(self, cfg, mc, device, rank, world)
        from torch.distributed.device_mesh import init_device_mesh

        from sage_dist import build_optimizer
        from sage_dist.fsdp import parallelize_llama, shard_llama

        self.name = "fsdp2"
        model = build_model(mc, cfg.seed).to(device)
        if cfg.tp == 1:
            mesh = init_device_mesh(device.type, (world,))
            self.model = self.wrapped = shard_llama(model, mesh, bf16=cfg.bf16)
        else:
            mesh = init_device_mesh(device.type, (world // cfg.tp, cfg.tp),
                                    mesh_dim_names=("dp", "tp"))
            self.model = self.wrapped = parallelize_llama(model, mesh, bf16=cfg.bf16)
        self.sage = self.opt = build_optimizer(self.model, cfg.recipe, **optimizer_kwargs(cfg))
        self._remember_lrs(self.opt.param_groups)

    def _autocast(self):
        return contextlib.nullcontext()  # the FSDP2 mixed-precision policy casts

    def micro_step(self, x, y, last: bool) -> torch.Tensor:
        if self.cfg.grad_accum > 1:
            self.model.set_requires_gradient_sync(last)
        loss = lm_loss(self.forward(x), y)
        (loss / self.cfg.grad_accum).backward()
        return loss.detach()

    def _clip(self) -> float:
        if self.cfg.tp == 1:
            return super()._clip()
        from sage_dist.fsdp import clip_grad_norm_   # norms and TP weights on two meshes
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        return float(clip_grad_norm_(self.model.parameters(), max_norm))

    def full_params(self):
        for name, p in sorted(self.model.named_parameters()):
            yield name, p.full_tensor()

    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path / "dcp"))

    def load(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(self.model, self.opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_state_dict(self.model, self.opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])


def build_engine(cfg: TrainConfig, mc, device, rank: int, world: int, ds_cfg: dict | None):
    if cfg.engine in ("single", "ddp"):
        return PlainEngine(cfg, mc, device, rank, world)
    if cfg.engine == "fsdp2":
        return FSDP2Engine(cfg, mc, device, rank, world)
    from .deepspeed_engine import DeepSpeedEngine
    return DeepSpeedEngine(cfg, mc, device, rank, world, ds_cfg)
