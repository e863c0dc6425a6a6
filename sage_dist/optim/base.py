"""The optimizer engine: param groups carry a rule; rules run on fragments, phase by phase.

A rule's `run` is a generator. Each `yield` hands the engine a list of partial statistics
`(kind, tensor)` with kind 'row' (length R), 'col' (length C) or 'scalar'; the engine sums
them across ranks (one all-reduce for all parameters of the phase) and sends back the complete
sums. A rule changes parameters and state only after its FIRST yield has been answered, so the
engine can skip (or refuse) a parameter whose gradient is not finite before anything moves.
(One exception, optim/batch.py: with nonfinite='skip' and no replicas to agree with, a whole
matrix is updated in the first phase's flush exactly when its own gradient is finite, which is
what the engine decides then.)
Rules see fp32 flat tensors; the engine upcasts low-precision storage and writes it back.
Element-wise updates go to `out` (an optim.batch.UpdateBatch), which the engine runs as
multi-tensor calls at the end of the phase.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..shard.fragment import Fragment

Stats = list[tuple[str, torch.Tensor]]

NONFINITE_MODES = ("skip", "raise")


def _describe_allowed(allowed) -> str:
    return allowed if isinstance(allowed, str) else ", ".join(map(repr, allowed))


def check_lr(name, v):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name}={v!r} is invalid: allowed is a finite number >= 0")


def check_unit(name, v):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v < 1.0:
        raise ValueError(f"{name}={v!r} is invalid: allowed is a number in [0, 1)")


def check_betas(name, v):
    if not isinstance(v, (tuple, list)) or len(v) != 2:
        raise ValueError(f"{name}={v!r} is invalid: allowed is a pair (beta1, beta2), each in [0, 1)")
    for i, b in enumerate(v):
        check_unit(f"{name}[{i}]", b)


def check_positive(name, v):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name}={v!r} is invalid: allowed is a finite number > 0")


def check_nonneg(name, v):
    check_lr(name, v)


def check_iters(name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}={v!r} is invalid: allowed is an integer >= 1")


def check_bool(name, v):
    if not isinstance(v, bool):
        raise ValueError(f"{name}={v!r} is invalid: allowed is True or False")


@dataclass
class StateSpec:
    """What state a rule keeps for a parameter of a given global shape."""

    elementwise: tuple[str, ...] = ()      # fp32 tensors shaped like the parameter
    replicated: dict[str, int] = field(default_factory=dict)  # name -> length (same on every rank)
    step: bool = False                     # a per-parameter step count

    def floats(self, numel: int) -> tuple[int, int]:
        return len(self.elementwise) * numel, sum(self.replicated.values())


class Rule:
    """One update rule. Subclasses set `name`, `defaults`, `checks` and implement `run`."""

    name: str = ""
    defaults: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    matrix_only = False  # True for rules that need the 2-D structure

    def state_spec(self, shape: tuple[int, ...], R: int, C: int) -> StateSpec:
        return StateSpec()

    def validate(self, group: dict, where: str) -> None:
        for key, check in self.checks.items():
            check(f"{where}{key}", group[key])

    def run(self, f: Fragment, p: torch.Tensor, g: torch.Tensor, st: dict, group: dict,
            out) -> Iterator[Stats]:
        raise NotImplementedError

    @staticmethod
    def next_step(st: dict) -> int:
        """The step count this update will have (committed by `commit_step`)."""
        return int(st["step"].item()) + 1

    @staticmethod
    def commit_step(st: dict) -> None:
        st["step"].add_(1)
