"""Per-rank memory accounting: what each rank holds, measured and estimated.

Two halves that use the same keys, so a measurement and an estimate compare field by field:

- `measure(model, optimizer, engine=None)`: this rank's bytes, read from the real tensors —
  parameters (by dtype), gradients, fp32 master weights, optimizer state (elementwise and
  replicated, per rule) — and the process peak (peak CUDA allocated/reserved on a GPU, peak
  RSS always). `gather_table` collects every rank's record on rank 0; `format_table` prints
  them; `flatten` turns a record into flat metrics.
- `estimate(model, world, engine, zero, recipe, ...)`: the same breakdown from the model's
  shapes alone (a Llama config is built on the meta device), modelling DeepSpeed 0.19's and
  FSDP2's partitioning exactly, for any world size.

What each component counts (docs/MEMORY.md has the longer version):

parameters      the model's parameter storage on this rank: whole (local/DDP), DeepSpeed ZeRO-1/2's
                flat low-precision groups (padded to a multiple of 2·world), ZeRO-3's partitions
                (ceil(numel/world) each) plus the parameters it keeps whole (numel <=
                stage3_param_persistence_threshold), FSDP2's padded row shards.
gradients       gradient storage that is resident once backward has finished, before the step:
                p.grad (local/DDP, FSDP2: the padded reduce-scatter outputs); DeepSpeed ZeRO-1/2:
                the WHOLE gradients of every parameter that overlaps this rank's partition
                (DeepSpeed 0.19 copies them whole into one contiguous buffer), or the fp32
                partition on the host under optimizer offload; ZeRO-3: its flat buffer of
                partitioned gradients. DeepSpeed frees the ZeRO-1/2 buffers in step(): measure
                between backward and step to see them.
master_weights  DeepSpeed's fp32 partitions (also kept in fp32 training: a separate copy).
                FSDP2 and plain models update the parameters themselves: 0.
optimizer_state the optimizer's state tensors: 'elementwise' (shaped like this rank's slice or
                partition, padding included) and 'replicated' (held whole on every rank:
                SAGE's per-column S, step counts), and per rule.

Transient memory (activations, all-gathered FSDP2/ZeRO-3 layers, communication buckets, the
fp32 copy DeepSpeed makes of one group's gradients inside step) is not a component; it shows
in the measured peak only.
"""
from __future__ import annotations

import glob
import json
import math
import os
import resource
from dataclasses import dataclass

import torch

GIB = 1 << 30
MIB = 1 << 20
COMPONENTS = ("parameters", "gradients", "master_weights", "optimizer_state")
ENGINES = ("local", "ddp", "fsdp2", "deepspeed")
FP32 = 4

# DeepSpeed 0.19 defaults the estimator models (deepspeed/runtime/zero/config.py).
DS_SUB_GROUP_SIZE = 1_000_000_000
DS_PERSISTENCE_THRESHOLD = 100_000
DS_ALIGNMENT_FACTOR = 2          # nccl_start_alignment_factor in stage_1_and_2.py
DS_REDUCE_BUCKET_SIZE = 500_000_000   # reduce_bucket_size (elements)


# ===========================================================================================
# Measurement
# ===========================================================================================
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
        """Tensors inside lists, tuples, dicts and DeepSpeed's gradient buffer groups."""
        if obj is None:
            return
        if torch.is_tensor(obj):
            self.add(obj)
            return
        flat = getattr(obj, "flat_partition", None)
        if torch.is_tensor(flat):
            self.add(flat)
        if isinstance(obj, dict):
            obj = list(obj.values())
        if isinstance(obj, (list, tuple)):       # GradPartitionBufferGroup is a list too
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


def _is_ds_engine(obj) -> bool:
    return hasattr(obj, "basic_optimizer") and hasattr(obj, "module") and hasattr(obj, "optimizer")


