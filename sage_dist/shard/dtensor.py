"""Layout of DTensor parameters: FSDP2's Shard(0) on a 1-D mesh, and HSDP's
(Replicate(), Shard(0)) on a 2-D mesh.

FSDP2 cuts dim 0 like torch.chunk: ceil(R / W) rows per rank, so trailing ranks may hold fewer
rows or none. Each rank's fragment is therefore whole rows [r0, r1): row statistics are
complete locally and only column and whole-tensor statistics travel, over the shard dimension
of the mesh only (FSDP already averaged gradients over the replicate dimension). Under HSDP
the replicas also agree on which gradients are finite (StatsReducer.agree).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from .fragment import Fragment, global_shape, matrix_shape
from .layout import Layout
from ..ops.span import Span
from .stats import StatsReducer


def _shard_dim_of(name: str, p: DTensor) -> int | None:
    """Mesh dim that shards dim 0 of `p`, None if fully replicated; refuse anything else."""
    shard_dims = []
    for mesh_dim, pl in enumerate(p.placements):
        if isinstance(pl, Shard):
            if pl.dim != 0:
                raise NotImplementedError(
                    f"parameter {name!r} has placements {tuple(p.placements)}: sharding on "
                    f"dim {pl.dim} is not supported (FSDP2 shards dim 0; supported are "
                    f"(Shard(0),) and (Replicate(), Shard(0)))")
            shard_dims.append(mesh_dim)
        elif not isinstance(pl, Replicate):
            raise NotImplementedError(
                f"parameter {name!r} has placements {tuple(p.placements)}: placement {pl} is "
                f"not supported (supported are (Shard(0),) and (Replicate(), Shard(0)))")
    if len(shard_dims) > 1 or (shard_dims and shard_dims[0] != p.device_mesh.ndim - 1):
        raise NotImplementedError(
            f"parameter {name!r} has placements {tuple(p.placements)} on a "
            f"{p.device_mesh.ndim}-D mesh: tensor-parallel or multi-dim sharding is not "
            f"supported (supported are (Shard(0),) and (Replicate(), Shard(0)))")
    return shard_dims[0] if shard_dims else None


class DTensorLayout(Layout):
    """Fragments of DTensor parameters that all live on one device mesh."""

    name = "dtensor"

    def __init__(self, named_params: list[tuple[str, torch.Tensor]]):
        meshes, shard_dim = [], None
        for name, p in named_params:
            if not isinstance(p, DTensor):
                raise ValueError(f"parameter {name!r} is a plain tensor but others are DTensors: "
                                 f"apply fully_shard to the whole model (its root too) "
                                 f"before building the optimizer")
            d = _shard_dim_of(name, p)
            if not any(p.device_mesh == m for m, _ in meshes):
                meshes.append((p.device_mesh, name))
            shard_dim = d if d is not None else shard_dim
        if len(meshes) > 1:
            (m0, n0), (m1, n1) = meshes[:2]
            raise ValueError(f"parameters on different device meshes in one optimizer: "
                             f"{n0!r} on {m0} and {n1!r} on {m1}; build one optimizer per mesh")
        self.mesh = meshes[0][0] if meshes else None
        self.shard_mesh_dim = shard_dim
        group = None
        if self.mesh is not None and shard_dim is not None:
            group = self.mesh.get_group(shard_dim)
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        replicas = None   # HSDP (Replicate(), Shard(0)): the replicate dimension's group
        if self.mesh is not None and self.mesh.ndim == 2 and shard_dim == 1:
            replicas = self.mesh.get_group(0)
            replicas = replicas if dist.get_world_size(replicas) > 1 else None
        self.reducer = StatsReducer(group if self.world > 1 else None, replicas)

    def _rows(self, p: DTensor, R: int) -> tuple[int, int]:
        if _shard_dim_of("", p) is None:
            return 0, R
        chunk = -(-R // self.world)
        r0 = min(self.rank * chunk, R)
        return r0, min(r0 + chunk, R)

    def fragments(self, p: DTensor, name: str) -> list[Fragment]:
        shape = global_shape(p)
        R, C = matrix_shape(shape)
        local = p.to_local()
        if len(shape) <= 1 and _shard_dim_of(name, p) is not None:
            r0, r1 = self._rows(p, C)       # a sharded vector: elements, one "row"
            start, end = r0, r1
        else:
            r0, r1 = self._rows(p, R)
            start, end = r0 * C, r1 * C
        if local.numel() != end - start:
            raise RuntimeError(f"{name}: local shard has {local.numel()} elements, expected "
                               f"{end - start} (rows [{r0}, {r1}) of {shape}); the sharding "
                               f"does not follow FSDP2's torch.chunk layout")
        grad = p.grad.to_local().reshape(-1) if p.grad is not None else None
        whole = self.world == 1 or _shard_dim_of(name, p) is None
        return [Fragment(name=name, param=p, shape=shape,
                         span=Span(R, C, start, end), data=local.view(-1), grad=grad,
                         whole=whole, rows_local=len(shape) >= 2)]

    def new_elementwise(self, p: DTensor, dtype=torch.float32) -> DTensor:
        local = torch.zeros_like(p.to_local(), dtype=dtype)
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())

    def local_flat(self, t: torch.Tensor) -> torch.Tensor:
        return (t.to_local() if isinstance(t, DTensor) else t).view(-1)
