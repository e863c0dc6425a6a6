"""The analytic estimator: every rank's record (the keys `measure` returns) from the model's
shapes alone, for any world size.

DeepSpeed's partitioning comes from the functions sage_dist.shard.zero's layout uses
(`padded_size`, `member_range`, `stage3_partition_numel`); FSDP2's is its dim-0 row chunking.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import models
from ..shard import flat_state
from ..shard import zero as zero_layout   # `zero` is the stage argument below
from .measure import COMPONENTS, FP32, nonzero_rules

ENGINES = ("local", "ddp", "fsdp2", "deepspeed")

# DeepSpeed 0.19 defaults the estimator models (deepspeed/runtime/zero/config.py).
DS_SUB_GROUP_SIZE = 1_000_000_000
DS_PERSISTENCE_THRESHOLD = 100_000
DS_REDUCE_BUCKET_SIZE = 500_000_000   # reduce_bucket_size (elements)


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
    groups: list            # [([rule per param], [ParamShape, ...])] in build_optimizer's order
    merged: list            # the same, joined as recipes.merge_groups does (DeepSpeed's groups)
    total_params: int
    largest_layer_params: int   # the largest module's own parameters (DeepSpeed ZeRO-3 estimator)


def model_shapes(model, recipe: str = "sage-hybrid", head: str = "sage", overrides=None,
                 name: str | None = None, hyperparameters: dict | None = None) -> ModelShapes:
    """Parameter shapes grouped exactly as build_optimizer groups them (one group per category
    or override pattern, in the same order; and as groups.merge_groups joins them, which
    depends on the `hyperparameters` given to build_optimizer), from a config (shipped name,
    path, dict or object) or a module."""
    from ..optim.groups import merge_groups
    from ..optim.recipes import param_groups
    from ..shard.fragment import global_shape
    from ..shard.layout import group_rule
    if name is None:
        name = models.config_name(model)
    m = models.meta_model(model)
    built = param_groups(m, recipe, overrides=overrides, head=head, **(hyperparameters or {}))
    cats = {id(p): g["name"] for g in built for p in g["params"]}
    groups, merged = ([([group_rule(g, i) for i in range(len(g["params"]))],
                        [ParamShape(n, tuple(global_shape(p)), cats[id(p)])
                         for n, p in zip(g["param_names"], g["params"])]) for g in gs]
                      for gs in (built, merge_groups(built)))
    seen, total = set(), 0
    for p in m.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += math.prod(global_shape(p))
    largest = max((sum(math.prod(global_shape(p)) for p in mod.parameters(recurse=False))
                   for mod in m.modules()), default=0)
    return ModelShapes(name, groups, merged, total, largest)


def _rows(shape) -> tuple[int, int]:
    """(rows, elements per row) of FSDP2's dim-0 sharding."""
    if not shape:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def _spec(rule: str, shape):
    from ..optim.registry import get_rule
    from ..shard.fragment import matrix_shape
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

    def add_rule_state(self, rules, specs, helds, elem_numel: int):
        """State of one optimizer entry (a parameter, or a flat holding one member per spec,
        `helds` elements of each here), counted per rule as the layouts create it
        (shard/flat_state.py `owners`, which state_bytes(by_rule=True) uses too)."""
        members = [zero_layout.Member("", (), 0, n, 0) for n in helds]
        elem = set().union(*(s.elementwise for s in specs)) if specs else set()
        for key, split in flat_state.owners(members, specs, rules, elem_numel).items():
            kind = "elementwise" if key in elem else "replicated"
            size = self.state_elem_bytes if kind == "elementwise" else FP32
            for rule, n in split.items():
                self.add_state(rule, kind, n * size)

    def record(self, rank, world, kind, location) -> dict:
        st = dict(self.state)
        st["total"] = st["elementwise"] + st["replicated"]
        st["by_rule"] = nonzero_rules(st["by_rule"])
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