def _resolve(model, optimizer, engine):
    """(module, client optimizer, DeepSpeed wrapper or None, engine name)."""
    if engine is None and _is_ds_engine(model):
        engine = model
    if engine is not None:
        module, wrapper = engine.module, engine.optimizer
        client = optimizer
        if client is None or client is wrapper:   # what deepspeed.initialize returned
            client = engine.basic_optimizer
        stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
        return module, client, wrapper, f"deepspeed-zero{stage}"
    while isinstance(getattr(model, "module", None), torch.nn.Module):   # DDP
        model = model.module
    from torch.distributed.tensor import DTensor
    kind = "fsdp2" if any(isinstance(p, DTensor) for p in model.parameters()) else "local"
    return model, optimizer, None, kind


def _ds_fp32_flats(wrapper) -> list:
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat",
                 "fp32_groups_flat_partition"):
        flats = getattr(wrapper, attr, None)
        if flats:
            return list(flats)
    return []


def _parameter_storages(module) -> _Storages:
    s = _Storages()
    for p in module.parameters():
        s.add(p)
        ds_tensor = getattr(p, "ds_tensor", None)      # ZeRO-3 partition
        if ds_tensor is not None:
            s.add(ds_tensor)
    return s


def _gradient_storages(module, wrapper, params: _Storages) -> _Storages:
    s = _Storages(exclude=params)
    for p in module.parameters():
        if p.grad is not None:
            s.add(p.grad)
    if wrapper is not None:
        for attr in ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer",
                     "fp32_groups_gradients_flat"):
            s.add_all(getattr(wrapper, attr, None))
        for flat in _ds_fp32_flats(wrapper):
            if flat.grad is not None:
                s.add(flat.grad)
    return s


def optimizer_state_bytes(opt) -> dict:
    """This rank's optimizer-state bytes: elementwise / replicated, total, and per rule.

    For a sage_dist optimizer the split follows each rule's StateSpec (as `state_bytes()`
    does) and also covers DeepSpeed ZeRO-3, whose param_groups are empty between steps. For any
    other torch optimizer, a state tensor with as many elements as this rank's piece of its
    parameter is elementwise, anything else replicated; the "rule" is the class name.
    """
    out = {"elementwise": 0, "replicated": 0, "by_rule": {}}
    devices: dict = {}

    def add(rule, kind, t):
        n = t.numel() * t.element_size()
        out[kind] += n
        r = out["by_rule"].setdefault(rule, {"elementwise": 0, "replicated": 0})
        r[kind] += n
        devices[t.device.type] = devices.get(t.device.type, 0) + n

    if opt is None:
        pass
    elif hasattr(opt, "state_entries"):
        layout = opt.layout
        items = [(entry, rule.name, rule) for entry, rule in opt.state_entries()]
        for entry, rule_name, rule in items:
            elem = layout.elementwise_keys(entry, rule)
            for key, t in opt.state.get(entry, {}).items():
                if not torch.is_tensor(t):
                    continue
                kind = "elementwise" if key in elem else "replicated"
                add(rule_name, kind, layout.local_flat(t) if kind == "elementwise" else t)
    else:
        from torch.distributed.tensor import DTensor
        name = type(opt).__name__
        for p, st in opt.state.items():
            local_p = p._local_tensor if isinstance(p, DTensor) else p
            for t in st.values():
                if not torch.is_tensor(t):
                    continue
                local = t._local_tensor if isinstance(t, DTensor) else t
                kind = "elementwise" if local.numel() == local_p.numel() and local.dim() > 0 \
                    else "replicated"
                add(name, kind, local)
    out["total"] = out["elementwise"] + out["replicated"]
    out["by_rule"] = _nonzero_rules(out["by_rule"])
    out["_devices"] = devices
    return out


