"""Measurement: this rank's bytes, read from the real tensors (see sage_dist.memory).

DeepSpeed's storage is reached only through sage_dist.shard.zero's accessors; a sage_dist
optimizer counts its own state (`RoutedOptimizer.state_bytes`), any other torch optimizer is
counted generically.
"""
from __future__ import annotations

import os
import resource

import torch

from ..shard import zero

GIB = 1 << 30
MIB = 1 << 20
COMPONENTS = ("parameters", "gradients", "master_weights", "optimizer_state")
FP32 = 4


class _Storages:
    """Distinct storages (by device and address), their bytes by dtype and by device type."""

    def __init__(self, exclude: "_Storages | None" = None):
        self.seen: dict = {}
        self.exclude = exclude

    @staticmethod
    def key(t: torch.Tensor):
        st = t.untyped_storage()
        return (str(t.device), st.data_ptr()), st.nbytes()

    def add(self, t) -> None:
        if not torch.is_tensor(t):
            return
        from torch.distributed.tensor import DTensor
        if isinstance(t, DTensor):
            t = t._local_tensor
        if t.is_meta:
            return
        key, nbytes = self.key(t)
        if key[1] == 0 or nbytes == 0 or key in self.seen:
            return
        if self.exclude is not None and key in self.exclude.seen:
            return
        self.seen[key] = (nbytes, str(t.dtype).replace("torch.", ""), t.device.type)

    def add_all(self, obj) -> None:
        """Tensors inside lists, tuples and dicts (DeepSpeed's gradient buffer groups are lists
        of views into one flat partition: their storage is that flat's)."""
        if obj is None:
            return
        if torch.is_tensor(obj):
            self.add(obj)
            return
        if isinstance(obj, dict):
            obj = list(obj.values())
        if isinstance(obj, (list, tuple)):
            for x in obj:
                self.add_all(x)

    @property
    def total(self) -> int:
        return sum(n for n, _, _ in self.seen.values())

    def by(self, index: int) -> dict:
        out: dict = {}
        for v in self.seen.values():
            out[v[index]] = out.get(v[index], 0) + v[0]
        return dict(sorted(out.items()))


def _resolve(model, optimizer, engine):
    """(module, client optimizer, DeepSpeed wrapper or None, engine name)."""
    if engine is None and zero.is_engine(model):
        engine = model
    if engine is not None:
        wrapper = zero.wrapper_of(engine)
        client = optimizer
        if client is None or (wrapper is not None and client is wrapper):
            client = zero.client_optimizer(engine)   # what deepspeed.initialize returned
        stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
        return engine.module, client, wrapper, f"deepspeed-zero{stage}"
    while isinstance(getattr(model, "module", None), torch.nn.Module):   # DDP
        model = model.module
    from torch.distributed.tensor import DTensor
    kind = "fsdp2" if any(isinstance(p, DTensor) for p in model.parameters()) else "local"
    return model, optimizer, None, kind


def _parameter_storages(module) -> _Storages:
    s = _Storages()
    for p in module.parameters():
        s.add(p)
        s.add(zero.param_partition(p))       # ZeRO-3 partition (None otherwise)
    return s


def _gradient_storages(module, wrapper, params: _Storages) -> _Storages:
    s = _Storages(exclude=params)
    for p in module.parameters():
        if p.grad is not None:
            s.add(p.grad)
    if wrapper is not None:
        for buffers in zero.gradient_buffers(wrapper):
            s.add_all(buffers)
        for flat in zero.fp32_partitions(wrapper):
            if flat.grad is not None:
                s.add(flat.grad)
    return s


def nonzero_rules(by_rule: dict) -> dict:
    """Per-rule bytes, sorted, without rules that hold nothing on this rank."""
    return {k: v for k, v in sorted(by_rule.items()) if v["elementwise"] or v["replicated"]}


def _state_tensors(values):
    """The tensors of a state dict's values, including those an object holds one level down
    (GaLore's and APOLLO's projectors keep their projection matrix as an attribute)."""
    for v in values:
        if torch.is_tensor(v):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from (t for t in v if torch.is_tensor(t))
        elif hasattr(v, "__dict__") and not isinstance(v, type):
            yield from (t for t in vars(v).values() if torch.is_tensor(t))