def _check(engine, world, zero_stage, offload) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is invalid: allowed are {', '.join(ENGINES)}")
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world={world!r} is invalid: allowed is an integer >= 1")
    if engine == "deepspeed" and zero_stage not in (1, 2, 3):
        raise ValueError(f"zero={zero_stage!r} is invalid: allowed are 1, 2, 3")
    if offload and engine != "deepspeed":
        raise ValueError("offload=True models DeepSpeed's offload_optimizer: use engine='deepspeed'")


def _stage12(accs, rules, params, specs, world, pdtype, pbytes, offload) -> None:
    """ZeRO-1/2: one flat per group, padded (zero_layout.padded_size), cut into equal partitions."""
    sizes = [p.numel for p in params]
    padded = zero_layout.padded_size(sum(sizes), world)
    P = padded // world
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    for r, a in enumerate(accs):
        a.add_param(pdtype, padded * pbytes)
        held = [zero_layout.member_range(s0, n, r * P, (r + 1) * P)
                for s0, n in zip(starts, sizes)]
        if offload:
            a.grads += P * FP32        # the persistent fp32 partition gradient on the host
        else:                          # whole gradients of params overlapping [rP, rP+P)
            a.grads += sum(n for n, (lo, hi, _) in zip(sizes, held) if hi > lo) * pbytes
        a.master += P * FP32
        a.add_rule_state(rules, specs, [hi - lo for lo, hi, _ in held], P)


def _stage3(accs, rules, params, specs, world, pdtype, pbytes, offload, sub_group_size,
            persistence_threshold) -> None:
    """ZeRO-3: zero_layout.stage3_partition_numel elements per parameter per rank, in sub-groups."""
    subgroups, cur, running = [], [], 0
    for rule, p, s in zip(rules, params, specs):
        pn = zero_layout.stage3_partition_numel(p.numel, world)
        cur.append((rule, p, s, pn))
        running += pn
        if running >= sub_group_size:
            subgroups.append(cur)
            cur, running = [], 0
    if cur:
        subgroups.append(cur)
    for r, a in enumerate(accs):
        for sg in subgroups:
            n_sg = sum(pn for *_, pn in sg)
            a.add_param(pdtype, n_sg * pbytes)
            for _, p, _, _ in sg:
                if p.numel <= persistence_threshold:
                    a.add_param(pdtype, p.numel * pbytes)   # kept whole on every rank
            a.grads += n_sg * pbytes
            if offload:
                a.grads += n_sg * FP32          # fp32 sub-group gradient on the host
            a.master += n_sg * FP32
            helds = [b - lo for lo, b in (zero_layout.stage3_range(p.numel, world, r)
                                          for _, p, _, _ in sg)]
            a.add_rule_state([x[0] for x in sg], [x[2] for x in sg], helds, n_sg)


