"""DeepSpeed face of sage_dist: name our optimizer in a DeepSpeed JSON config.

    engine, optimizer, _, scheduler = sage_dist.deepspeed.initialize(
        model=model, config="configs/deepspeed/zero2.json")

with, in the JSON, `"optimizer": {"type": "sage-hybrid", "params": {"lr": 2e-3}}`. Types are
our recipes (case and -/_ insensitive; an optional "sage_dist." prefix). "adamw" and "lion"
are also DeepSpeed built-ins and stay DeepSpeed's: ours are "sage_dist.adamw" and
"sage_dist.lion". Any DeepSpeed built-in or torch.optim name passes through untouched.
"""
from __future__ import annotations

import copy
import json
import os

from .optim.recipes import RECIPES, build_optimizer
from .shard import zero
from .shard.layout import PendingLayout, make_layout

PREFIX = "sage_dist."


def deepspeed_builtin_types() -> list[str]:
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    return list(DEEPSPEED_OPTIMIZERS)


def our_recipe(type_name: str) -> str | None:
    """The recipe a config's optimizer type names, or None if it is not ours."""
    key = str(type_name).strip().lower().replace("_", "-")
    prefixed = key.startswith(PREFIX.replace("_", "-"))
    key = key[len(PREFIX):] if prefixed else key
    if key not in RECIPES:
        return None
    if not prefixed and key.replace("-", "") in deepspeed_builtin_types():
        return None  # DeepSpeed's own (adamw, lion)
    return key


def load_config(config) -> dict:
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            return json.load(f)
    if isinstance(config, dict):
        return copy.deepcopy(config)
    raise ValueError(f"config={config!r}: allowed is a path to a DeepSpeed JSON file or a dict")


def _check_supported(model, cfg: dict) -> None:
    try:
        from deepspeed.pipe import PipelineModule
    except ImportError:  # pragma: no cover
        PipelineModule = ()
    if isinstance(model, PipelineModule) or cfg.get("pipeline", {}).get("stages", 1) not in (1, "auto"):
        raise NotImplementedError("sage_dist optimizers do not support DeepSpeed pipeline "
                                  "parallelism (PipelineModule) yet")
    moe = [n for n, p in model.named_parameters() if zero.is_expert_param(p)]
    if moe:
        raise NotImplementedError(f"sage_dist optimizers do not support MoE expert parameters "
                                  f"(expert data-parallel groups) yet: {moe[0]!r}")
    zcfg = cfg.get("zero_optimization", {})
    if zcfg.get("elastic_checkpoint"):
        raise ValueError("zero_optimization.elastic_checkpoint=true is not supported: it "
                         "re-splits every optimizer state as if it were elementwise; set it to "
                         "false and reshard with sage_dist.deepspeed.save_universal / "
                         "load_universal")
    off = zcfg.get("offload_optimizer", {}) or {}
    if off.get("device") == "cpu" and float(off.get("ratio", 1.0)) < 1.0:
        raise ValueError(f"zero_optimization.offload_optimizer.ratio={off['ratio']}: partial "
                         f"offload needs DeepSpeed's CPU Adam; allowed with sage_dist is 1.0")
    if cfg.get("fp16", {}).get("enabled"):
        raise ValueError("fp16.enabled=true is not supported with sage_dist optimizers: use "
                         "bf16 (or fp32)")


