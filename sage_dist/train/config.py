"""The training configuration: one typed dataclass, read from YAML, then `--key value` overrides.

    python -m sage_dist.train --config configs/train/tiny_zero2.yaml --steps 50 --lr 1e-3
    python -m sage_dist.train --steps 50     # no --config: the shipped tiny_single

`--config`, `model:` and `deepspeed_config:` take a path or a shipped config's name or docs
path (`sage_dist.models.find_config`: `tiny_zero2`, `configs/models/llama_tiny.json`), so they
work from any directory, installed or not; data, tokenizer and resume paths are relative to
the working directory.

Every key is validated before any work is done (and before any process group exists): an
unknown key, a value of the wrong type or out of range fails with `ConfigError` naming the key,
the value and what is allowed. Checks that need the world size (the global batch must split
evenly into micro-batches) take it from the launcher's WORLD_SIZE.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CONFIG = "tiny_single"  # what `python -m sage_dist.train` runs without --config
ENGINES = ("deepspeed", "fsdp2", "ddp", "single")


class ConfigError(ValueError):
    """A bad configuration value; the entry point prints it and exits with status 2."""


@dataclass
class TrainConfig:
    # model and optimizer
    model: str = "configs/models/llama_tiny.json"  # a Hugging Face LlamaConfig JSON
    recipe: str = "sage-hybrid"  # sage_dist.build_optimizer recipe (or variant), or a
    #                              package baseline of sage_dist.baselines (single, ddp)
    lr: float | None = None  # peak learning rate; None: the recipe's default (baselines: 1e-3)
    weight_decay: float | None = None  # None: the recipe's default
    engine: str = "single"  # deepspeed | fsdp2 | ddp | single
    tp: int = 1  # tensor-parallel degree (engine=fsdp2): a (world / tp, tp) mesh, FSDP2 x TP
    deepspeed_config: str | None = None  # DeepSpeed JSON (engine=deepspeed), naming our recipe
    bf16: bool = False  # bf16 mixed precision (fp32 master weights and optimizer state)
    state_dtype: str = "float32"  # the optimizer's elementwise state: float32 | bfloat16
    stochastic_rounding: bool = False  # round bf16 writes (state, bf16 params) stochastically
    seed: int = 0
    # data
    data: str = "embedded"  # "embedded" (stdlib docstrings), a text/JSONL file or directory,
    #                          or a Hugging Face dataset saved with save_to_disk
    text_key: str = "text"  # the field holding the text in JSONL / HF datasets
    tokenizer: str | None = None  # a Hugging Face tokenizer directory; None: train a BPE
    vocab_size: int | None = None  # BPE vocabulary to train; None: the model's vocab_size
    seq_len: int = 128
    global_batch: int = 16  # sequences per optimizer step, over all ranks and micro-steps
    grad_accum: int = 1  # micro-steps per optimizer step
    # schedule
    steps: int = 400
    warmup_steps: int | None = None  # None: 10 % of steps
    min_lr_ratio: float = 0.1  # cosine ends at this fraction of the peak
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # evaluation, logging, checkpoints
    eval_every: int = 50
    eval_batches: int = 4  # validation batches of global_batch sequences each
    log_every: int = 10
    out_dir: str = "runs/tiny"
    checkpoint_every: int = 0  # save every N steps; 0: never
    keep_checkpoints: int = 2
    resume: str = "none"  # none | auto | a checkpoint directory
    progress: bool = True  # tqdm progress bar on rank 0
    plot: bool = True  # loss curves PNG at the end
    threads: int | None = None  # torch intra-op threads per rank
    device: str = "auto"  # auto | cpu | cuda
    # faults
    nonfinite: str = "skip"  # a NaN/Inf gradient: skip (the parameters, or DeepSpeed's whole
    #                          step, on every rank) | raise (FloatingPointError on every rank)
    dist_timeout_s: float | None = None  # process-group timeout; None: 300 s (gloo), torch's
    #                                      default for nccl

    # -- derived ---------------------------------------------------------------------------
    def micro_batch(self, world: int) -> int:
        return self.global_batch // (self.data_parallel(0, world)[1] * self.grad_accum)

    def data_parallel(self, rank: int, world: int) -> tuple[int, int]:
        """(this rank's data-parallel index, the data-parallel degree). The (dp, tp) mesh is
        row-major over ranks, so the tp ranks of one group read the same micro-batch."""
        return rank // self.tp, world // self.tp

    def resolve(self, path: str | None) -> Path | None:
        """A data / tokenizer path: relative paths resolve against the working directory."""
        return None if path is None else Path(path).expanduser()


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The learning-rate schedule, a fraction of the peak at 0-based `step`: linear warmup to 1
    over warmup_steps (default 10 % of steps), then a cosine reaching min_lr_ratio at `steps`."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.1 * cfg.steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _allowed_keys() -> str:
    return ", ".join(FIELDS)


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}{hint}; allowed keys: "
                       f"{_allowed_keys()}")


def _coerce(key: str, value, where: str):
    """Convert a YAML value or a command-line string to the field's type."""
    tp = typing.get_type_hints(TrainConfig)[key]
    args = typing.get_args(tp)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if args else tp
    if isinstance(value, str) and optional and value.lower() in ("none", "null", ""):
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}=None in {where}: a {base.__name__} is required")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{key}={value!r} in {where}: expected {base.__name__}"
                      f"{' or none' if optional else ''}")


