"""Layout of DTensor parameters: FSDP2 and HSDP, tensor parallelism, and both together.

A rank holds a block of each parameter's [R, C] matrix view: rows [r0, r1) x columns
[c0, c1), stored row-major. Per mesh dim a parameter may be Replicate(), Shard(0) (rows;
FSDP2, TP's colwise weights and vocabulary-parallel embeddings), Shard(1) (columns; TP's
rowwise weights) or, where FSDP2 shards a TP-sharded dim 0 again, _StridedShard(0) followed by
the TP Shard(0) it splits (each rank still holds one block of rows). A 1-D parameter is one
row, so its Shard(0) cuts columns. Anything else is refused at construction, naming the
parameter and its placements. Shards follow torch.chunk (uneven sizes, ranks holding nothing).

Parameters may sit on different meshes of one root mesh, as FSDP2 over TP leaves them (TP
weights on the 2-D (dp, tp) mesh, the rest on its dp sub-mesh); their dims are matched to the
root's by name.

Statistics. Mesh dims on which every parameter is replicated (HSDP's replicate dim) carry no
statistics: FSDP already averaged the gradients there, and the replicas only agree on which
gradients are finite (StatsReducer.agree). Every other dim is summed over, by ONE all-reduce
per phase over the group spanning them, each statistic a global-length vector (zeros where
this rank holds nothing: O(R + C) floats per matrix). Of ranks holding the same block of a
parameter (it is replicated over a summed dim, such as a norm weight over TP), only the one at
coordinate 0 adds its values; the others add zeros, so every element counts once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from .fragment import Fragment, global_shape, matrix_shape
from .layout import Layout
from ..ops.span import BlockSpan, Span
from .stats import StatsReducer

SUPPORTED = ("Replicate(), Shard(0), Shard(1) (matrices), and FSDP2's _StridedShard(0) over a "
             "TP Shard(0), on the mesh dims of one root mesh")


@dataclass(frozen=True)
class _Placed:
    """How one parameter is cut, in the root mesh's dims."""

    sharded: frozenset      # root dims that cut the parameter
    mesh_dims: tuple        # the root dim of each of the parameter's own mesh dims
    cuts: frozenset         # the tensor dims cut
    block: tuple            # (r0, r1, c0, c1) of the [R, C] matrix view held here


def _root(mesh):
    get = getattr(mesh, "_get_root_mesh", None)   # torch's own record of the parent mesh
    return get() if callable(get) else mesh


def _refuse(name, p, why):
    raise NotImplementedError(f"parameter {name!r} has placements {tuple(p.placements)} on a "
                              f"{p.device_mesh.ndim}-D mesh: {why}; supported are {SUPPORTED}")


def _tensor_dim(name, p, i, pl) -> int | None:
    """The tensor dim that mesh dim i cuts (None: replicated); refuse what rules cannot see."""
    if isinstance(pl, Replicate):
        return None
    if not isinstance(pl, (Shard, _StridedShard)):   # (not a Shard subclass in every torch)
        _refuse(name, p, f"placement {pl} is not supported")
    ndim = len(global_shape(p))
    allowed = (0,) if ndim <= 1 else (0, 1)
    if pl.dim not in allowed:
        _refuse(name, p, f"sharding on dim {pl.dim} is not supported (its elements would not "
                         f"form a block of the [R, C] matrix view)")
    if isinstance(pl, _StridedShard):
        later = [j for j in range(i + 1, len(p.placements))
                 if type(p.placements[j]) is Shard and p.placements[j].dim == pl.dim]
        if not later or pl.split_factor != math.prod(p.device_mesh.size(j) for j in later):
            _refuse(name, p, f"{pl} is supported only as FSDP2 leaves it, split by the later "
                             f"mesh dims that shard dim {pl.dim}")
    return pl.dim