def estimate_ranks(model, world: int, engine: str = "deepspeed", zero: int = 2,
                   recipe: str = "sage-hybrid", bf16: bool = False, offload: bool = False, *,
                   head: str = "sage", overrides=None, state_dtype="float32",
                   sub_group_size: int = DS_SUB_GROUP_SIZE,
                   persistence_threshold: int = DS_PERSISTENCE_THRESHOLD,
                   merge: bool | None = None) -> list[dict]:
    """Every rank's estimated record (same keys as `measure`), from shapes only.

    engine: 'local' / 'ddp' (every rank holds everything), 'fsdp2' (sage_dist.fsdp.shard_llama:
    fp32 sharded parameters, bf16 only for compute), 'deepspeed' with `zero` 1, 2 or 3
    (DeepSpeed 0.19 defaults: no round-robin gradients, no parameter_alignment, default
    sub_group_size and stage3_param_persistence_threshold). bf16: DeepSpeed's bf16 mode (16-bit
    parameters and gradients, fp32 master); offload: DeepSpeed's offload_optimizer to CPU.
    state_dtype: the optimizer's elementwise state ('float32' or 'bfloat16', as
    RoutedOptimizer's option of that name). merge: whether the optimizer's groups were merged
    (build_optimizer's option); None: as sage_dist.deepspeed builds them (merged under
    DeepSpeed ZeRO-1/2 where `merge_pays`, else not).
    """
    from ..optim.optimizer import parse_state_dtype
    stage = zero
    state_elem_bytes = torch.empty((), dtype=parse_state_dtype(state_dtype)).element_size()
    shapes = model if isinstance(model, ModelShapes) else model_shapes(model, recipe, head, overrides)
    _check(engine, world, stage, offload)
    ds = engine == "deepspeed"
    pbytes = 2 if (bf16 and ds) else FP32
    pdtype = "bfloat16" if pbytes == 2 else "float32"
    kind = f"deepspeed-zero{stage}" if ds else engine
    host = "host" if offload else "device"
    location = {"parameters": "device", "gradients": host if ds else "device",
                "master_weights": host, "optimizer_state": host}
    accs = [_Acc(state_elem_bytes) for _ in range(world)]

    if merge not in (None, True, False):
        raise ValueError(f"merge={merge!r} is invalid: allowed are None, True, False")
    merged = merge if merge is not None else ds and merge_pays(
        shapes, world, stage, recipe, bf16, offload, state_dtype=state_dtype,
        sub_group_size=sub_group_size, persistence_threshold=persistence_threshold)
    for rules, params in shapes.merged if merged else shapes.groups:
        specs = [_spec(rule, p.shape) for rule, p in zip(rules, params)]
        if engine in ("local", "ddp"):
            for a in accs:
                for rule, p, s in zip(rules, params, specs):
                    a.add_param(pdtype, p.numel * pbytes)
                    a.grads += p.numel * pbytes
                    a.add_rule_state([rule], [s], [p.numel], p.numel)
        elif engine == "fsdp2":
            for rule, p, s in zip(rules, params, specs):
                R, rowlen = _rows(p.shape)
                chunk = -(-R // world)
                for r, a in enumerate(accs):
                    held = max(0, min(chunk, R - r * chunk)) * rowlen
                    a.add_param(pdtype, chunk * rowlen * pbytes)   # FSDP2 pads every shard
                    a.grads += chunk * rowlen * pbytes             # reduce-scatter output, padded
                    a.add_rule_state([rule], [s], [held], held)
        elif stage in (1, 2):
            _stage12(accs, rules, params, specs, world, pdtype, pbytes, offload)
        else:
            _stage3(accs, rules, params, specs, world, pdtype, pbytes, offload, sub_group_size,
                    persistence_threshold)
    transient = {}
    if ds:   # modelled from DeepSpeed 0.19's code, not part of the total (see docs/MEMORY.md)
        transient["reduce_bucket"] = DS_REDUCE_BUCKET_SIZE * pbytes
        if stage == 1 and not offload:
            transient["whole_gradients_end_of_backward"] = shapes.total_params * pbytes
    recs = [a.record(r, world, kind, location) for r, a in enumerate(accs)]
    for rec in recs:
        rec["transient"] = dict(transient)
    return recs


def merge_pays(model, world: int, zero: int = 2, recipe: str = "sage-hybrid",
               bf16: bool = False, offload: bool = False, *, head: str = "sage",
               overrides=None, hyperparameters: dict | None = None, **kw) -> bool:
    """Whether merged param groups (optim/groups.py) leave DeepSpeed ZeRO-1/2's most loaded
    rank with less device memory than one group per category.

    Merging trades one thing for another. In one group per category every rank's partition
    touches the embedding and the head, so every rank holds their whole gradients (DeepSpeed
    keeps whole gradients of the parameters its partition touches); merged, only the ranks
    whose partitions they span do, but those ranks then also hold all of the embedding's and
    the head's optimizer state, which one group per category spreads over every rank. Which
    is smaller depends on the model, world size, precision and recipe; the estimator (equal
    to the measurement) decides. ZeRO-3 partitions every parameter on its own: no merge."""
    if zero not in (1, 2):
        return False
    _check("deepspeed", world, zero, offload)
    shapes = model if isinstance(model, ModelShapes) else model_shapes(
        model, recipe, head, overrides, hyperparameters=hyperparameters)
    most = [max(r["device_total"] for r in estimate_ranks(
        shapes, world, "deepspeed", zero, recipe, bf16, offload, merge=m, **kw))
        for m in (True, False)]
    return most[0] < most[1]


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
