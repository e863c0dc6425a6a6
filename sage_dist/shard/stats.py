"""The statistics exchange: one all-reduce completes one phase for every parameter at once."""
from __future__ import annotations

import torch
import torch.distributed as dist


class StatsReducer:
    """Sums partial statistics across the data-parallel shard group, counting what it sends.

    `group=None` means no communication (one process, or every rank holds whole parameters).
    """

    def __init__(self, group=None):
        self.group = group
        self.floats = 0        # floats all-reduced since the counters were last reset
        self.collectives = 0   # all-reduce calls since the counters were last reset

    def reset_counters(self) -> None:
        self.floats = 0
        self.collectives = 0

    def all_reduce(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum each tensor across the group with ONE collective; returns tensors of the same sizes."""
        if self.group is None or not parts:
            return parts
        flat = torch.cat([p.reshape(-1).float() for p in parts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        self.floats += flat.numel()
        self.collectives += 1
        return list(torch.split(flat, [p.numel() for p in parts]))
