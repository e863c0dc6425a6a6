"""Resharding DeepSpeed ZeRO runs: a world-size-independent checkpoint of our optimizer.

`save_universal` writes every parameter's fp32 master weights and optimizer state as whole
tensors keyed by parameter name; `load_universal` cuts each rank's ranges out of them at any
world size and ZeRO stage (re-exported as sage_dist.deepspeed.save_universal / load_universal).
"""
from __future__ import annotations

import os

from .shard import zero

UNIVERSAL_FILE = "sage_dist_universal.pt"


def save_universal(engine, path, client_state: dict | None = None) -> str:
    """Write, on rank 0, every parameter's fp32 master weights and optimizer state as whole
    tensors keyed by parameter name, plus per-parameter step counts and replicated statistics.
    A collective: call it on every rank. The file loads at any world size and any ZeRO stage
    (load_universal). Written atomically: a crash mid-save leaves any older file intact."""
    import torch
    import torch.distributed as dist

    opt = zero.client_optimizer(engine)
    layout = opt.layout
    params, state = {}, {}
    for e in layout.entries_by_id.values():
        rules = _rules(opt, e)
        full = layout.gather(e.flat, e.flat.data)
        st = opt.state[e.flat]
        elem = {k: layout.gather(e.flat, v, k, rules) for k, v in st.items()
                if k in layout.elementwise_keys(e.flat, rules)}
        for i, (m, p) in enumerate(zip(e.members, full)):
            params[m.name] = p.cpu()
            views = layout.member_state(e.flat, i, st, rules)
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

    opt = zero.client_optimizer(engine)
    layout = opt.layout
    saved = torch.load(os.path.join(path, UNIVERSAL_FILE), weights_only=True)
    missing = [m.name for e in layout.entries_by_id.values() for m in e.members
               if m.name not in saved["params"]]
    if missing:
        raise ValueError(f"{path}: no saved state for parameter {missing[0]!r}: the checkpoint "
                         f"is of another model")
    for group in opt.param_groups:
        sg = _saved_group(group, saved["groups"], opt.param_groups)
        for k, v in sg.items():
            if k in group and k not in ("name", "rule", "rules"):
                group[k] = tuple(v) if isinstance(v, list) else v
    with torch.no_grad():
        for e in layout.entries_by_id.values():
            rules = _rules(opt, e)
            st = opt.state[e.flat]
            elem = layout.elementwise_keys(e.flat, rules)
            for i, m in enumerate(e.members):
                n = m.b - m.a
                e.flat.data[m.offset:m.offset + n] = saved["params"][m.name].reshape(-1)[m.a:m.b]
                views = layout.member_state(e.flat, i, st, rules)
                for k, v in saved["state"][m.name].items():
                    src = v.reshape(-1)[m.a:m.b] if k in elem else v
                    views[k].copy_(src)
    zero.refresh_model_weights(engine)
    return saved["client_state"]


def _rules(opt, e) -> list:
    from .optim.registry import get_rule
    return [get_rule(r) for r in opt.layout.member_rules(e.flat, opt.param_groups[e.group_index])]


def _saved_group(group: dict, saved: list[dict], groups: list[dict]) -> dict:
    """The saved group whose hyperparameters `group` takes: the one at the same position when
    the groups are the same, else the one of the same name, else (groups merged differently
    when it was saved: groups.merge_groups joins names with '+') the first that is one of the
    groups merged into this one, or one this one was merged into ('embedding+matrix+head'
    and 'head'; whole names only, as override patterns may hold '+' themselves)."""
    i = next(k for k, g in enumerate(groups) if g is group)
    if [g.get("name") for g in groups] == [sg.get("name") for sg in saved]:
        return saved[i]
    name = str(group.get("name", ""))

    def part_of(part: str, joined: str) -> bool:
        return part == joined or joined.startswith(part + "+") or \
            joined.endswith("+" + part) or f"+{part}+" in joined

    for match in (lambda s: s == name, lambda s: part_of(s, name), lambda s: part_of(name, s)):
        for sg in saved:
            if match(str(sg.get("name", ""))):
                return sg
    raise ValueError(f"the universal checkpoint has no param group for {name!r}: it is of "
                     f"another optimizer")
