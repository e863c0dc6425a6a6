"""Every rule by name: the one table routing, validation and describe() read."""
from __future__ import annotations

from .adamw import AdamWRule
from .base import Rule
from .lion import LionRule
from .sage import SAGERule
from .scale import ScaleAdamWRule, ScaleHeadRule, ScaleNormRule
from .sinkhorn import SinkGDRule, SinkhornRule

RULES: dict[str, Rule] = {r.name: r for r in (
    SAGERule(), SinkhornRule(), SinkGDRule(), ScaleNormRule("scale_dense", axis=1),
    ScaleNormRule("scale_embedding", axis=0),
    ScaleHeadRule(), ScaleAdamWRule(), LionRule(), AdamWRule())}


def get_rule(name, where: str = "rule") -> Rule:
    if name not in RULES:
        raise ValueError(f"{where}={name!r} is not a known rule: allowed are {', '.join(RULES)}")
    return RULES[name]
