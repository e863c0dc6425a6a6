"""Optimizer state of one flat partition that holds pieces of many members (DeepSpeed ZeRO).

Each member has a held range [a, b) of its own flat index at `offset` in the flat, and a
StateSpec from its rule. An elementwise key every member keeps is a flat-shaped tensor (the
member's values at its offset); a key only some members keep (a mixed group:
optim/groups.merge_groups) holds their held ranges back to back, so members whose rule keeps
nothing cost nothing. Replicated pieces (SAGE's per-column S) and step counts are packed over
the members that keep them, in member order.
"""
from __future__ import annotations

import torch

from .layout import state_sizes


def packing(members, specs, numel: int) -> dict:
    """{elementwise key: (its tensor's length, each member's offset in it or None)}."""
    out = {}
    for key in sorted(set().union(*(s.elementwise for s in specs)) if specs else ()):
        keeps = [key in s.elementwise for s in specs]
        if all(keeps):
            out[key] = (numel, [m.offset for m in members])
            continue
        offsets, n = [], 0
        for m, k in zip(members, keeps):
            offsets.append(n if k else None)
            n += (m.b - m.a) if k else 0
        out[key] = (n, offsets)
    return out


def new_state(flat: torch.Tensor, members, specs, dtype, where: str) -> dict:
    elem, rep = state_sizes(specs, flat.numel())
    if elem & set(rep):
        raise NotImplementedError(
            f"{where} mixes parameters whose rules keep {sorted(elem & set(rep))[0]!r} per "
            f"element for some and per row or column for others (1-D and >=2-D parameters "
            f"under one rule); put them in separate groups (build_optimizer does)")
    st = {}
    steps = sum(s.step for s in specs)
    if steps:
        st["step"] = torch.zeros(steps, dtype=torch.float32)
    for key, (n, offsets) in packing(members, specs, flat.numel()).items():
        st[key] = (torch.zeros_like(flat, dtype=dtype) if None not in offsets else
                   torch.zeros(n, dtype=dtype, device=flat.device))
    for key, n in rep.items():
        st[key] = torch.zeros(n, dtype=torch.float32, device=flat.device)
    return st


def member_state(members, specs, numel: int, i: int, state: dict) -> dict:
    """Views of member i's part of the flat's state (only the keys its rule keeps)."""
    m, spec = members[i], specs[i]
    pack = packing(members, specs, numel)
    out = {}
    for key, t in state.items():
        if key == "step":
            if spec.step:
                out[key] = t[sum(s.step for s in specs[:i])]
        elif key in pack:
            off = pack[key][1][i]
            if off is not None:
                out[key] = t[off:off + (m.b - m.a)]
        elif key in spec.replicated:
            start = sum(s.replicated.get(key, 0) for s in specs[:i])
            out[key] = t[start:start + spec.replicated[key]]
    return out


def owners(members, specs, rule_names, numel: int) -> dict:
    """{key: {rule name: floats}}: each member's held elements, replicated pieces and step
    count go to its rule; a flat-shaped key's padding to the last member's rule."""
    out: dict = {}

    def add(key, name, n):
        out.setdefault(key, {})
        out[key][name] = out[key].get(name, 0) + n

    for key, (n, offsets) in packing(members, specs, numel).items():
        held = 0
        for name, m, off in zip(rule_names, members, offsets):
            if off is not None:
                add(key, name, m.b - m.a)
                held += m.b - m.a
        if n > held:
            last = max(i for i, off in enumerate(offsets) if off is not None)
            add(key, rule_names[last], n - held)
    for name, s in zip(rule_names, specs):
        for key, n in s.replicated.items():
            add(key, name, n)
        if s.step:
            add("step", name, 1)
    return out
