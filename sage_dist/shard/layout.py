"""Layout adapters: turn what an engine hands the optimizer into fragments.

The local layout covers one process and DDP: every rank holds whole parameters, so no
statistic needs communication. Sharded layouts live beside it and share the same interface.
"""
from __future__ import annotations

import torch

from .fragment import Fragment, global_shape, matrix_shape
from .span import Span
from .stats import StatsReducer


class LocalLayout:
    """Each fragment is a whole parameter held by this process."""

    name = "local"

    def __init__(self):
        self.reducer = StatsReducer(None)

    def fragment(self, index: int, name: str, p: torch.Tensor) -> Fragment:
        shape = global_shape(p)
        R, C = matrix_shape(shape)
        grad = p.grad
        if grad is not None and not grad.is_sparse:
            grad = grad.reshape(-1)
        return Fragment(index=index, name=name, param=p, shape=shape,
                        span=Span(R, C, 0, R * C), data=p.detach().reshape(-1), grad=grad,
                        whole=True, rows_local=True)

    def new_elementwise(self, p: torch.Tensor) -> torch.Tensor:
        """Zero fp32 state holding one value per element of `p`, placed like `p`."""
        return torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)

    def local_flat(self, t: torch.Tensor) -> torch.Tensor:
        """The flat local view of an elementwise state tensor (shares its storage)."""
        return t.view(-1)


def make_layout(named_params: list[tuple[str, torch.Tensor]]):
    """The layout for these parameters: DTensor (FSDP2/HSDP) if any is a DTensor, else local."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for _, p in named_params):
        from .dtensor import DTensorLayout
        return DTensorLayout(named_params)
    return LocalLayout()
