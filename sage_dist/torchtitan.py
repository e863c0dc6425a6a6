"""torchtitan face: our recipes behind torchtitan's optimizer container.

In a torchtitan trainer config (torchtitan's `Configurable` Config route):

    from sage_dist.torchtitan import SageOptimizersContainer
    optimizer = SageOptimizersContainer.Config(recipe="sage-hybrid", lr=3e-4)

The trainer's `config.optimizer.build(model_parts=...)` then builds one of our optimizers per
model part (pipeline stages are separate parts), each routed by the recipe over the part's
own modules (embeddings, dense matrices, head, vectors), after torchtitan has applied TP and
FSDP2: the DTensor layout reads the placements. What torchtitan's container relies on:

- `param_names` on every param group, the canonical FQNs its FQN-keyed checkpoint uses
  (activation checkpointing's `_checkpoint_wrapped_module` segments stripped, as its
  `canonical_fqn` does, and torch.compile's `_orig_mod`);
- its `init_optim_state` (a zero-gradient, lr-0 step before saving or loading) returns at
  once: our state exists from construction, so the step never runs and nothing changes;
- `step`, `zero_grad`, `state_dict`, `load_state_dict` and the per-optimizer LR schedulers
  are the container's own, iterating over `optimizers`.

`build_part_optimizers` is the torchtitan-free core; `SageOptimizersContainer` exists when
torchtitan is importable (tests/test_torchtitan.py runs both). The container's
`implementation` setting (fused / foreach, for torch's Adam) does not apply to our optimizers
and is ignored.
"""
from __future__ import annotations

from torch import nn

WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_orig_mod")


def canonical_name(name: str) -> str:
    """A parameter name without the segments that wrappers insert."""
    return ".".join(s for s in name.split(".") if s not in WRAPPER_SEGMENTS)


def build_part_optimizers(model_parts: list[nn.Module], recipe: str = "sage-hybrid",
                          **kwargs) -> list:
    """One sage_dist optimizer per model part, its groups' param_names canonical."""
    from . import build_optimizer

    if not model_parts:
        raise ValueError("model_parts=[]: allowed is a list of at least one nn.Module")
    opts = []
    for part in model_parts:
        opt = build_optimizer(part, recipe, **kwargs)
        for g in opt.param_groups:
            g["param_names"] = [canonical_name(n) for n in g["param_names"]]
        opts.append(opt)
    return opts


def _container_class():
    from dataclasses import dataclass

    from torchtitan.components.optimizer import OptimizersContainer

    class SageOptimizersContainer(OptimizersContainer):
        """torchtitan's OptimizersContainer holding sage_dist optimizers (one per part)."""

        @dataclass(kw_only=True, slots=True)
        class Config(OptimizersContainer.Config):
            recipe: str = "sage-hybrid"
            lr: float | None = None
            weight_decay: float | None = None
            head: str = "sage"
            overrides: dict | None = None

        def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
            if config.param_groups:
                raise ValueError("param_groups is set: a sage_dist recipe routes every "
                                 "parameter itself; use overrides= for exceptions")
            kw = {k: getattr(config, k) for k in ("lr", "weight_decay", "overrides")
                  if getattr(config, k) is not None}
            self.model_parts = model_parts
            self.optimizers = build_part_optimizers(model_parts, config.recipe,
                                                    head=config.head, **kw)
            params = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]
            self._validate_params(params)
            self._post_init(params)

    return SageOptimizersContainer


def __getattr__(name):
    if name == "SageOptimizersContainer":
        try:
            cls = _container_class()
        except ImportError as e:
            raise ImportError(f"SageOptimizersContainer needs torchtitan ({e}); "
                              f"build_part_optimizers works without it") from None
        globals()[name] = cls
        return cls
    raise AttributeError(name)
