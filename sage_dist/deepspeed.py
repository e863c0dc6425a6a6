"""DeepSpeed face of sage_dist: name our optimizer in a DeepSpeed JSON config.

    engine, optimizer, _, scheduler = sage_dist.deepspeed.initialize(
        model=model, config="configs/deepspeed/zero2.json")

with, in the JSON, `"optimizer": {"type": "sage-hybrid", "params": {"lr": 2e-3}}`. Types are
our recipes (case and -/_ insensitive; an optional "sage_dist." prefix). "adamw" and "lion"
are also DeepSpeed built-ins and stay DeepSpeed's: ours are "sage_dist.adamw" and
"sage_dist.lion". Any DeepSpeed built-in or torch.optim name passes through untouched.

`register()` makes `deepspeed.initialize` itself do this, for every caller (the Hugging Face
Trainer and Accelerate included); `unregister()` undoes it (docs/INTEGRATIONS.md).
"""
from __future__ import annotations

import base64
import copy
import json
import os

from .optim.optimizer import RoutedOptimizer
from .optim.recipes import RECIPES, VARIANTS, build_optimizer
from .shard import zero
from .shard.layout import PendingLayout, group_rule, make_layout
from .universal import UNIVERSAL_FILE, load_universal, save_universal  # noqa: F401 (API)

PREFIX = "sage_dist."


def deepspeed_builtin_types() -> list[str]:
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    return list(DEEPSPEED_OPTIMIZERS)


def our_recipe(type_name: str) -> str | None:
    """The recipe a config's optimizer type names, or None if it is not ours."""
    key = str(type_name).strip().lower().replace("_", "-")
    prefixed = key.startswith(PREFIX.replace("_", "-"))
    key = key[len(PREFIX):] if prefixed else key
    if key not in RECIPES and key not in VARIANTS:
        return None
    if not prefixed and key.replace("-", "") in deepspeed_builtin_types():
        return None  # DeepSpeed's own (adamw, lion)
    return key


def load_config(config) -> dict:
    """A DeepSpeed config as DeepSpeed reads it: a dict (copied), a path to a JSON/HJSON file,
    or a base64 string of one."""
    import hjson  # DeepSpeed's own config reader (a DeepSpeed dependency)

    if isinstance(config, dict):
        return copy.deepcopy(config)
    if isinstance(config, (str, os.PathLike)):
        if os.path.exists(config):
            with open(config) as f:
                text = f.read()
        else:
            try:
                text = base64.urlsafe_b64decode(str(config)).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                text = None
        cfg = None
        if text is not None:
            try:   # JSON first: hjson reads 1.0 as the int 1
                cfg = json.loads(text)
            except ValueError:
                try:
                    cfg = hjson.loads(text, object_pairs_hook=dict)
                except hjson.HjsonDecodeError as e:
                    if os.path.exists(config):
                        raise ValueError(f"{os.fspath(config)} is not valid JSON ({e})") from None
        if isinstance(cfg, dict):
            return cfg
    raise ValueError(f"config={config!r}: allowed is a path to a DeepSpeed JSON file, a dict, or "
                     f"a base64 string of a DeepSpeed config")


