"""Shipped configs and the Llama models built from them: the one loader the CLI, the memory
estimator, the benchmark and the trainer share.

The configs ship inside the package (`sage_dist/configs/{models,deepspeed,train}`; a source
checkout also links them as `configs/`), so they are found from any directory, installed or
not. `find_config` takes a path (absolute or relative to the working directory), a path as the
docs write it (`configs/models/llama_60m.json`), or a bare name (`llama_60m`, `tiny_single`,
`zero2`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
KINDS = {"models": (".json",), "deepspeed": (".json",), "train": (".yaml", ".yml")}


def find_config(name_or_path, kind: str) -> Path:
    """The config file meant by `name_or_path`: an existing path, else the shipped one of
    that name or relative path. Raises FileNotFoundError listing what ships."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is invalid: allowed are {', '.join(KINDS)}")
    p = Path(os.fspath(name_or_path)).expanduser()
    if p.is_file():
        return p
    rel = p.parts[1:] if p.parts[:1] == ("configs",) else p.parts
    candidates = [CONFIG_DIR.joinpath(*rel)] if rel else []
    if len(p.parts) == 1:
        candidates += [CONFIG_DIR / kind / (p.name + ext) for ext in ("",) + KINDS[kind]]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"{os.fspath(name_or_path)!r}: no such file, and no shipped {kind} "
                            f"config of that name (shipped: {', '.join(shipped(kind))})")


def shipped(kind: str) -> list[str]:
    """Names of the configs of this kind that ship with the package."""
    return sorted(f.stem for f in (CONFIG_DIR / kind).iterdir() if f.suffix in KINDS[kind])


def config_name(model) -> str:
    """A short name for a model given as a path, a name, a dict or a config object."""
    if isinstance(model, (str, os.PathLike)):
        return Path(os.fspath(model)).stem
    return getattr(model, "name_or_path", None) or type(model).__name__


def load_llama_config(model):
    """A transformers LlamaConfig from a path or shipped name, a dict, or a config object.
    A file that is not JSON or not a Llama config raises ValueError naming it."""
    from transformers import LlamaConfig

    if isinstance(model, dict):
        return LlamaConfig(**model)
    if not isinstance(model, (str, os.PathLike)):
        return model
    path = find_config(model, "models")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"model={os.fspath(model)!r}: {path} is not valid JSON ({e})") from None
    if data.get("model_type") != "llama":
        raise ValueError(f"model={os.fspath(model)!r}: {path} has model_type="
                         f"{data.get('model_type')!r}; allowed: 'llama'")
    return LlamaConfig.from_dict(data)


def meta_model(model) -> torch.nn.Module:
    """The causal LM of a config with its shapes on the meta device (no memory); a module is
    returned as it is."""
    if isinstance(model, torch.nn.Module):
        return model
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(load_llama_config(model))


def build_model(model, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised Llama on the CPU, the same on every rank for one seed."""
    from transformers import LlamaForCausalLM

    cfg = load_llama_config(model)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)
