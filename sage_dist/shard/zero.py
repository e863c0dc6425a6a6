"""Layout of DeepSpeed ZeRO partitions: flat fp32 tensors that cut through parameters.

DeepSpeed hands the client optimizer one flat fp32 tensor per param group (ZeRO-1/2, and
BF16_Optimizer) or per sub-group (ZeRO-3). A flat holds, for each of its member parameters,
a contiguous range [a, b) of that parameter's row-major flat index, at some offset, which
may start and end mid-row; ranks that hold nothing of a member still know it. The map from
each flat to (member, range, offset) is rebuilt here from DeepSpeed's partitioning
bookkeeping, once, right after deepspeed.initialize.

State is keyed by the flat (what DeepSpeed checkpoints and offloads): elementwise state is a
flat-shaped fp32 tensor; per-member replicated state (SAGE's per-column S) is one fp32
vector per flat holding every member's piece; step counts are one entry per member.
A flat of a mixed group (members under different rules) packs a key over the members that
keep it (shard/flat_state.py).
Every member takes part in every statistics phase on every rank (zeros where nothing is
held), so replicated state stays identical on all ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .fragment import Fragment, matrix_shape
from . import flat_state
from .layout import Layout, as_rules, state_sizes
from ..ops.span import Span
from .stats import StatsReducer

TESTED_DEEPSPEED = ("0.19.8",)
# Every DeepSpeed internal this project reads, by the object that carries it. Nothing outside
# this module reads them (tests/test_layers.py greps for it), and `check_version` verifies the
# wrapper's at initialize, so a DeepSpeed that moved one fails there, naming it.
_REQUIRED = {
    "DeepSpeedZeroOptimizer": ("single_partition_of_fp32_groups", "round_robin_bit16_groups",
                               "round_robin_bit16_offsets", "round_robin_bit16_meta",
                               "bit16_groups_flat", "partition_size", "real_dp_process_group",
                               "update_lp_params"),
    "BF16_Optimizer": ("fp32_groups_flat_partition", "bf16_groups", "bf16_groups_flat",
                       "real_dp_process_group", "update_lp_params"),
    "DeepSpeedZeroOptimizer_Stage3": ("fp32_partitioned_groups_flat", "fp16_groups",
                                      "sub_group_to_group_id", "_get_sub_group_process_group",
                                      "grad_position", "get_param_id",
                                      "fp16_partitioned_groups_flat", "persistent_parameters"),
}
# Read where present (gradient storage differs by stage and options), on the wrapper.
GRADIENT_BUFFERS = ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer",
                    "fp32_groups_gradients_flat")
# On the engine, and on ZeRO-3 parameters.
ENGINE_ATTRIBUTES = ("basic_optimizer",)
PARAM_ATTRIBUTES = ("ds_shape", "ds_numel", "ds_tensor", "partition_numel", "allreduce")
# On the ZeRO wrappers: set by their step() when the global gradient norm was NaN/Inf, in which
# case the whole step was skipped on every rank (the client optimizer was not called).
STEP_ATTRIBUTES = ("overflow",)
DEEPSPEED_ATTRIBUTES = frozenset(a for attrs in _REQUIRED.values() for a in attrs) | frozenset(
    GRADIENT_BUFFERS + ENGINE_ATTRIBUTES + PARAM_ATTRIBUTES + STEP_ATTRIBUTES)
# DeepSpeed 0.19's nccl_start_alignment_factor: ZeRO-1/2 pad each group's flat to a multiple of
# this times the world size (stage_1_and_2.py).
ALIGNMENT_FACTOR = 2


# -- what the rest of the project may ask of a DeepSpeed engine --------------------------------
def is_engine(obj) -> bool:
    """Whether `obj` is a DeepSpeed engine (what deepspeed.initialize returns first)."""
    return all(hasattr(obj, a) for a in ("basic_optimizer", "module", "optimizer"))


def client_optimizer(engine):
    """The optimizer the caller handed DeepSpeed (ours), inside its ZeRO wrapper."""
    return engine.basic_optimizer


def wrapper_of(engine):
    """DeepSpeed's ZeRO / BF16 wrapper around the client optimizer (None without one)."""
    wrapper = engine.optimizer
    return None if wrapper is client_optimizer(engine) else wrapper


def step_skipped(engine) -> bool:
    """Whether DeepSpeed's last optimizer step skipped the update because the global gradient
    norm (all-reduced, so every rank agrees) was NaN/Inf: ZeRO-1/2/3 then zero the gradients and
    never call the client optimizer (DeepSpeed 0.19's overflow path, also in fp32 and bf16)."""
    wrapper = wrapper_of(engine)
    return bool(getattr(wrapper, "overflow", False)) if wrapper is not None else False