def optimizer_state_bytes(opt) -> dict:
    """This rank's optimizer-state bytes: {'elementwise', 'replicated', 'total', 'by_rule',
    'by_device'}.

    A sage_dist optimizer counts its own (`state_bytes(by_rule=True)`: the split follows each
    rule's StateSpec, DeepSpeed ZeRO-3 included). For any other torch optimizer, a state tensor
    with as many elements as this rank's piece of its parameter is elementwise, anything else
    replicated; the "rule" is the class name.
    """
    from ..optim import RoutedOptimizer
    if isinstance(opt, RoutedOptimizer):
        return opt.state_bytes(by_rule=True)
    out = {"elementwise": 0, "replicated": 0}
    rules: dict = {}
    devices: dict = {}
    if opt is not None:
        from torch.distributed.tensor import DTensor
        name = type(opt).__name__
        for p, st in opt.state.items():
            local_p = p._local_tensor if isinstance(p, DTensor) else p
            for t in _state_tensors(st.values()):
                local = t._local_tensor if isinstance(t, DTensor) else t
                kind = "elementwise" if local.numel() == local_p.numel() and local.dim() > 0 \
                    else "replicated"
                n = local.numel() * local.element_size()
                out[kind] += n
                r = rules.setdefault(name, {"elementwise": 0, "replicated": 0})
                r[kind] += n
                devices[local.device.type] = devices.get(local.device.type, 0) + n
    out["total"] = out["elementwise"] + out["replicated"]
    out["by_rule"] = nonzero_rules(rules)
    out["by_device"] = dict(sorted(devices.items()))
    return out


def peak_memory() -> dict:
    """The process peak: RSS (current and peak) always; CUDA peak allocated/reserved on a GPU."""
    out = {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        with open("/proc/self/statm") as f:
            out["rss"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
        out["cuda_peak_reserved"] = torch.cuda.max_memory_reserved()
        out["cuda_allocated"] = torch.cuda.memory_allocated()
    return out


def measure(model, optimizer=None, engine=None) -> dict:
    """This rank's memory, from the real tensors (sage_dist.memory's docstring says what counts).

    `model`: the module (plain, DDP, FSDP2) or a DeepSpeed engine; `optimizer`: the optimizer
    (for DeepSpeed the client optimizer, or what initialize returned); `engine`: the DeepSpeed
    engine when `model` is its module. Call it on every rank; no collective is issued.
    Gradients are what is resident at the call: call between backward and step to see them.
    """
    import torch.distributed as dist
    module, client, wrapper, kind = _resolve(model, optimizer, engine)
    params = _parameter_storages(module)
    grads = _gradient_storages(module, wrapper, params)
    master = _Storages(exclude=params)
    if wrapper is not None:
        for flat in zero.fp32_partitions(wrapper):
            master.add(flat)
    state = dict(optimizer_state_bytes(client))
    devices = state.pop("by_device")
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rec = {
        "rank": rank, "world": world, "engine": kind,
        "parameters": {"total": params.total, "by_dtype": params.by(1)},
        "gradients": grads.total,
        "master_weights": master.total,
        "optimizer_state": state,
        "location": {"parameters": params.by(2), "gradients": grads.by(2),
                     "master_weights": master.by(2), "optimizer_state": dict(sorted(devices.items()))},
        "peak": peak_memory(),
    }
    rec["total"] = params.total + grads.total + master.total + state["total"]
    return rec


def gather_table(record: dict, group=None, dst: int = 0):
    """Every rank's record, in rank order, on rank `dst` (None on the others). A collective
    when torch.distributed is initialised; otherwise returns [record]."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [record]
    out = [None] * dist.get_world_size(group) if dist.get_rank() == dst else None
    dist.gather_object(record, out, dst=dst, group=group)
    return out


def flatten(record: dict, prefix: str = "memory/") -> dict:
    """A record as flat {name: number} metrics (bytes), e.g. for a metrics JSON line."""
    out = {}

    def walk(obj, key):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{key}{k}/")
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
            out[key.rstrip("/")] = obj

    walk({k: v for k, v in record.items() if k not in ("engine",)}, prefix)
    return out