def _nonzero_rules(by_rule: dict) -> dict:
    """Per-rule bytes, sorted, without rules that hold nothing on this rank."""
    return {k: v for k, v in sorted(by_rule.items()) if v["elementwise"] or v["replicated"]}


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
    """This rank's memory, from the real tensors (see the module docstring for what counts).

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
        for flat in _ds_fp32_flats(wrapper):
            master.add(flat)
    state = optimizer_state_bytes(client)
    devices = state.pop("_devices")
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


def fmt_bytes(n: float, unit: str = "auto") -> str:
    if unit == "auto":
        unit = "GiB" if abs(n) >= GIB else "MiB"
    scale = {"GiB": GIB, "MiB": MIB, "B": 1}[unit]
    return f"{n / scale:,.2f} {unit}" if unit != "B" else f"{int(n):,} B"


def format_table(records: list, unit: str = "auto", title: str | None = None) -> str:
    """One row per rank: parameters, gradients, master weights, optimizer state (elementwise +
    replicated), their total, and the measured peak."""
    records = [r for r in records if r is not None]
    head = ["rank", "parameters", "gradients", "master", "state elem", "state repl",
            "total", "peak"]
    rows = []
    for r in records:
        pk = r.get("peak", {})
        peak = pk.get("cuda_peak_reserved", pk.get("peak_rss"))
        peak_s = ("—" if peak is None else fmt_bytes(peak, unit)
                  + (" (cuda reserved)" if "cuda_peak_reserved" in pk else " (rss)"))
        rows.append([str(r.get("rank", "?")), fmt_bytes(r["parameters"]["total"], unit),
                     fmt_bytes(r["gradients"], unit), fmt_bytes(r["master_weights"], unit),
                     fmt_bytes(r["optimizer_state"]["elementwise"], unit),
                     fmt_bytes(r["optimizer_state"]["replicated"], unit),
                     fmt_bytes(r["total"], unit), peak_s])
    w = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    line = lambda x: "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(x))
    out = []
    if title is None and records:
        r0 = records[0]
        dtypes = ", ".join(f"{k} {fmt_bytes(v, unit)}" for k, v in r0["parameters"]["by_dtype"].items())
        rules = ", ".join(f"{k} {fmt_bytes(v['elementwise'] + v['replicated'], unit)}"
                          for k, v in r0["optimizer_state"]["by_rule"].items())
        title = (f"memory per rank ({r0.get('engine', '?')}, world {r0.get('world', len(records))});"
                 f" rank {r0.get('rank')}: parameters by dtype: {dtypes or '—'}; "
                 f"state by rule: {rules or '—'}")
    if title:
        out.append(title)
    out += [line(head), line(["-" * n for n in w]), *map(line, rows)]
    return "\n".join(out)


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


# ===========================================================================================
# Estimation (from shapes only)
# ===========================================================================================
@dataclass
class ParamShape:
    name: str
    shape: tuple
    category: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape else 1


@dataclass
class ModelShapes:
    name: str
    groups: list            # [(rule, [ParamShape, ...])] in build_optimizer's group order
    total_params: int
    largest_layer_params: int   # the largest module's own parameters (DeepSpeed ZeRO-3 estimator)


def load_llama_config(model):
    """A LlamaConfig from a path to its JSON, a dict, or a config object."""
    from transformers import LlamaConfig
    if isinstance(model, (str, os.PathLike)):
        return LlamaConfig.from_json_file(str(model))
    if isinstance(model, dict):
        return LlamaConfig(**model)
    return model


def meta_model(model):
    """A Hugging Face causal LM with the config's shapes on the meta device (no memory)."""
    if isinstance(model, torch.nn.Module):
        return model
    cfg = load_llama_config(model)
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    with torch.device("meta"):
        if getattr(cfg, "model_type", "llama") == "llama":
            return LlamaForCausalLM(cfg)
        return AutoModelForCausalLM.from_config(cfg)


def _model_name(model) -> str:
    if isinstance(model, (str, os.PathLike)):
        return os.path.splitext(os.path.basename(str(model)))[0]
    return getattr(model, "name_or_path", None) or type(model).__name__