class DTensorLayout(Layout):
    """Fragments (blocks) of DTensor parameters on the meshes of one root mesh."""

    name = "dtensor"

    def __init__(self, named_params: list[tuple[str, torch.Tensor]]):
        root, first = None, None
        for name, p in named_params:
            if not isinstance(p, DTensor):
                raise ValueError(f"parameter {name!r} is a plain tensor but others are DTensors: "
                                 f"apply fully_shard to the whole model (its root too) "
                                 f"before building the optimizer")
            r = _root(p.device_mesh)
            if root is None:
                root, first = r, name
            elif r != root:
                raise ValueError(f"parameters on different device meshes in one optimizer: "
                                 f"{first!r} on {root} and {name!r} on {r}; build one "
                                 f"optimizer per mesh")
        self.mesh = root
        self._placed: dict[int, _Placed] = {}
        for name, p in named_params:
            self._place(name, p)
        if root is None:
            self.pure, self.summed, self.coord = (), (), ()
            self.world, self.rank = 1, 0
            self.reducer = StatsReducer(None)
            return
        cut = set().union(*(pl.sharded for pl in self._placed.values()))
        self.summed = tuple(d for d in range(root.ndim) if d in cut)
        self.pure = tuple(d for d in range(root.ndim) if d not in cut)
        self.coord = tuple(root.get_coordinate() or ())
        group = _group_over(root, self.summed)
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        replicas = _group_over(root, self.pure)
        if replicas is not None and dist.get_world_size(replicas) == 1:
            replicas = None
        self.reducer = StatsReducer(group if self.world > 1 else None, replicas)

    def _place(self, name: str, p: DTensor) -> _Placed:
        got = self._placed.get(id(p))
        if got is not None:
            return got
        mesh, root = p.device_mesh, self.mesh
        if mesh == root:
            mesh_dims = tuple(range(mesh.ndim))
        else:
            names, rnames = mesh.mesh_dim_names, root.mesh_dim_names or ()
            if not names or any(n not in rnames for n in names):
                _refuse(name, p, f"its mesh {mesh} is not a sub-mesh of {root} by dim names")
            mesh_dims = tuple(rnames.index(n) for n in names)
        dims = [_tensor_dim(name, p, i, pl) for i, pl in enumerate(p.placements)]
        sharded = frozenset(mesh_dims[i] for i, d in enumerate(dims) if d is not None)
        placed = _Placed(sharded, mesh_dims, frozenset(d for d in dims if d is not None),
                         self._block(p))
        if hasattr(self, "pure") and sharded & set(self.pure):
            _refuse(name, p, "it is sharded on a mesh dim where the optimizer's other "
                             "parameters are all replicated; build the optimizer with all of "
                             "them at once")
        self._placed[id(p)] = placed
        return placed

    @staticmethod
    def _block(p: DTensor):
        """(r0, r1, c0, c1) of the [R, C] matrix view that this rank holds."""
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape = tuple(p.shape)
        size, offset = compute_local_shape_and_global_offset(shape, p.device_mesh, p.placements)
        R, C = matrix_shape(shape)
        if len(shape) <= 1:
            n0, o0 = (size[0], offset[0]) if shape else (1, 0)
            return 0, 1, o0, o0 + n0
        rest = math.prod(shape[2:])
        return offset[0], offset[0] + size[0], offset[1] * rest, (offset[1] + size[1]) * rest

    def fragments(self, p: DTensor, name: str) -> list[Fragment]:
        shape = global_shape(p)
        R, C = matrix_shape(shape)
        placed = self._place(name, p)
        local = p.to_local()
        r0, r1, c0, c1 = placed.block
        n = (r1 - r0) * (c1 - c0)
        if local.numel() != n or not local.is_contiguous():
            raise RuntimeError(f"{name}: local shard has {local.numel()} elements, expected "
                               f"{n} (rows [{r0}, {r1}) x columns [{c0}, {c1}) of {shape}, "
                               f"contiguous); the sharding does not follow torch.chunk")
        span = Span(R, C, r0 * C + c0, r0 * C + c0 + n) if (c0 == 0 and c1 == C) or R == 1 \
            else BlockSpan(R, C, r0, r1, c0, c1)
        grad = p.grad.to_local().reshape(-1) if p.grad is not None else None
        matrix = len(shape) >= 2
        whole = self.world == 1 or not placed.sharded
        # Of the ranks holding this block, the one at coordinate 0 of every summed dim that
        # does not cut the parameter adds its statistics.
        contributes = all(self.coord[d] == 0 for d in self.summed if d not in placed.sharded)
        return [Fragment(name=name, param=p, shape=shape, span=span, data=local.view(-1),
                         grad=grad, whole=whole, rows_local=matrix and 1 not in placed.cuts,
                         contributes=contributes)]

    def new_elementwise(self, p: DTensor, dtype=torch.float32) -> DTensor:
        local = torch.zeros_like(p.to_local(), dtype=dtype)
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())

    def local_flat(self, t: torch.Tensor) -> torch.Tensor:
        return (t.to_local() if isinstance(t, DTensor) else t).view(-1)


_GROUPS: dict = {}


def _group_over(root, dims: tuple):
    """The process group of the ranks that differ from this one only on mesh `dims` (None
    for no dims). One dim is the mesh's own group; several are created once per mesh, every
    rank creating every such group in the same order (dist.new_group is collective)."""
    if not dims:
        return None
    if len(dims) == 1:
        return root.get_group(dims[0])
    key = (tuple(root.mesh.shape), tuple(root.mesh.reshape(-1).tolist()), dims)
    if key not in _GROUPS:
        other = [d for d in range(root.ndim) if d not in dims]
        rows = root.mesh.permute(*other, *dims).reshape(-1, math.prod(root.size(d) for d in dims))
        me, mine = dist.get_rank(), None
        for ranks in rows.tolist():
            g = dist.new_group(ranks)
            if me in ranks:
                mine = g
        _GROUPS[key] = mine
    return _GROUPS[key]
