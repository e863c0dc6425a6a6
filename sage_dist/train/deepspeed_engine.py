"""The DeepSpeed engine of the trainer, and the reconciliation of its DeepSpeed JSON with the
training config.

The training config owns the batch, accumulation, clipping, bf16 and the optimizer: a JSON
field that is set (not "auto") and disagrees with it is refused before any process group
exists; agreeing and "auto" fields are filled in from the config, the optimizer section is
rewritten to name cfg.recipe with the config's hyperparameters, and the JSON's scheduler is
dropped (the loop sets the learning rate itself). DeepSpeed internals are read only through
sage_dist.shard.zero.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from sage_dist.models import build_model
from sage_dist.shard import zero

from . import config as C
from .config import ConfigError, TrainConfig
from .engines import Engine, lm_loss, optimizer_kwargs

DS_TAG = "deepspeed"


def deepspeed_json(cfg: TrainConfig, world: int) -> dict:
    """The DeepSpeed JSON with the fields the training config owns checked and filled in.

    A field the JSON sets (other than "auto") must agree with the training config; the
    optimizer must name cfg.recipe (its params are replaced by the config's lr/weight_decay);
    the JSON's scheduler is dropped (the loop schedules the lr itself).
    """
    from sage_dist.deepspeed import load_config, our_recipe

    path = C.find("deepspeed_config", cfg.deepspeed_config, "deepspeed")
    try:
        ds = load_config(str(path))
    except ValueError as e:  # (a file that JSON/HJSON cannot parse)
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
                          f"disagrees with the training config (bf16={cfg.bf16}); allowed: "
                          f"{str(cfg.bf16).lower()} or \"auto\"")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.bf16}
    section = ds.get("optimizer")
    if section is not None:
        named = our_recipe(section.get("type"))
        if named != our_recipe(cfg.recipe):
            raise ConfigError(
                f"deepspeed_config {cfg.deepspeed_config}: optimizer.type="
                f"{section.get('type')!r} disagrees with the training config "
                f"(recipe={cfg.recipe!r}); allowed: {cfg.recipe!r} or no optimizer section")
    # "adamw" and "lion" alone name DeepSpeed's own optimizers: ours then carry the prefix.
    name = our_recipe(f"sage_dist.{cfg.recipe}")
    ds["optimizer"] = {"type": name if our_recipe(name) == name else f"sage_dist.{name}",
                       "params": optimizer_kwargs(cfg)}
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
        self.engine, _, _, _ = sd.initialize(model=model, config=ds_cfg)
        self.wrapped = self.engine
        self.sage = zero.client_optimizer(self.engine)  # ours, inside DeepSpeed's wrapper
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
        norm = float(norm) if norm is not None else float("nan")
        # A NaN/Inf gradient anywhere makes DeepSpeed's global norm (all-reduced: every rank
        # sees the same) invalid; ZeRO then skips the whole step on every rank without calling
        # our optimizer, so its nonfinite='raise' would never fire: raise here, on every rank.
        if self.step_skipped() and getattr(self.sage, "nonfinite", "skip") == "raise":
            raise FloatingPointError(
                f"non-finite gradient: DeepSpeed's global gradient norm is {norm}; it skipped "
                f"the step on every rank, nothing was updated (nonfinite='raise'; pass "
                f"nonfinite=skip to skip such steps instead)")
        return norm

    def step_skipped(self) -> bool:
        return zero.step_skipped(self.engine)

    def full_params(self):
        import deepspeed

        named = sorted(self.engine.module.named_parameters())
        ctx = deepspeed.zero.GatheredParameters([p for _, p in named]) if self.stage >= 3 \
            else contextlib.nullcontext()
        with ctx:
            out = [(n, p.detach().float().cpu().clone()) for n, p in named]
        yield from out

    def save(self, path: Path) -> None:
        try:
            self.engine.save_checkpoint(str(path), tag=DS_TAG)
        except Exception:
            # save_checkpoint ends with a barrier, where the ranks whose writes succeeded now
            # wait: join it, so that every rank reaches the trainer's exchange of errors.
            from .dist import barrier
            barrier()
            raise

    def load(self, path: Path) -> None:
        load_path, _ = self.engine.load_checkpoint(str(path), tag=DS_TAG)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
