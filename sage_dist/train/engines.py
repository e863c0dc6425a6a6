"""One small adapter per engine: build the model and optimizer, run a micro-step (forward +
backward), an optimizer step (clip, set the learning rate, step), evaluate, save and load.

    single     one process, plain module
    ddp        torch DistributedDataParallel (gloo on CPU, nccl on CUDA)
    fsdp2      torch fully_shard on a 1-D mesh via sage_dist.fsdp.shard_llama
    deepspeed  sage_dist.deepspeed.initialize with a DeepSpeed JSON naming our recipe

Every engine starts from the same seeded initialisation and computes the loss as the mean over
the global batch, so in fp32 they follow the same trajectory up to rounding. The learning rate
is set on the optimizer's param groups before each step (peak x schedule factor), so the
schedule is a pure function of the step on every engine and needs no state of its own.
Checkpoint payloads: single/ddp torch.save of model + optimizer states (rank 0), fsdp2
torch.distributed.checkpoint with get_state_dict/set_state_dict, deepspeed
engine.save_checkpoint/load_checkpoint. The loop makes them atomic (tmp dir, then rename).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import resource
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import ConfigError, TrainConfig

DS_TAG = "deepspeed"


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def build_model(mc, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)  # the same random init on every rank and every engine
    return LlamaForCausalLM(mc)


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
    return kw


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


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

    def optimizer_state_bytes(self) -> int:
        """This rank's exact optimizer-state bytes (optimizer.state_bytes())."""
        return self.sage.state_bytes()["total"]

    def memory(self) -> dict:
        """This rank's bytes: parameters, gradient buffers, optimizer state, peak RSS, and
        sage_dist.memory's full breakdown (parameters by dtype, gradients, fp32 masters,
        optimizer state elementwise/replicated per rule, peak) under 'breakdown'."""
        from sage_dist import memory as sdm

        params, grads = self._param_grad_bytes()
        return {"params": params, "grads": grads, "optimizer": self.optimizer_state_bytes(),
                "peak_rss": peak_rss_bytes(),
                "breakdown": sdm.measure(self.wrapped, self.sage)}

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
        self.sage = self.opt = build_optimizer(self.model, cfg.recipe, **optimizer_kwargs(cfg))
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

    def _param_grad_bytes(self):
        n = sum(_nbytes(p) for p in self.model.parameters())
        return n, sum(p.numel() * 4 for p in self.model.parameters())

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
        from sage_dist.fsdp import shard_llama

        self.name = "fsdp2"
        model = build_model(mc, cfg.seed).to(device)
        mesh = init_device_mesh(device.type, (world,))
        self.model = self.wrapped = shard_llama(model, mesh, bf16=cfg.bf16)
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

    def _param_grad_bytes(self):
        local = [p.to_local() for p in self.model.parameters()]
        return sum(_nbytes(t) for t in local), sum(t.numel() * 4 for t in local)

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


