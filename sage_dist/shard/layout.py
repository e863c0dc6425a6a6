"""Layouts: how this rank holds an optimizer's parameters, behind one small protocol.

An optimizer "entry" is what sits in param_groups: a parameter (one process, DDP, FSDP2) or a
flat partition holding pieces of many parameters (DeepSpeed ZeRO). A layout lists the entries
that hold state, yields each entry's fragments, creates its state and hands each fragment (a
"member" of its entry) views of that state. The optimizer calls only these methods, never an
engine's; each engine's internals are read in its own layout module (dtensor.py, zero.py).

    entries(param_groups)               [(entry, group)] that hold state
    attach(optimizer)                   the optimizer switched to this layout (a hook)
    fragments(entry, name)              [Fragment] of the entry held here
    member_rules(entry, group, index)   the rule name of each member (one per fragment slot)
    new_state(entry, rules, dtype)      the entry's state (elementwise state placed like it)
    member_state(entry, slot, state, rules)  views of one member's part of the state
    elementwise_keys(entry, rules)      which state keys hold one value per element held
    state_owners(entry, rules)          {key: {rule name: floats}}: whose state each key is
    local_flat(t)                       the flat local view of an elementwise state tensor
    reducer                             the statistics all-reduce (shard/stats.py)

`rules` is one Rule per member (a single Rule stands for all of them). A param group names
one 'rule' for all its parameters, or, with 'rules', one per parameter (a mixed group:
recipes.merge_groups, for engines that partition each group on its own).
"""
from __future__ import annotations

import torch

from ..ops.span import Span
from .fragment import Fragment, global_shape, matrix_shape
from .stats import StatsReducer


def state_sizes(specs, elem_numel: int) -> tuple[set, dict]:
    """The state of one entry holding members with these StateSpecs: the elementwise keys (each
    a tensor of `elem_numel` values) and the replicated {key: floats} summed over members.
    Shared by every layout and the memory estimator."""
    elem = set().union(*(s.elementwise for s in specs)) if specs else set()
    rep: dict[str, int] = {}
    for s in specs:
        for key, n in s.replicated.items():
            rep[key] = rep.get(key, 0) + n
    return elem, rep


def as_rules(rules, n: int) -> list:
    """One rule per member: a list as given, or one Rule repeated."""
    return list(rules) if isinstance(rules, (list, tuple)) else [rules] * n


def group_rule(group: dict, index: int) -> str:
    """The rule name of parameter `index` of a param group (uniform or mixed)."""
    rules = group.get("rules")
    return group["rule"] if rules is None else rules[index]


class Layout:
    """One fragment per entry (a parameter); state keyed by it, elementwise state like it."""

    name = "base"
    reducer: StatsReducer

    def entries(self, param_groups) -> list[tuple[torch.Tensor, dict]]:
        return [(p, g) for g in param_groups for p in g["params"]]

    def attach(self, optimizer) -> None:
        pass

    def fragments(self, entry: torch.Tensor, name: str) -> list[Fragment]:
        raise NotImplementedError

    def new_elementwise(self, p: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Zero state (fp32 unless asked) holding one value per element of `p`, placed like `p`."""
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)

    def local_flat(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(-1)

    def member_rules(self, entry, group: dict, index: int | None = None) -> list[str]:
        """The entry is one parameter: its rule, found by position in a mixed group."""
        if group.get("rules") is None:
            return [group["rule"]]
        if index is None:
            index = next(i for i, p in enumerate(group["params"]) if p is entry)
        return [group["rules"][index]]

    def _spec(self, entry, rule):
        # Asked for every fragment on every step: kept per (entry, rule) object, both held
        # (so an id is never another object's), as a global shape does not change.
        rule = as_rules(rule, 1)[0]
        specs = self.__dict__.setdefault("_specs", {})
        hit = specs.get((id(entry), id(rule)))
        if hit is None:
            shape = global_shape(entry)
            hit = specs[(id(entry), id(rule))] = (entry, rule,
                                                 rule.state_spec(shape, *matrix_shape(shape)))
        return hit[2]

    def new_state(self, entry: torch.Tensor, rule, dtype=torch.float32) -> dict:
        spec = self._spec(entry, rule)
        st = {}
        if spec.step:
            st["step"] = torch.zeros((), dtype=torch.float32)
        for key in spec.elementwise:
            st[key] = self.new_elementwise(entry, dtype)
        for key, n in spec.replicated.items():
            st[key] = torch.zeros(n, dtype=torch.float32, device=entry.device)
        return st

    def member_state(self, entry, slot: int, state: dict, rule) -> dict:
        elementwise = self._spec(entry, rule).elementwise
        return {k: self.local_flat(v) if k in elementwise else v for k, v in state.items()}

    def elementwise_keys(self, entry: torch.Tensor, rule) -> set[str]:
        return set(self._spec(entry, rule).elementwise)

    def state_owners(self, entry, rule) -> dict:
        """One member: every key is its rule's (None: no split to report)."""
        return None


class LocalLayout(Layout):
    """Each fragment is a whole parameter held by this process (one process, DDP)."""

    name = "local"

    def __init__(self):
        self.reducer = StatsReducer(None)

    def fragments(self, p: torch.Tensor, name: str) -> list[Fragment]:
        geometry = self.__dict__.setdefault("_geometry", {})  # (p, shape, span), as _spec
        hit = geometry.get(id(p))
        if hit is None:
            shape = global_shape(p)
            R, C = matrix_shape(shape)
            hit = geometry[id(p)] = (p, shape, Span(R, C, 0, R * C))
        _, shape, span = hit
        grad = p.grad
        if grad is not None and not grad.is_sparse:
            grad = grad.reshape(-1)
        return [Fragment(name=name, param=p, shape=shape, span=span,
                         data=p.detach().reshape(-1), grad=grad, whole=True, rows_local=True)]


class PendingLayout(Layout):
    """For an optimizer built before its engine partitions the parameters (DeepSpeed ZeRO): it
    holds no state and refuses to step until the engine's layout is installed with
    `optimizer.use_layout(...)`."""

    name = "pending"

    def __init__(self):
        self.reducer = StatsReducer(None)

    def entries(self, param_groups):
        return []

    def fragments(self, entry, name):
        raise RuntimeError(f"{name}: the optimizer is waiting for its engine's partitions; "
                           f"build it through sage_dist.deepspeed.initialize (or call "
                           f"optimizer.use_layout(...)) before stepping")


def make_layout(named_params: list[tuple[str, torch.Tensor]]) -> Layout:
    """The layout for these parameters: DTensor (FSDP2/HSDP) if any is a DTensor, else local."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for _, p in named_params):
        from .dtensor import DTensorLayout
        return DTensorLayout(named_params)
    return LocalLayout()