def model_shapes(model, recipe: str = "sage-hybrid", head: str = "sage", overrides=None,
                 name: str | None = None) -> ModelShapes:
    """Parameter shapes grouped exactly as build_optimizer groups them (one group per category
    or override pattern, in the same order), from a config path/dict/object or a module."""
    from .optim.recipes import param_groups
    from .shard.fragment import global_shape
    if name is None:
        name = _model_name(model)
    m = meta_model(model)
    groups = []
    for g in param_groups(m, recipe, overrides=overrides, head=head):
        cat = g["name"]
        groups.append((g["rule"], [ParamShape(n, tuple(global_shape(p)), cat)
                                   for n, p in zip(g["param_names"], g["params"])]))
    seen, total = set(), 0
    for p in m.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += math.prod(global_shape(p))
    largest = max((sum(math.prod(global_shape(p)) for p in mod.parameters(recurse=False))
                   for mod in m.modules()), default=0)
    return ModelShapes(name, groups, total, largest)


def _rows(shape) -> tuple[int, int]:
    """(rows, elements per row) of FSDP2's dim-0 sharding."""
    if not shape:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def _spec(rule: str, shape):
    from .optim.registry import get_rule
    from .shard.fragment import matrix_shape
    return get_rule(rule).state_spec(shape, *matrix_shape(shape))