def _check_supported(model, cfg: dict, mpu=None) -> None:
    tp = (cfg.get("tensor_parallel", {}) or {}).get("autotp_size", 1)
    mp = mpu.get_model_parallel_world_size() if hasattr(mpu, "get_model_parallel_world_size") \
        else 1
    if (tp not in (None, "auto") and int(tp) > 1) or mp > 1:
        raise NotImplementedError(
            f"tensor_parallel.autotp_size={tp}, model-parallel world size {mp}: sage_dist "
            f"optimizers under DeepSpeed need whole matrices per data-parallel group (tensor "
            f"slices would give wrong row and column statistics); allowed: 1")
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
    A client `optimizer` that is one of ours (build_optimizer) is attached to DeepSpeed's
    partitions too. All checks run before DeepSpeed does any work. The same code runs inside
    `deepspeed.initialize` itself after `register()`.
    """
    call = dict(kwargs, model=model, config=config, optimizer=optimizer)
    return _initialize(_original(), call)


def _initialize(ds_init, call: dict):
    """Route one deepspeed.initialize call (its keyword arguments): build our optimizer when
    the config names one of our recipes, attach a client RoutedOptimizer to the partitions,
    refuse what cannot be exact, and pass every other call to `ds_init` untouched."""
    global _DEPTH
    config, args = _config_of(call)
    if _DEPTH or config is None:   # a nested call (another patch above ours), or no config
        return ds_init(**call)
    cfg = load_config(config)
    model, client = call.get("model"), call.get("optimizer")
    recipe = _recipe_of(cfg.get("optimizer"))
    if recipe is None and not isinstance(client, RoutedOptimizer):
        _refuse_swapped(client)
        return ds_init(**call)     # not ours: DeepSpeed's own business, untouched
    _check_supported(model, cfg, call.get("mpu"))
    _check_offload(cfg, named=recipe is not None)
    if recipe is not None:
        if client is not None:
            raise ValueError(
                f"optimizer.type={cfg['optimizer']['type']!r} names a sage_dist recipe and a "
                f"client optimizer ({type(client).__name__}) was passed too: give one of them "
                f"(drop the JSON's optimizer section to use the client optimizer, or pass no "
                f"optimizer to build {recipe!r} from the JSON)")
        params = _params(cfg.pop("optimizer"))
        if "merge" not in params:
            params["merge"] = merge_groups_for(model, cfg, recipe, params)
        client = build_optimizer(model, recipe, layout=PendingLayout(), **params)
    elif any(g.get("round_step", 0) for g in client.param_groups):
        raise ValueError("the sage_dist optimizer handed to deepspeed.initialize has already "
                         "stepped: its state cannot be carried into DeepSpeed's partitions; build "
                         "it fresh (and resume through engine.load_checkpoint)")
    names = {id(p): n for n, p in client.named_parameters()}  # before DeepSpeed swaps them
    rules = {id(p): group_rule(g, i) for g in client.param_groups
             for i, p in enumerate(g["params"])}
    cfg["zero_allow_untested_optimizer"] = True
    call.pop("config_params", None)
    call.update(optimizer=client, config=cfg)
    if args is not None:           # the config came from args.deepspeed_config: moved to config
        call["args"] = copy.copy(args)
        call["args"].deepspeed_config = None
    _DEPTH += 1
    try:
        engine, ds_opt, loader, sched = ds_init(**call)
    finally:
        _DEPTH -= 1
    if cfg.get("zero_optimization", {}).get("stage", 0) in (1, 2, 3):
        client.use_layout(zero.ZeroLayout.of(engine, names, rules))
    else:
        client.use_layout(make_layout(client.named_parameters()))
    return engine, ds_opt, loader, sched


# build_optimizer's keywords that are not hyperparameters of the recipe's rules
_BUILD_OPTIONS = ("lr", "overrides", "head", "nonfinite", "layout", "state_dtype",
                  "stochastic_rounding", "rounding_seed", "merge")


def merge_groups_for(model, cfg: dict, recipe: str, options: dict) -> bool:
    """Whether to build `recipe`'s optimizer for this DeepSpeed config with merged param
    groups (build_optimizer's `merge`): where the estimator finds that it leaves the most
    loaded rank with less device memory (sage_dist.memory.merge_pays), for the groups that
    `options` (build_optimizer's keywords) give. The data-parallel world size is
    torch.distributed's (sage_dist refuses tensor and pipeline parallelism under DeepSpeed),
    or WORLD_SIZE before it is initialised."""
    import torch.distributed as dist

    from .memory import merge_pays

    zcfg = cfg.get("zero_optimization", {}) or {}
    stage = zcfg.get("stage", 0)
    if stage not in (1, 2):   # (also "auto" and the like: nothing to weigh)
        return False
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else \
        int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return False
    off = (zcfg.get("offload_optimizer", {}) or {}).get("device") not in (None, "none")
    bf16 = (cfg.get("bf16") or cfg.get("bfloat16") or {}).get("enabled") in (True, "true")
    state_dtype = options.get("state_dtype", "float32")
    hyper = {k: v for k, v in options.items() if k not in _BUILD_OPTIONS}
    if options.get("lr") is not None:
        hyper["lr"] = options["lr"]
    return merge_pays(model, world, stage, recipe, bf16, off, head=options.get("head", "sage"),
                      overrides=options.get("overrides"), hyperparameters=hyper,
                      state_dtype=str(state_dtype).replace("torch.", ""))


def _config_of(call: dict):
    """The config of a deepspeed.initialize call: `config`, `config_params` or
    args.deepspeed_config (then also `args`, so that the rewritten config can replace it)."""
    for key in ("config", "config_params"):
        if call.get(key) is not None:
            return call[key], None
    args = call.get("args")
    path = getattr(args, "deepspeed_config", None)
    return (path, args) if path is not None else (None, None)


def _recipe_of(section) -> str | None:
    """Our recipe named by a config's optimizer section; None for no section and for DeepSpeed's
    or torch's own types; anything else is refused, naming what is allowed."""
    if section is None:
        return None
    type_name = section.get("type")
    recipe = our_recipe(type_name)
    if recipe is not None:
        return recipe
    import torch
    if str(type_name).lower() in deepspeed_builtin_types() or hasattr(torch.optim, str(type_name)):
        return None
    raise ValueError(
        f"optimizer.type={type_name!r} is not a known optimizer: allowed are sage_dist's "
        f"{', '.join(RECIPES)} (adamw and lion as sage_dist.adamw / sage_dist.lion), "
        f"DeepSpeed's {', '.join(deepspeed_builtin_types())}, or a torch.optim class name")


def _params(section: dict) -> dict:
    params = dict(section.get("params", {}))
    for key in ("betas", "adam_betas"):  # JSON has lists where torch has tuples
        if isinstance(params.get(key), list):
            params[key] = tuple(params[key])
    return params


FORCE_CPU_KEY = "zero_force_ds_cpu_optimizer"


def _check_offload(cfg: dict, named: bool) -> None:
    """ZeRO optimizer offload runs our optimizer on the CPU partitions, which needs
    zero_force_ds_cpu_optimizer=false. A config naming our recipe gets it unless it says
    otherwise; with a client optimizer the JSON must say so (DeepSpeed's and Accelerate's
    default, true, means "replace or refuse any client optimizer")."""
    off = cfg.get("zero_optimization", {}).get("offload_optimizer", {}) or {}
    if off.get("device") in (None, "none"):
        return
    if off.get("device") != "cpu":
        raise ValueError(
            f"zero_optimization.offload_optimizer.device={off['device']!r}: allowed with sage_dist "
            f"optimizers are 'cpu' and 'none' (DeepSpeed's NVMe swapper sizes every state "
            f"tensor as the flat partition, which our per-column state is not)")
    force = cfg.get(FORCE_CPU_KEY, None if named else True)
    if force in (None, False, "false"):
        cfg[FORCE_CPU_KEY] = False
        return
    raise ValueError(
        f"zero_optimization.offload_optimizer.device={off['device']!r} with {FORCE_CPU_KEY}="
        f"true{'' if FORCE_CPU_KEY in cfg else ' (the default)'}: DeepSpeed would refuse, and "
        f"Accelerate would silently replace, the sage_dist optimizer with DeepSpeedCPUAdam; set "
        f"\"{FORCE_CPU_KEY}\": false in the DeepSpeed JSON (the sage_dist optimizer then steps "
        f"the offloaded fp32 partitions on the CPU)")


def _refuse_swapped(optimizer) -> None:
    """Accelerate's map_pytorch_optim_to_deepspeed (ZeRO offload with zero_force_ds_cpu_optimizer
    true) hands DeepSpeed a DeepSpeedCPUAdam built on our optimizer's param groups (the same
    dicts, still carrying 'rule'): refuse rather than train with Adam."""
    groups = getattr(optimizer, "param_groups", None) or []
    if optimizer is not None and any(isinstance(g, dict) and ("rule" in g or "rules" in g)
                                     for g in groups):
        raise ValueError(
            f"deepspeed.initialize got a {type(optimizer).__name__} built on a sage_dist "
            f"optimizer's param groups: Accelerate replaces a client optimizer with DeepSpeed's "
            f"CPU Adam under ZeRO optimizer offload while {FORCE_CPU_KEY} is true (the "
            f"default); set \"{FORCE_CPU_KEY}\": false in the DeepSpeed JSON to keep the "
            f"sage_dist optimizer")


# -- register(): make deepspeed.initialize itself route our recipes ----------------------------
_DEPTH = 0
PATCH_MARK = "_sage_dist_original"
_WRAPPER = None   # the function register() installed (unregister() restores only that one)


def register() -> None:
    """Patch `deepspeed.initialize` (the module attribute) so that every caller — user code,
    the Hugging Face Trainer, Accelerate (which looks it up at call time) — gets what
    `sage_dist.deepspeed.initialize` does: our optimizer built and attached to the ZeRO
    partitions when the JSON's optimizer.type names one of our recipes, a client sage_dist
    optimizer attached to them, the same refusals; every other call passes through untouched.
    Idempotent; `unregister()` undoes it. Code that bound the function before the patch
    (`from deepspeed import initialize`) keeps the original."""
    import functools

    import deepspeed

    original = deepspeed.initialize
    if hasattr(original, PATCH_MARK):
        return

    @functools.wraps(original)
    def initialize(*args, **kwargs):
        import inspect
        try:
            sig = inspect.signature(inspect.unwrap(original))
            call = sig.bind_partial(*args, **kwargs).arguments
        except (TypeError, ValueError):
            return original(*args, **kwargs)   # DeepSpeed's own error for its own arguments
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
            if args:                           # a patch above DeepSpeed's with its own signature
                return original(*args, **kwargs)
            call = kwargs
        return _initialize(original, dict(call))

    global _WRAPPER
    setattr(initialize, PATCH_MARK, original)
    deepspeed.initialize = _WRAPPER = initialize


def unregister() -> bool:
    """Restore the `deepspeed.initialize` that register() replaced. False if it was not
    patched (or was patched again by someone else after us, which is then left alone)."""
    import deepspeed

    if _WRAPPER is None or deepspeed.initialize is not _WRAPPER:
        return False
    deepspeed.initialize = getattr(_WRAPPER, PATCH_MARK)
    return True


def registered() -> bool:
    import deepspeed
    return hasattr(deepspeed.initialize, PATCH_MARK)


def _original():
    """deepspeed.initialize as DeepSpeed defines it (ours calls it, never the patch)."""
    import deepspeed
    return getattr(deepspeed.initialize, PATCH_MARK, deepspeed.initialize)