def initialize(model, config, optimizer=None, **kwargs):
    """deepspeed.initialize, building our optimizer when the config names one of our recipes.

    Returns what deepspeed.initialize returns: (engine, optimizer, dataloader, lr_scheduler).
    All checks run before DeepSpeed does any work.
    """
    import deepspeed

    cfg = load_config(config)
    section = cfg.get("optimizer")
    if optimizer is not None or section is None:
        return deepspeed.initialize(model=model, optimizer=optimizer, config=cfg, **kwargs)
    type_name = section.get("type")
    recipe = our_recipe(type_name)
    if recipe is None:
        import torch
        builtin = str(type_name).lower() in deepspeed_builtin_types()
        if builtin or hasattr(torch.optim, str(type_name)):
            return deepspeed.initialize(model=model, config=cfg, **kwargs)
        raise ValueError(
            f"optimizer.type={type_name!r} is not a known optimizer: allowed are sage_dist's "
            f"{', '.join(RECIPES)} (adamw and lion as sage_dist.adamw / sage_dist.lion), "
            f"DeepSpeed's {', '.join(deepspeed_builtin_types())}, or a torch.optim class name")
    _check_supported(model, cfg)
    params = dict(section.get("params", {}))
    for key in ("betas", "adam_betas"):  # JSON has lists where torch has tuples
        if isinstance(params.get(key), list):
            params[key] = tuple(params[key])
    opt = build_optimizer(model, recipe, layout=PendingLayout(), **params)
    names = {id(p): n for n, p in opt.named_parameters()}  # before DeepSpeed swaps the tensors
    cfg.pop("optimizer")
    cfg["zero_allow_untested_optimizer"] = True
    off = cfg.get("zero_optimization", {}).get("offload_optimizer", {}) or {}
    if off.get("device") not in (None, "none"):
        cfg["zero_force_ds_cpu_optimizer"] = False
    engine, ds_opt, loader, sched = deepspeed.initialize(model=model, optimizer=opt, config=cfg,
                                                         **kwargs)
    if cfg.get("zero_optimization", {}).get("stage", 0) in (1, 2, 3):
        opt.use_layout(zero.ZeroLayout.of(engine, names))
    else:
        opt.use_layout(make_layout(opt.named_parameters()))
    return engine, ds_opt, loader, sched


# -- resharding: a world-size-independent checkpoint of our state ---------------------------
UNIVERSAL_FILE = "sage_dist_universal.pt"


def save_universal(engine, path, client_state: dict | None = None) -> str:
    """Write, on rank 0, every parameter's fp32 master weights and optimizer state as whole
    tensors keyed by parameter name, plus per-parameter step counts and replicated statistics.
    A collective: call it on every rank. The file loads at any world size and any ZeRO stage
    (load_universal). Written atomically: a crash mid-save leaves any older file intact."""
    import torch
    import torch.distributed as dist

    from .optim.registry import get_rule

    opt = zero.client_optimizer(engine)
    layout = opt.layout
    params, state = {}, {}
    for e in layout.entries_by_id.values():
        rule = get_rule(opt.param_groups[e.group_index]["rule"])
        full = layout.gather(e.flat, e.flat.data)
        st = opt.state[e.flat]
        elem = {k: layout.gather(e.flat, v) for k, v in st.items()
                if k in layout.elementwise_keys(e.flat, rule)}
        for i, (m, p) in enumerate(zip(e.members, full)):
            params[m.name] = p.cpu()
            views = layout.member_state(e.flat, i, st, rule)
            state[m.name] = {k: (elem[k][i] if k in elem else v).detach().cpu().clone()
                             for k, v in views.items()}
    out = {"params": params, "state": state, "groups": [
        {k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "client_state": client_state or {}}
    os.makedirs(path, exist_ok=True)
    target = os.path.join(path, UNIVERSAL_FILE)
    if dist.get_rank() == 0:
        tmp = target + ".tmp"
        torch.save(out, tmp)
        os.replace(tmp, target)
    dist.barrier()
    return target


def load_universal(engine, path) -> dict:
    """Load a save_universal file into this engine, whatever its world size or ZeRO stage:
    each rank cuts its own ranges out of the whole tensors. Returns the saved client_state."""
    import torch

    from .optim.registry import get_rule

    opt = zero.client_optimizer(engine)
    layout = opt.layout
    saved = torch.load(os.path.join(path, UNIVERSAL_FILE), weights_only=True)
    missing = [m.name for e in layout.entries_by_id.values() for m in e.members
               if m.name not in saved["params"]]
    if missing:
        raise ValueError(f"{path}: no saved state for parameter {missing[0]!r}: the checkpoint "
                         f"is of another model")
    for group, sg in zip(opt.param_groups, saved["groups"]):
        for k, v in sg.items():
            if k in group and k != "name":
                group[k] = tuple(v) if isinstance(v, list) else v
    with torch.no_grad():
        for e in layout.entries_by_id.values():
            rule = get_rule(opt.param_groups[e.group_index]["rule"])
            st = opt.state[e.flat]
            elem = layout.elementwise_keys(e.flat, rule)
            for i, m in enumerate(e.members):
                n = m.b - m.a
                e.flat.data[m.offset:m.offset + n] = saved["params"][m.name].reshape(-1)[m.a:m.b]
                views = layout.member_state(e.flat, i, st, rule)
                for k, v in saved["state"][m.name].items():
                    src = v.reshape(-1)[m.a:m.b] if k in elem else v
                    views[k].copy_(src)
    zero.refresh_model_weights(engine)
    return saved["client_state"]