class _Acc:
    """Per-rank accumulator with the record's layout."""

    def __init__(self, state_elem_bytes: int = 4):
        self.state_elem_bytes = state_elem_bytes  # elementwise state: fp32 or bf16
        self.params: dict = {}
        self.grads = 0
        self.master = 0
        self.state = {"elementwise": 0, "replicated": 0, "by_rule": {}}

    def add_param(self, dtype: str, n: int):
        self.params[dtype] = self.params.get(dtype, 0) + n

    def add_state(self, rule: str, kind: str, n: int):
        self.state[kind] += n
        r = self.state["by_rule"].setdefault(rule, {"elementwise": 0, "replicated": 0})
        r[kind] += n

    def add_rule_state(self, rule, specs, elem_numel: int, members: int):
        """State of one optimizer entry (a parameter, or a flat holding `members` params):
        elementwise keys x elem_numel floats; replicated entries summed over members; one
        fp32 step per member when any spec keeps a step."""
        keys = set().union(*(s.elementwise for s in specs)) if specs else set()
        self.add_state(rule, "elementwise", len(keys) * elem_numel * self.state_elem_bytes)
        rep = sum(sum(s.replicated.values()) for s in specs)
        if any(s.step for s in specs):
            rep += members
        self.add_state(rule, "replicated", rep * FP32)

    def record(self, rank, world, kind, location) -> dict:
        st = dict(self.state)
        st["total"] = st["elementwise"] + st["replicated"]
        st["by_rule"] = _nonzero_rules(st["by_rule"])
        ptotal = sum(self.params.values())
        rec = {"rank": rank, "world": world, "engine": kind,
               "parameters": {"total": ptotal, "by_dtype": dict(sorted(self.params.items()))},
               "gradients": self.grads, "master_weights": self.master,
               "optimizer_state": st, "location": location}
        rec["total"] = ptotal + self.grads + self.master + st["total"]
        rec["device_total"] = sum(rec[c]["total"] if isinstance(rec[c], dict) else rec[c]
                                  for c in COMPONENTS if location[c] == "device")
        rec["host_total"] = rec["total"] - rec["device_total"]
        return rec


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def estimate_ranks(model, world: int, engine: str = "deepspeed", zero: int = 2,
                   recipe: str = "sage-hybrid", bf16: bool = False, offload: bool = False, *,
                   head: str = "sage", overrides=None, state_dtype="float32",
                   sub_group_size: int = DS_SUB_GROUP_SIZE,
                   persistence_threshold: int = DS_PERSISTENCE_THRESHOLD) -> list[dict]:
    """Every rank's estimated record (same keys as `measure`), from shapes only.

    engine: 'local' / 'ddp' (every rank holds everything), 'fsdp2' (sage_dist.fsdp.shard_llama:
    fp32 sharded parameters, bf16 only for compute), 'deepspeed' with `zero` 1, 2 or 3
    (DeepSpeed 0.19 defaults: no round-robin gradients, no parameter_alignment, default
    sub_group_size and stage3_param_persistence_threshold). bf16: DeepSpeed's bf16 mode (16-bit
    parameters and gradients, fp32 master); offload: DeepSpeed's offload_optimizer to CPU.
    state_dtype: the optimizer's elementwise state ('float32' or 'bfloat16', as
    RoutedOptimizer's option of that name).
    """
    from .optim.optimizer import parse_state_dtype
    state_elem_bytes = torch.empty((), dtype=parse_state_dtype(state_dtype)).element_size()
    shapes = model if isinstance(model, ModelShapes) else model_shapes(model, recipe, head, overrides)
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is invalid: allowed are {', '.join(ENGINES)}")
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world={world!r} is invalid: allowed is an integer >= 1")
    if engine == "deepspeed" and zero not in (1, 2, 3):
        raise ValueError(f"zero={zero!r} is invalid: allowed are 1, 2, 3")
    if offload and engine != "deepspeed":
        raise ValueError("offload=True models DeepSpeed's offload_optimizer: use engine='deepspeed'")
    ds = engine == "deepspeed"
    pbytes = 2 if (bf16 and ds) else FP32
    pdtype = "bfloat16" if pbytes == 2 else "float32"
    kind = f"deepspeed-zero{zero}" if ds else engine
    host = "host" if offload else "device"
    location = {"parameters": "device", "gradients": host if ds else "device",
                "master_weights": host, "optimizer_state": host}
    accs = [_Acc(state_elem_bytes) for _ in range(world)]

    for rule, params in shapes.groups:
        specs = [_spec(rule, p.shape) for p in params]
        if engine in ("local", "ddp"):
            for a in accs:
                for p, s in zip(params, specs):
                    a.add_param(pdtype, p.numel * pbytes)
                    a.grads += p.numel * pbytes
                    a.add_rule_state(rule, [s], p.numel, 1)
        elif engine == "fsdp2":
            for p, s in zip(params, specs):
                R, rowlen = _rows(p.shape)
                chunk = -(-R // world)
                for r, a in enumerate(accs):
                    held = max(0, min(chunk, R - r * chunk)) * rowlen
                    a.add_param(pdtype, chunk * rowlen * pbytes)   # FSDP2 pads every shard
                    a.grads += chunk * rowlen * pbytes             # reduce-scatter output, padded
                    a.add_rule_state(rule, [s], held, 1)
        elif zero in (1, 2):
            sizes = [p.numel for p in params]
            total = sum(sizes)
            padded = _round_up(total, DS_ALIGNMENT_FACTOR * world)
            P = padded // world
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            for r, a in enumerate(accs):
                a.add_param(pdtype, padded * pbytes)
                if offload:
                    a.grads += P * FP32        # the persistent fp32 partition gradient on the host
                else:                          # whole gradients of params overlapping [rP, rP+P)
                    lo, hi = r * P, (r + 1) * P
                    a.grads += sum(n for s0, n in zip(starts, sizes)
                                   if n > 0 and s0 < hi and s0 + n > lo) * pbytes
                a.master += P * FP32
                a.add_rule_state(rule, specs, P, len(params))
        else:  # ZeRO-3: ceil(numel / world) per parameter per rank, in sub-groups
            subgroups, cur, running = [], [], 0
            for p, s in zip(params, specs):
                pn = -(-p.numel // world)
                cur.append((p, s, pn))
                running += pn
                if running >= sub_group_size:
                    subgroups.append(cur)
                    cur, running = [], 0
            if cur:
                subgroups.append(cur)
            for a in accs:
                for sg in subgroups:
                    n_sg = sum(pn for _, _, pn in sg)
                    a.add_param(pdtype, n_sg * pbytes)
                    for p, _, _ in sg:
                        if p.numel <= persistence_threshold:
                            a.add_param(pdtype, p.numel * pbytes)   # kept whole on every rank
                    a.grads += n_sg * pbytes
                    if offload:
                        a.grads += n_sg * FP32          # fp32 sub-group gradient on the host
                    a.master += n_sg * FP32
                    a.add_rule_state(rule, [s for _, s, _ in sg], n_sg, len(sg))
    transient = {}
    if ds:   # modelled from DeepSpeed 0.19's code, not part of the total (see docs/MEMORY.md)
        transient["reduce_bucket"] = DS_REDUCE_BUCKET_SIZE * pbytes
        if zero == 1 and not offload:
            transient["whole_gradients_end_of_backward"] = shapes.total_params * pbytes
    recs = [a.record(r, world, kind, location) for r, a in enumerate(accs)]
    for rec in recs:
        rec["transient"] = dict(transient)
    return recs


def estimate(model, world: int, engine: str = "deepspeed", zero: int = 2,
             recipe: str = "sage-hybrid", bf16: bool = False, offload: bool = False, *,
             rank: int | None = None, **kw) -> dict:
    """One rank's estimated record: `rank`, or the most loaded rank (largest device total,
    then total) when rank is None. The record also carries `per_rank_total`."""
    recs = estimate_ranks(model, world, engine, zero, recipe, bf16, offload, **kw)
    if rank is None:
        rank = max(range(len(recs)), key=lambda r: (recs[r]["device_total"], recs[r]["total"], -r))
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank!r} is invalid: allowed is 0..{world - 1}")
    out = dict(recs[rank])
    out["per_rank_total"] = [r["total"] for r in recs]
    return out


# -- DeepSpeed's own estimate (AdamW, 16-bit mixed precision) --------------------------------
def deepspeed_adamw_estimate(shapes: ModelShapes, world: int, engine: str, zero: int,
                             offload: bool, gpus_per_node: int = 8) -> dict:
    """DeepSpeed's model-states estimate for its Adam at this setup, in bytes per GPU / CPU.

    Calls deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs for ZeRO-1
    and 2 (DeepSpeed has none for stage 1), and deepspeed.runtime.zero.stage3.
    estimate_zero3_model_states_mem_needs for ZeRO-3 and for FSDP2 (the fully sharded analogue;
    zero_init=True, cpu_offload_params=False), with the raw parameter counts. Both assume fp16/
    bf16 parameters and gradients with fp32 master weights and Adam moments."""
    gpn = max(1, min(gpus_per_node, world))
    nodes = max(1, world // gpn)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return {"gpu": None, "cpu": None, "function": None}
    if engine == "deepspeed" and zero in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            shapes.total_params, num_gpus_per_node=gpn, num_nodes=nodes, cpu_offload=offload)
        fn = "stage_1_and_2.estimate_zero2_model_states_mem_needs"
    elif engine in ("fsdp2", "deepspeed"):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            shapes.total_params, shapes.largest_layer_params, num_gpus_per_node=gpn,
            num_nodes=nodes, cpu_offload=offload, cpu_offload_params=False, zero_init=True)
        fn = "stage3.estimate_zero3_model_states_mem_needs"
    else:
        return {"gpu": None, "cpu": None, "function": None}
    return {"gpu": int(gpu), "cpu": int(cpu), "function": fn, "gpus_per_node": gpn,
            "nodes": nodes}


