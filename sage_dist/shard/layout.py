"""Layout adapters: turn what an engine hands the optimizer into fragments, and keep state.

An optimizer "entry" is what sits in param_groups: a parameter (one process, DDP, FSDP2) or a
flat partition holding pieces of many parameters (DeepSpeed ZeRO). A layout yields the
fragments of an entry, creates the entry's state, and gives each fragment views of it.

The local layout covers one process and DDP: every rank holds whole parameters, so no
statistic needs communication.
"""
from __future__ import annotations

import torch

from .fragment import Fragment, global_shape, matrix_shape
from .span import Span
from .stats import StatsReducer


class Layout:
    """One fragment per entry; state keyed by the entry, elementwise state shaped like it."""

    name = "base"
    reducer: StatsReducer

    def fragments(self, entry: torch.Tensor, name: str) -> list[Fragment]:
        raise NotImplementedError

    def new_elementwise(self, p: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Zero state (fp32 unless asked) holding one value per element of `p`, placed like `p`."""
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)

    def local_flat(self, t: torch.Tensor) -> torch.Tensor:
        """The flat local view of an elementwise state tensor (shares its storage)."""
        return t.view(-1)

    def new_state(self, entry: torch.Tensor, rule, dtype=torch.float32) -> dict:
        shape = global_shape(entry)
        spec = rule.state_spec(shape, *matrix_shape(shape))
        st = {}
        if spec.step:
            st["step"] = torch.zeros((), dtype=torch.float32)
        for key in spec.elementwise:
            st[key] = self.new_elementwise(entry, dtype)
        for key, n in spec.replicated.items():
            st[key] = torch.zeros(n, dtype=torch.float32, device=entry.device)
        return st

    def state_views(self, f: Fragment, state: dict, rule) -> dict:
        """The fragment's part of its entry's state: flat local views, shared storage."""
        spec = rule.state_spec(f.shape, f.rows, f.cols)
        return {k: self.local_flat(v) if k in spec.elementwise else v for k, v in state.items()}

    def elementwise_keys(self, entry: torch.Tensor, rule) -> set[str]:
        shape = global_shape(entry)
        return set(rule.state_spec(shape, *matrix_shape(shape)).elementwise)


class LocalLayout(Layout):
    """Each fragment is a whole parameter held by this process."""

    name = "local"

    def __init__(self):
        self.reducer = StatsReducer(None)

    def fragments(self, p: torch.Tensor, name: str) -> list[Fragment]:
        shape = global_shape(p)
        R, C = matrix_shape(shape)
        grad = p.grad
        if grad is not None and not grad.is_sparse:
            grad = grad.reshape(-1)
        return [Fragment(name=name, param=p, shape=shape, span=Span(R, C, 0, R * C),
                         data=p.detach().reshape(-1), grad=grad, whole=True, rows_local=True)]


def make_layout(named_params: list[tuple[str, torch.Tensor]]) -> Layout:
    """The layout for these parameters: DTensor (FSDP2/HSDP) if any is a DTensor, else local."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for _, p in named_params):
        from .dtensor import DTensorLayout
        return DTensorLayout(named_params)
    return LocalLayout()