def find(key: str, value: str, kind: str) -> Path:
    """The config file `value` names (a path or a shipped name); ConfigError naming the key."""
    from sage_dist.models import find_config, shipped

    try:
        return find_config(value, kind)
    except (FileNotFoundError, ValueError):
        raise ConfigError(f"{key}={value!r}: file not found (allowed: a path, or a shipped "
                          f"{kind} config: {', '.join(shipped(kind))})") from None


def load_yaml(path: str) -> dict:
    import yaml

    p = find("--config", path, "train")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of keys to values")
    return data


def parse_overrides(argv: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """`--config PATH` and `--key value` / `--key=value` pairs (dashes and underscores alike)."""
    config, pairs, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: use --key value (allowed keys: "
                              f"{_allowed_keys()})")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key}: missing value")
            value, i = argv[i + 1], i + 1
        i += 1
        if key == "config":
            config = value
        elif key == "local_rank":  # launchers that pass it; LOCAL_RANK is read from the env
            continue
        else:
            pairs.append((key, value))
    return config, pairs


def load_config(argv: list[str]) -> TrainConfig:
    """The YAML of --config (default: tiny_single), then the overrides, coerced and validated
    (the checks that need no world size)."""
    config_path, pairs = parse_overrides(argv)
    config_path = DEFAULT_CONFIG if config_path is None else config_path
    values = {}
    for key, value in load_yaml(config_path).items():
        if key not in FIELDS:
            raise _unknown(str(key), config_path)
        values[key] = _coerce(key, value, config_path)
    for key, value in pairs:
        if key not in FIELDS:
            raise _unknown(key, "the command line")
        values[key] = _coerce(key, value, "the command line")
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def _need(cond: bool, key: str, value, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r}: {allowed}")