# -- fit, plot, CLI formatting ---------------------------------------------------------------
def default_configs_dir() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(here, "configs", "models")


def model_configs(configs_dir: str | None = None) -> list[tuple[str, str]]:
    """(name, path) of every *.json under configs_dir."""
    d = configs_dir or default_configs_dir()
    paths = sorted(glob.glob(os.path.join(d, "*.json")))
    if not paths:
        raise ValueError(f"no model configs (*.json) in {d!r}")
    return [(os.path.splitext(os.path.basename(p))[0], p) for p in paths]


def fit(gib: float, world: int, engine: str = "deepspeed", zero: int = 2, recipes=None,
        bf16: bool = False, offload: bool = False, configs_dir: str | None = None,
        head: str = "sage") -> dict:
    """For each recipe, the largest model config (by parameter count) whose per-rank model
    states (device part, on the most loaded rank) fit in `gib` GiB: {recipe: {'model',
    'params', 'device_total'} or None}."""
    from .optim.recipes import RECIPES
    recipes = list(recipes or RECIPES)
    budget = gib * GIB
    out = {r: None for r in recipes}
    for name, path in model_configs(configs_dir):
        m = meta_model(path)
        for recipe in recipes:
            shapes = model_shapes(m, recipe, head, name=name)
            est = estimate(shapes, world, engine, zero, recipe, bf16, offload)
            best = out[recipe]
            if est["device_total"] <= budget and (best is None or shapes.total_params > best["params"]):
                out[recipe] = {"model": name, "params": shapes.total_params,
                               "device_total": est["device_total"]}
    return out


