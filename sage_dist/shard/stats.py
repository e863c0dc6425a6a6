"""The statistics exchange: one all-reduce completes one phase for every parameter at once."""
from __future__ import annotations

import torch
import torch.distributed as dist


class StatsReducer:
    """Sums partial statistics across the data-parallel shard group, counting what it sends.

    `group=None` means no communication (one process, or every rank holds whole parameters).
    `replicas`: the group of ranks that hold the same shards (HSDP's replicate dimension);
    they sum no statistics (FSDP already averaged their gradients) but must agree on which
    gradients are finite (`agree`), or a NaN written into one replica's shard after the
    gradient reduction would leave the replicas holding different parameters.
    """

    def __init__(self, group=None, replicas=None):
        self.group = group
        self.replicas = replicas
        self.floats = 0        # floats all-reduced since the counters were last reset
        self.collectives = 0   # all-reduce calls since the counters were last reset

    def reset_counters(self) -> None:
        self.floats = 0
        self.collectives = 0

    def all_reduce(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum each tensor across the group with ONE collective; returns tensors of the same sizes."""
        return self._collective(parts, dist.ReduceOp.SUM, self.group)

    def agree(self, flags: list[torch.Tensor]) -> list[torch.Tensor]:
        """The maximum of each one-element finiteness flag over the replicas (one collective,
        HSDP only): a gradient non-finite on any replica counts as non-finite on all."""
        return self._collective(flags, dist.ReduceOp.MAX, self.replicas)

    def _collective(self, parts, op, group) -> list[torch.Tensor]:
        if group is None or not parts:
            return parts
        flat = torch.cat([p.reshape(-1).float() for p in parts])
        dist.all_reduce(flat, op=op, group=group)
        self.floats += flat.numel()
        self.collectives += 1
        return list(torch.split(flat, [p.numel() for p in parts]))
