"""What a param group is: one rule for all its parameters ('rule'), or one per parameter
('rules', a mixed group), with the hyperparameters of every rule it names; and how groups
merge into fewer without changing any parameter's update."""
from __future__ import annotations

import torch

from ..shard.fragment import global_shape, matrix_shape
from ..shard.layout import group_rule
from .registry import get_rule


def check_group(group: dict, defaults: dict, where: str) -> dict:
    """Normalise a group in place (params as a list, missing hyperparameters from `defaults`
    and the rules' defaults) and refuse what is wrong, naming it. Returns {rule name: Rule}."""
    params = group["params"]
    group["params"] = params = [params] if torch.is_tensor(params) else list(params)
    if group.get("rules") is not None:
        names = group["rules"]
        if "rule" in group or not isinstance(names, (list, tuple)) or len(names) != len(params):
            raise ValueError(f"{where}rules={names!r} is invalid: allowed is a list of rule "
                             f"names, one per parameter ({len(params)}), and no 'rule' key")
        group["rules"] = names = list(names)
    else:
        group.pop("rules", None)
        names = [group.get("rule", defaults.get("rule"))]
    rules = {}
    for i, name in enumerate(names):
        label = f"{where}rules[{i}]" if "rules" in group else f"{where}rule"
        rules.setdefault(name, get_rule(name, label))
    for key, value in defaults.items():
        if not (key == "rule" and "rules" in group):
            group.setdefault(key, value)
    for key in sorted(set().union(*(r.defaults for r in rules.values())) - set(group)):
        values = {repr(r.defaults[key]): r.name for r in rules.values() if key in r.defaults}
        if len(values) > 1:   # a mixed group shares its hyperparameters: no silent pick
            raise ValueError(f"{where}{key} is missing and the group's rules default to "
                             f"different values ({', '.join(f'{n}: {v}' for v, n in values.items())})"
                             f": give {key} in the group")
    for rule in rules.values():
        for key, value in rule.defaults.items():
            group.setdefault(key, value)
    if "rules" not in group:
        group["rule"] = names[0]
    group.setdefault("round_step", 0)  # steps taken, for stochastic rounding's seeds
    hyper = set().union(*(r.defaults for r in rules.values()))
    allowed = hyper | {"rule", "rules", "params", "param_names", "name", "peak_lr",
                       "initial_lr", "round_step"} | set(defaults)
    unknown = sorted(set(group) - allowed)
    if unknown:
        raise ValueError(f"{where}{unknown[0]} is not a hyperparameter of rule "
                         f"{', '.join(map(repr, rules))}: allowed are {', '.join(sorted(hyper))}")
    for rule in rules.values():
        rule.validate(group, where)
    return rules


# Group keys that say what a group is rather than how its rule steps.
_IDENTITY_KEYS = ("params", "param_names", "name", "rule", "rules")


def _group_rules(group: dict) -> list[str]:
    return [group_rule(group, i) for i in range(len(group["params"]))]


def _can_join(a: dict, b: dict) -> bool:
    """Whether two groups can be one mixed group with nothing changing for any parameter:
    every hyperparameter both have is equal, and no state key is kept per element for some
    of their parameters and per row or column for others."""
    if any(a[k] != b[k] for k in set(a) & set(b) if k not in _IDENTITY_KEYS):
        return False
    elem, rep = set(), set()
    for g in (a, b):
        for name, p in zip(_group_rules(g), g["params"]):
            shape = global_shape(p)
            spec = get_rule(name).state_spec(shape, *matrix_shape(shape))
            elem |= set(spec.elementwise)
            rep |= set(spec.replicated)
    return not elem & rep


def merge_groups(groups: list[dict]) -> list[dict]:
    """Fewer param groups, each parameter keeping its rule and hyperparameters: a group joins
    the first earlier one it can (same values for every shared hyperparameter; compatible
    state), as a mixed group with one rule per parameter ('rules').

    Why: DeepSpeed ZeRO-1/2 partitions each group's flat on its own and keeps, on every rank,
    the whole gradient of each parameter its partition touches; a group holding only the
    embedding puts that whole gradient on every rank. In fewer groups a large parameter
    touches only the few partitions it spans (docs/MEMORY.md)."""
    out: list[dict] = []
    for g in groups:
        into = next((m for m in out if _can_join(m, g)), None)
        if into is None:
            out.append(dict(g, params=list(g["params"]),
                            param_names=list(g.get("param_names") or [])))
            continue
        rules = _group_rules(into) + _group_rules(g)
        into.pop("rule", None)
        into.update({k: v for k, v in g.items() if k not in _IDENTITY_KEYS})
        into["rules"] = rules
        named = len(into["param_names"]) == len(into["params"]) and \
            len(g.get("param_names") or []) == len(g["params"])
        into["params"] += g["params"]
        into["param_names"] = into["param_names"] + list(g["param_names"]) if named else []
        into["name"] = f"{into.get('name', 'group')}+{g.get('name', 'group')}"
    for m in out:
        if not m["param_names"]:      # a group without names: the optimizer makes them up
            m.pop("param_names")
        if m.get("rules") is not None and len(set(m["rules"])) == 1:  # one rule after all
            m["rule"] = m.pop("rules")[0]
    return out