def deepspeed_json(cfg: TrainConfig, world: int) -> dict:
    """The DeepSpeed JSON with the fields the training config owns checked and filled in.

    A field the JSON sets (other than "auto") must agree with the training config; the
    optimizer must name cfg.recipe (its params are replaced by the config's lr/weight_decay);
    the JSON's scheduler is dropped (the loop schedules the lr itself).
    """
    from sage_dist.deepspeed import load_config, our_recipe

    path = cfg.resolve(cfg.deepspeed_config)
    try:
        ds = load_config(str(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed_config={cfg.deepspeed_config!r} is not valid JSON ({e})") \
            from None
    micro = cfg.micro_batch(world)
    owned = {
        "train_micro_batch_size_per_gpu": (micro, f"global_batch {cfg.global_batch} / (world "
                                                  f"size {world} x grad_accum {cfg.grad_accum})"),
        "gradient_accumulation_steps": (cfg.grad_accum, "grad_accum"),
        "train_batch_size": (cfg.global_batch, "global_batch"),
        "gradient_clipping": (cfg.grad_clip, "grad_clip"),
    }
    for key, (want, source) in owned.items():
        have = ds.get(key, "auto")
        if have != "auto" and have != want:
            raise ConfigError(
                f"deepspeed_config {cfg.deepspeed_config}: {key}={have} disagrees with the "
                f"training config ({source} = {want}); allowed: {want} or \"auto\"")
        ds[key] = want
    bf16 = ds.get("bf16", {}).get("enabled", "auto")
    if bf16 != "auto" and bool(bf16) != cfg.bf16:
        raise ConfigError(f"deepspeed_config {cfg.deepspeed_config}: bf16.enabled={bf16} "
                          f"disagrees with the training config (bf16={cfg.bf16})")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.bf16}
    section = ds.get("optimizer")
    if section is not None:
        named = our_recipe(section.get("type"))
        if named != our_recipe(cfg.recipe):
            raise ConfigError(
                f"deepspeed_config {cfg.deepspeed_config}: optimizer.type="
                f"{section.get('type')!r} disagrees with the training config "
                f"(recipe={cfg.recipe!r}); allowed: {cfg.recipe!r} or no optimizer section")
    ds["optimizer"] = {"type": cfg.recipe, "params": optimizer_kwargs(cfg)}
    ds.pop("scheduler", None)
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


class DeepSpeedEngine(Engine):
    def __init__(self, cfg, mc, device, rank, world, ds_cfg: dict):
        super().__init__(cfg, mc, device, rank, world)
        import sage_dist.deepspeed as sd

        self.ds_cfg = ds_cfg
        self.stage = ds_cfg.get("zero_optimization", {}).get("stage", 0)
        self.name = f"deepspeed ZeRO-{self.stage}"
        model = build_model(mc, cfg.seed)
        self.engine, self.ds_opt, _, _ = sd.initialize(model=model, config=ds_cfg)
        self.wrapped = self.engine
        self.sage = getattr(self.ds_opt, "optimizer", self.ds_opt)
        if not hasattr(self.sage, "state_bytes"):
            self.sage = self.ds_opt
        self._remember_lrs(self.lr_groups())

    def module(self):
        return self.engine.module

    def lr_groups(self):
        return self.sage.param_groups

    def _autocast(self):
        return contextlib.nullcontext()  # DeepSpeed casts the module itself

    def forward(self, x):
        return self.engine(input_ids=x.to(self.engine.device)).logits

    def micro_step(self, x, y, last: bool) -> torch.Tensor:
        loss = lm_loss(self.forward(x), y.to(self.engine.device))
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
        if not last:
            self.engine.step()  # a no-op off the accumulation boundary
        return loss.detach()

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _param_grad_bytes(self):
        params = list(self.engine.module.parameters())
        if self.stage >= 3:
            local = sum(_nbytes(p.ds_tensor) for p in params)
            master = sum(_nbytes(t) for t in getattr(self.ds_opt, "fp32_partitioned_groups_flat",
                                                     []))
            grads = sum(p.ds_tensor.numel() * 4 for p in params)
        else:
            local = sum(_nbytes(p) for p in params)
            flats = getattr(self.ds_opt, "single_partition_of_fp32_groups", None) \
                or getattr(self.ds_opt, "fp32_groups_flat_partition", [])
            master = sum(_nbytes(t) for t in flats)
            full = sum(p.numel() for p in params)
            grads = (master if self.stage == 2 else full * 4)
        return local + master, grads

    def full_params(self):
        import deepspeed

        named = sorted(self.engine.module.named_parameters())
        ctx = deepspeed.zero.GatheredParameters([p for _, p in named]) if self.stage >= 3 \
            else contextlib.nullcontext()
        with ctx:
            out = [(n, p.detach().float().cpu().clone()) for n, p in named]
        yield from out

    def save(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag=DS_TAG)

    def load(self, path: Path) -> None:
        load_path, _ = self.engine.load_checkpoint(str(path), tag=DS_TAG)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")


def build_engine(cfg: TrainConfig, mc, device, rank: int, world: int, ds_cfg: dict | None):
    if cfg.engine in ("single", "ddp"):
        return PlainEngine(cfg, mc, device, rank, world)
    if cfg.engine == "fsdp2":
        return FSDP2Engine(cfg, mc, device, rank, world)
    return DeepSpeedEngine(cfg, mc, device, rank, world, ds_cfg)


def all_gather_objects(obj, world: int) -> list:
    if world == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out