def setup_label(world, engine, zero, bf16, offload) -> str:
    eng = f"DeepSpeed ZeRO-{zero}" if engine == "deepspeed" else {"fsdp2": "FSDP2",
                                                                    "ddp": "DDP"}.get(engine, engine)
    extras = ["bf16" if bf16 else "fp32"] + (["optimizer offload"] if offload else [])
    return f"{eng}, world {world}, {', '.join(extras)}"


def plot(path: str, model, world: int, engine: str = "deepspeed", zero: int = 2, recipes=None,
         bf16: bool = False, offload: bool = False, head: str = "sage", title=None) -> str:
    """A PNG: per-rank memory by component (stacked bars), one bar per recipe."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .optim.recipes import RECIPES
    recipes = list(dict.fromkeys([*(recipes or RECIPES), "adamw"]))
    name = _model_name(model)
    m = meta_model(model)
    recs = [estimate(model_shapes(m, r, head, name=name), world, engine, zero, r, bf16, offload)
            for r in recipes]
    parts = [("parameters", lambda r: r["parameters"]["total"]),
             ("gradients", lambda r: r["gradients"]),
             ("master weights", lambda r: r["master_weights"]),
             ("optimizer state (elementwise)", lambda r: r["optimizer_state"]["elementwise"]),
             ("optimizer state (replicated)", lambda r: r["optimizer_state"]["replicated"])]
    fig, ax = plt.subplots(figsize=(2.2 + 1.25 * len(recipes), 5.2))
    bottom = [0.0] * len(recipes)
    for label, get in parts:
        vals = [get(r) / GIB for r in recs]
        ax.bar(recipes, vals, bottom=bottom, label=label, width=0.6)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, b in enumerate(bottom):
        ax.text(i, b, f"{b:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, max(bottom) * 1.1 if max(bottom) > 0 else 1)
    ax.set_ylabel("GiB per rank (most loaded rank)")
    ax.set_title(title or f"{name}: {setup_label(world, engine, zero, bf16, offload)}", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(model, world: int, engine: str = "deepspeed", zero: int = 2, recipes=("sage-hybrid",),
           bf16: bool = False, offload: bool = False, head: str = "sage", rank=None,
           gpus_per_node: int = 8, unit: str = "GiB") -> dict:
    """What the CLI prints: per-rank components for each recipe, AdamW beside them, and
    DeepSpeed's own AdamW estimate."""
    recipes = list(dict.fromkeys([*recipes, "adamw"]))
    name = _model_name(model)
    m = meta_model(model)
    shapes = {r: model_shapes(m, r, head, name=name) for r in recipes}
    recs = {r: estimate(shapes[r], world, engine, zero, r, bf16, offload, rank=rank)
            for r in recipes}
    ds = deepspeed_adamw_estimate(shapes["adamw"], world, engine, zero, offload, gpus_per_node)
    return {"model": name, "params": shapes["adamw"].total_params,
            "setup": setup_label(world, engine, zero, bf16, offload), "recipes": recs,
            "deepspeed_adamw": ds}