def validate(cfg: TrainConfig) -> None:
    for key in ("steps", "global_batch", "grad_accum", "eval_every", "eval_batches", "log_every",
                "keep_checkpoints"):
        _need(getattr(cfg, key) >= 1, key, getattr(cfg, key), "must be >= 1")
    _need(cfg.checkpoint_every >= 0, "checkpoint_every", cfg.checkpoint_every,
          "must be >= 0 (0: no checkpoints)")
    _need(cfg.seq_len >= 2, "seq_len", cfg.seq_len, "must be >= 2")
    _need(cfg.engine in ENGINES, "engine", cfg.engine, f"allowed: {', '.join(ENGINES)}")
    _need(cfg.device in ("auto", "cpu", "cuda"), "device", cfg.device, "allowed: auto, cpu, cuda")
    _need(cfg.state_dtype in ("float32", "bfloat16"), "state_dtype", cfg.state_dtype,
          "allowed: float32, bfloat16")
    _need(cfg.nonfinite in ("skip", "raise"), "nonfinite", cfg.nonfinite,
          "allowed: skip, raise")
    from sage_dist.baselines import BASELINES, check_baseline
    from sage_dist.optim.recipes import get_recipe
    try:
        if cfg.recipe in BASELINES:
            check_baseline(cfg.recipe, cfg.engine)
        else:
            get_recipe(cfg.recipe)
    except ValueError as e:  # names recipe=VALUE and what is allowed
        msg = str(e) if cfg.recipe in BASELINES else f"{e}; or a package baseline: " \
            f"{', '.join(BASELINES)}"
        raise ConfigError(msg) from None
    if cfg.recipe in BASELINES:   # the package keeps its own fp32 state, and sees NaNs
        for key, plain in (("state_dtype", "float32"), ("stochastic_rounding", False),
                           ("nonfinite", "skip")):
            _need(getattr(cfg, key) == plain, key, getattr(cfg, key),
                  f"recipe={cfg.recipe!r} is a package baseline, which has no such option; "
                  f"allowed: {plain}")
    if cfg.lr is not None:
        _need(math.isfinite(cfg.lr) and cfg.lr > 0, "lr", cfg.lr, "must be a positive number")
    if cfg.weight_decay is not None:
        _need(math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0, "weight_decay",
              cfg.weight_decay, "must be >= 0")
    if cfg.warmup_steps is not None:
        _need(0 <= cfg.warmup_steps <= cfg.steps, "warmup_steps", cfg.warmup_steps,
              f"must be in [0, steps={cfg.steps}]")
    _need(0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio", cfg.min_lr_ratio, "must be in [0, 1]")
    _need(cfg.grad_clip >= 0, "grad_clip", cfg.grad_clip, "must be >= 0 (0: no clipping)")
    if cfg.threads is not None:
        _need(cfg.threads >= 1, "threads", cfg.threads, "must be >= 1")
    if cfg.dist_timeout_s is not None:
        _need(math.isfinite(cfg.dist_timeout_s) and cfg.dist_timeout_s > 0, "dist_timeout_s",
              cfg.dist_timeout_s, "must be a positive number of seconds (none: the default)")
    if cfg.vocab_size is not None:
        _need(cfg.vocab_size >= 258, "vocab_size", cfg.vocab_size,
              "must be >= 258 (byte-level BPE: 256 bytes + 2 special tokens)")
    _need(cfg.tp >= 1, "tp", cfg.tp, "must be >= 1")
    _need(cfg.tp == 1 or cfg.engine == "fsdp2", "tp", cfg.tp,
          f"tensor parallelism needs engine=fsdp2 (engine is {cfg.engine!r}); allowed: 1")
    if cfg.engine == "deepspeed":
        _need(cfg.deepspeed_config is not None, "deepspeed_config", None,
              "engine=deepspeed needs a DeepSpeed JSON (e.g. configs/deepspeed/zero2.json)")
    if cfg.resume not in ("none", "auto"):
        _need(Path(cfg.resume).is_dir(), "resume", cfg.resume,
              "allowed: none, auto, or an existing checkpoint directory")
    find("model", cfg.model, "models")
    if cfg.data != "embedded":
        _need(cfg.resolve(cfg.data).exists(), "data", cfg.data,
              "path not found (allowed: 'embedded', a .txt/.jsonl file or directory of them, "
              "or a Hugging Face dataset saved on disk)")
    if cfg.tokenizer is not None:
        _need(cfg.resolve(cfg.tokenizer).is_dir(), "tokenizer", cfg.tokenizer,
              "directory not found (a Hugging Face tokenizer directory)")
    if cfg.deepspeed_config is not None:
        find("deepspeed_config", cfg.deepspeed_config, "deepspeed")


def world_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate_world(cfg: TrainConfig, world: int) -> None:
    """The checks that need the world size; run before any process group is created."""
    if cfg.engine == "single" and world != 1:
        raise ConfigError(f"engine='single' with WORLD_SIZE={world}: allowed is 1 process; "
                          f"use ddp, fsdp2 or deepspeed to train on {world}")
    if world % cfg.tp:
        raise ConfigError(f"tp={cfg.tp} does not divide WORLD_SIZE={world}: the mesh is "
                          f"(world / tp, tp); allowed are divisors of {world}")
    dp = cfg.data_parallel(0, world)[1]
    per_step = dp * cfg.grad_accum
    if cfg.global_batch % per_step:
        what = f"world size {world}" if cfg.tp == 1 else f"data-parallel degree {dp}"
        raise ConfigError(
            f"global_batch={cfg.global_batch} is not divisible by {what} x "
            f"grad_accum {cfg.grad_accum} = {per_step}: every rank needs the same micro-batch; "
            f"allowed are multiples of {per_step}")


def model_config(cfg: TrainConfig):
    """The LlamaConfig of `model` (sage_dist.models.load_llama_config), checked against the
    training config."""
    from sage_dist.models import load_llama_config

    find("model", cfg.model, "models")  # a missing file: ConfigError naming model=
    try:
        mc = load_llama_config(cfg.model)
    except ValueError as e:  # not JSON, or not a Llama config: the message names model=VALUE
        raise ConfigError(str(e)) from None
    from sage_dist.fsdp import check_tp_heads
    try:
        check_tp_heads(mc, cfg.tp)
    except ValueError as e:
        raise ConfigError(f"{e} ({cfg.model})") from None
    if cfg.seq_len > mc.max_position_embeddings:
        raise ConfigError(f"seq_len={cfg.seq_len}: must be <= the model's "
                          f"max_position_embeddings {mc.max_position_embeddings}")
    if cfg.vocab_size is not None and cfg.vocab_size > mc.vocab_size:
        raise ConfigError(f"vocab_size={cfg.vocab_size}: the tokenizer vocabulary is larger "
                          f"than the model's vocab_size {mc.vocab_size} ({cfg.model})")
    return mc


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