def ds_shape(p):
    """The full shape of a ZeRO-3 partitioned parameter, None for any other tensor."""
    shape = getattr(p, "ds_shape", None)
    return None if shape is None else tuple(shape)


def numel(p) -> int:
    """Elements of the whole parameter (a ZeRO-3 parameter's local tensor is empty)."""
    return getattr(p, "ds_numel", None) or p.numel()


def is_expert_param(p) -> bool:
    """DeepSpeed MoE marks expert parameters (reduced over expert groups) allreduce=False."""
    return getattr(p, "allreduce", True) is False


def param_partition(p):
    """This rank's partition of a ZeRO-3 parameter (None for other tensors)."""
    return getattr(p, "ds_tensor", None)


def fp32_partitions(wrapper) -> list:
    """The fp32 master partitions the client optimizer updates (every ZeRO stage)."""
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat",
                 "fp32_groups_flat_partition"):
        flats = getattr(wrapper, attr, None)
        if flats:
            return list(flats)
    return []


def gradient_buffers(wrapper) -> list:
    """Gradient storage DeepSpeed keeps outside `p.grad` (lists, dicts, buffer groups)."""
    return [getattr(wrapper, a) for a in GRADIENT_BUFFERS if getattr(wrapper, a, None) is not None]


# -- the partitioning arithmetic, shared with the memory estimator ------------------------------
def padded_size(total: int, world: int) -> int:
    """A ZeRO-1/2 group's flat size: its parameters padded to ALIGNMENT_FACTOR x world."""
    k = ALIGNMENT_FACTOR * world
    return -(-total // k) * k


def member_range(start: int, size: int, lo: int, hi: int) -> tuple[int, int, int]:
    """The part of a member at flat [start, start + size) that the partition [lo, hi) holds:
    (a, b, offset) with [a, b) in the member's own flat index and offset inside the partition;
    (0, 0, 0) when it holds none."""
    a, b = max(start, lo), min(start + size, hi)
    return (a - start, b - start, a - lo) if a < b else (0, 0, 0)


def stage3_partition_numel(numel: int, world: int) -> int:
    """ZeRO-3 gives every rank ceil(numel / world) elements of a parameter (the last padded)."""
    return -(-numel // world)


def stage3_range(numel: int, world: int, rank: int) -> tuple[int, int]:
    """The elements [a, b) of a ZeRO-3 parameter that `rank` holds (a == b: none)."""
    pn = stage3_partition_numel(numel, world)
    return min(rank * pn, numel), min((rank + 1) * pn, numel)


@dataclass
class Member:
    """One parameter inside a flat: where its held range sits (a == b: nothing held here)."""

    name: str
    shape: tuple[int, ...]
    a: int
    b: int
    offset: int
    rule: str | None = None     # its rule's name where known (needed in a mixed group)
    # Where the ranks' ranges meet inside the member (its own flat index, 0 < e < numel), the
    # same on every rank: from them the rows that straddle a partition (Fragment.straddle_rows).
    cuts: tuple[int, ...] = ()

    def straddle_rows(self) -> tuple[int, ...]:
        C = matrix_shape(self.shape)[1]
        return tuple(sorted({e // C for e in self.cuts if e % C}))


def cuts_of(start: int, size: int, bounds) -> tuple[int, ...]:
    """The partition boundaries (flat positions) that fall strictly inside a member at flat
    [start, start + size), in its own index."""
    return tuple(q - start for q in bounds if start < q < start + size)


@dataclass
class FlatEntry:
    flat: torch.Tensor          # strong reference: the id stays valid
    group_index: int            # index into the client optimizer's param_groups
    members: list[Member]       # every parameter of the flat, same list on every rank


def check_version(wrapper) -> None:
    """Fail at initialize, naming what is missing, if DeepSpeed's internals moved."""
    import deepspeed

    kind = type(wrapper).__name__
    if kind not in _REQUIRED:
        raise NotImplementedError(
            f"DeepSpeed wrapped the optimizer in {kind}; sage_dist supports "
            f"{', '.join(_REQUIRED)} (ZeRO stages 1, 2 and 3)")
    missing = [a for a in _REQUIRED[kind] if not hasattr(wrapper, a)]
    if missing:
        raise RuntimeError(
            f"DeepSpeed {deepspeed.__version__}: {kind} has no attribute "
            f"{', '.join(missing)}, which sage_dist's ZeRO layout reads; supported DeepSpeed "
            f"versions: {', '.join(TESTED_DEEPSPEED)}")


def _stage12_entries(opt, names, rules) -> list[FlatEntry]:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    bf16 = isinstance(opt, BF16_Optimizer)
    flats = opt.fp32_groups_flat_partition if bf16 else opt.single_partition_of_fp32_groups
    out = []
    for i, flat in enumerate(flats):
        pg = opt.real_dp_process_group[i]
        rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
        total = (opt.bf16_groups_flat if bf16 else opt.bit16_groups_flat)[i].numel()
        P = total // world
        if P != flat.numel():
            raise RuntimeError(f"DeepSpeed partition of group {i} has {flat.numel()} elements, "
                               f"expected {P}: unsupported partitioning")
        if bf16:  # client order, packed
            params = opt.bf16_groups[i]
            offsets = [sum(p.numel() for p in params[:j]) for j in range(len(params))]
        else:     # round-robin order, with any per-parameter alignment padding
            params, offsets = opt.round_robin_bit16_groups[i], opt.round_robin_bit16_offsets[i]
        members, bounds = [], [k * P for k in range(1, world)]
        for p, off in zip(params, offsets):
            a, b, o = member_range(off, p.numel(), rank * P, (rank + 1) * P)
            members.append(Member(names.get(id(p), f"group{i}.param"), tuple(p.shape), a, b, o,
                                  rules.get(id(p)), cuts_of(off, p.numel(), bounds)))
        out.append(FlatEntry(flat, i, members))
    return out


def _stage3_entries(opt, names, rules) -> list[FlatEntry]:
    out = []
    for k, (flat, params) in enumerate(zip(opt.fp32_partitioned_groups_flat, opt.fp16_groups)):
        pg = opt._get_sub_group_process_group(k)
        rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
        members, off = [], 0
        for p in params:
            pn = stage3_partition_numel(p.ds_numel, world)
            if p.partition_numel() != pn or \
                    tuple(opt.grad_position[opt.get_param_id(p)]) != (k, off, pn):
                raise RuntimeError("DeepSpeed ZeRO-3 partition bookkeeping disagrees with "
                                   "sage_dist's layout: unsupported DeepSpeed version")
            a, b = stage3_range(p.ds_numel, world, rank)
            bounds = [stage3_range(p.ds_numel, world, q)[0] for q in range(1, world)]
            members.append(Member(names.get(id(p), f"subgroup{k}.param"), tuple(p.ds_shape),
                                  a, b, off, rules.get(id(p)), cuts_of(0, p.ds_numel, bounds)))
            off += pn
        if off != flat.numel():
            raise RuntimeError(f"ZeRO-3 sub-group {k}: members fill {off} of {flat.numel()} "
                               f"elements: unsupported partitioning")
        out.append(FlatEntry(flat, opt.sub_group_to_group_id[k], members))
    return out


class ZeroLayout(Layout):
    """Fragments of DeepSpeed ZeRO-1/2/3 flat partitions (and of BF16_Optimizer's)."""

    name = "zero"

    def __init__(self, wrapper, names: dict[int, str], rules: dict[int, str] | None = None):
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

        check_version(wrapper)
        self.stage3 = isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3)
        entries = (_stage3_entries if self.stage3 else _stage12_entries)(wrapper, names,
                                                                           rules or {})
        self.entries_by_id = {id(e.flat): e for e in entries}
        group = (wrapper._get_sub_group_process_group(0) if self.stage3
                 else wrapper.real_dp_process_group[0])
        self.world = dist.get_world_size(group=group)
        self.reducer = StatsReducer(group if self.world > 1 else None)

    @classmethod
    def of(cls, engine, names: dict[int, str], rules: dict[int, str] | None = None
           ) -> "ZeroLayout":
        """The layout of a DeepSpeed engine's partitions; `names` (and `rules`) map
        id(parameter) to its name (and its rule's name), taken before deepspeed.initialize
        (which swaps the param groups' tensors)."""
        return cls(wrapper_of(engine), names, rules)

    def entries(self, param_groups):
        """Every flat, whatever param_groups holds now: under ZeRO-3 DeepSpeed empties the
        groups between steps."""
        return [(e.flat, param_groups[e.group_index]) for e in self.entries_by_id.values()]

    def attach(self, optimizer) -> None:
        # The groups now hold flat partitions: names of the original parameters no longer
        # line up with 'params' (the members keep them).
        for group in optimizer.param_groups:
            group.pop("param_names", None)

    def entry(self, flat: torch.Tensor) -> FlatEntry:
        e = self.entries_by_id.get(id(flat))
        if e is None or e.flat is not flat:
            raise RuntimeError("the optimizer was handed a tensor that is not one of DeepSpeed's "
                               "partitions it was attached to; build it through "
                               "sage_dist.deepspeed.initialize")
        return e

    def fragments(self, flat: torch.Tensor, name: str) -> list[Fragment]:
        out = []
        grad = flat.grad
        for i, m in enumerate(self.entry(flat).members):
            R, C = matrix_shape(m.shape)
            n = m.b - m.a
            sl = slice(m.offset, m.offset + n)
            out.append(Fragment(name=m.name, param=flat, shape=m.shape,
                                span=Span(R, C, m.a, m.b), data=flat.data[sl],
                                grad=None if grad is None else grad[sl],
                                whole=self.world == 1, rows_local=self.world == 1, slot=i,
                                straddle_rows=m.straddle_rows()))
        return out

    def member_rules(self, flat, group: dict, index: int | None = None) -> list[str]:
        e = self.entry(flat)
        if group.get("rules") is not None and any(m.rule is None for m in e.members):
            raise RuntimeError(f"param group {e.group_index} routes its parameters to several "
                               f"rules, and the layout was built without them: build it "
                               f"through sage_dist.deepspeed.initialize")
        return [m.rule or group["rule"] for m in e.members]

    # -- state: one set of tensors per flat ------------------------------------------------
    def _specs(self, e: FlatEntry, rule):
        return [r.state_spec(m.shape, *matrix_shape(m.shape))
                for r, m in zip(as_rules(rule, len(e.members)), e.members)]

    def new_state(self, flat: torch.Tensor, rule, dtype=torch.float32) -> dict:
        e = self.entry(flat)
        return flat_state.new_state(flat, e.members, self._specs(e, rule), dtype,
                                    f"param group {e.group_index}")

    def member_state(self, flat, i: int, state: dict, rule) -> dict:
        e = self.entry(flat)
        return flat_state.member_state(e.members, self._specs(e, rule), flat.numel(), i, state)

    def elementwise_keys(self, flat, rule) -> set[str]:
        return state_sizes(self._specs(self.entry(flat), rule), flat.numel())[0]

    def state_owners(self, flat, rule):
        e = self.entry(flat)
        rules = as_rules(rule, len(e.members))
        if len({r.name for r in rules}) <= 1:
            return None
        return flat_state.owners(e.members, self._specs(e, rules), [r.name for r in rules],
                                 flat.numel())

    def local_flat(self, t):
        return t.view(-1)

    def gather(self, flat: torch.Tensor, values: torch.Tensor, key: str | None = None,
               rule=None) -> list[torch.Tensor | None]:
        """Whole fp32 tensors of every member of `flat`, from a flat-shaped local tensor (the
        flat itself, its grad, or elementwise state), assembled across ranks with one
        all-reduce on the tensors' own device (NCCL groups need GPU tensors). For elementwise
        state give its `key` and the members' `rule`: a packed key yields None for the members
        that do not keep it. Collective: every rank of the group must call it for the same
        flat."""
        e = self.entry(flat)
        offsets = [m.offset for m in e.members]
        if key is not None:
            offsets = flat_state.packing(e.members, self._specs(e, rule), flat.numel())[key][1]
        fulls = [torch.zeros(math.prod(m.shape) if off is not None else 0, dtype=torch.float32,
                             device=values.device) for m, off in zip(e.members, offsets)]
        for full, m, off in zip(fulls, e.members, offsets):
            if off is not None:
                full[m.a:m.b] = values[off:off + (m.b - m.a)].float()
        if self.world > 1 and fulls:
            buf = torch.cat(fulls)
            dist.all_reduce(buf, group=self.reducer.group)
            fulls = list(torch.split(buf, [f.numel() for f in fulls]))
        return [None if off is None else f.view(m.shape)
                for f, m, off in zip(fulls, e.members, offsets)]


def refresh_model_weights(engine) -> None:
    """Copy the fp32 masters into the low-precision model weights, as DeepSpeed's step does
    (after the masters were loaded from outside DeepSpeed)."""
    wrapper = wrapper_of(engine)
    if hasattr(wrapper, "update_lp_params"):          # ZeRO-1/2, BF16_Optimizer
        wrapper.update_lp_params()
        return
    for lp, fp32 in zip(wrapper.fp16_partitioned_groups_flat,
                        wrapper.fp32_partitioned_groups_flat):   # ZeRO-3
        lp.data.copy_(fp32.data)
    if wrapper.persistent_parameters:
        wrapper.persistent_parameters[0].all_gather(wrapper.persistent_parameters)