def format_report(rep: dict, unit: str = "GiB") -> str:
    recs = rep["recipes"]
    names = list(recs)
    r0 = recs[names[0]]
    f = lambda n: fmt_bytes(n, unit).replace(f" {unit}", "")
    rows = [("parameters (" + ", ".join(r0["parameters"]["by_dtype"]) + ")",
             [r["parameters"]["total"] for r in recs.values()]),
            ("gradients", [r["gradients"] for r in recs.values()]),
            ("master weights (fp32)", [r["master_weights"] for r in recs.values()]),
            ("optimizer state", [r["optimizer_state"]["total"] for r in recs.values()]),
            ("  elementwise", [r["optimizer_state"]["elementwise"] for r in recs.values()]),
            ("  replicated", [r["optimizer_state"]["replicated"] for r in recs.values()]),
            ("total", [r["total"] for r in recs.values()])]
    if any(r["host_total"] for r in recs.values()):
        rows += [("  on the GPU", [r["device_total"] for r in recs.values()]),
                 ("  on the host (offload)", [r["host_total"] for r in recs.values()])]
    head = [f"per-rank {unit} (rank {r0['rank']})"] + names
    body = [[label] + [f(v) for v in vals] for label, vals in rows]
    w = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda x: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(x))
    out = [f"{rep['model']} ({rep['params']:,} parameters): {rep['setup']}",
           line(head), line(["-" * n for n in w]), *map(line, body)]
    tr = r0.get("transient") or {}
    if tr:
        notes = []
        if "reduce_bucket" in tr:
            notes.append(f"gradient reduce bucket {f(tr['reduce_bucket'])} {unit} "
                         f"(reduce_bucket_size 5e8 elements)")
        if "whole_gradients_end_of_backward" in tr:
            notes.append(f"ZeRO-1 holds every gradient whole until the end of backward: "
                         f"{f(tr['whole_gradients_end_of_backward'])} {unit} at that moment "
                         f"instead of the gradients row")
        out.append("not in the total (transient): " + "; ".join(notes))
    ds = rep["deepspeed_adamw"]
    if ds.get("function"):
        out.append(f"DeepSpeed's own estimate for AdamW ({ds['function']}, 16-bit params/grads, "
                   f"{ds['nodes']} node(s) x {ds['gpus_per_node']} GPUs): "
                   f"{f(ds['gpu'])} {unit} per GPU, {f(ds['cpu'])} {unit} per CPU")
    else:
        out.append("DeepSpeed's own estimate: none for this engine")
    return "\n".join(out)


def format_row(rep: dict, unit: str = "GiB") -> str:
    """One markdown table row: model, world, engine, then parameters, gradients and master
    weights (the same for every recipe), then per recipe `optimizer state / total` (with the
    GPU part when offloading), then DeepSpeed's own AdamW estimate per GPU."""
    recs = rep["recipes"]
    r0 = next(iter(recs.values()))
    f = lambda n: f"{n / (GIB if unit == 'GiB' else MIB):,.2f}"
    cells = [rep["model"], str(r0["world"]), rep["setup"].split(",")[0],
             f(r0["parameters"]["total"]), f(r0["gradients"]), f(r0["master_weights"])]
    cells += [f"{f(r['optimizer_state']['total'])} / **{f(r['total'])}**"
              + (f" (GPU {f(r['device_total'])})" if r["host_total"] else "")
              for r in recs.values()]
    ds = rep["deepspeed_adamw"]
    cells.append(f(ds["gpu"]) if ds.get("gpu") is not None else "—")
    return "| " + " | ".join(cells) + " |"


def format_fit(result: dict, gib: float, label: str) -> str:
    w = max(len(r) for r in result)
    out = [f"largest model config that fits {gib:g} GiB per rank ({label}):"]
    for recipe, best in result.items():
        out.append(f"  {recipe.ljust(w)}  " + (
            "none fits" if best is None else
            f"{best['model']} ({best['params'] / 1e6:,.0f}M parameters, "
            f"{best['device_total'] / GIB:.2f} GiB)"))
    return "\n".join(out)


def to_json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str)
