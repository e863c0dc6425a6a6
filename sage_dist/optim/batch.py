"""Batching of element-wise updates: the engine's policy, not the ops'.

Rules hand their element-wise updates (Lion's, SAGE's, the scaled Sinkhorn/SCALE step) to an
`UpdateBatch` instead of calling the single-tensor ops. At the end of each phase the engine
calls `flush()`, which issues every set of updates that shares an op, its hyperparameters and
a device as ONE multi-tensor call (on CUDA one launch per dtype pair). A rule must not read a
tensor it has handed over before the flush; the engine flushes before it writes finished
fragments back to their storage.

Whole matrices (`whole_sinkhorn`): a rule may queue in its first phase the whole Sinkhorn of a
matrix that one process holds; the engine flushes that phase before it reads the finiteness
flags, so all such matrices of a step run in one native call that spreads them over the
threads. With `fuse_whole_updates` (the engine's nonfinite='skip' with no HSDP replicas,
where a parameter's fate depends on its own gradient only) the same call also updates each
matrix whose gradient is finite, right after its scales, while the gradient is in cache;
otherwise the call returns the scales and the rule issues the update once the flags are known.
"""
from __future__ import annotations

import torch

from .. import ops

_HAS_KERNEL: dict[tuple[str, str], bool] = {}


def has_kernel(op: str, device_type: str) -> bool:
    """ops.has_kernel, cached (the registrations do not change after import)."""
    key = (op, device_type)
    if key not in _HAS_KERNEL:
        _HAS_KERNEL[key] = ops.has_kernel(op, device_type)
    return _HAS_KERNEL[key]


class WholeSinkhorn:
    """A queued whole-matrix Sinkhorn. `flag` ([1], fp32: 1 if the gradient is not finite)
    is filled in at the flush; then `r`, `c` hold the scales, or `updated` is True when the
    parameter was also updated in the same call (r and c are not kept then)."""

    __slots__ = ("flag", "r", "c", "updated")

    def __init__(self, flag, r=None, c=None, updated=False):
        self.flag, self.r, self.c, self.updated = flag, r, c, updated


class UpdateBatch:
    def __init__(self, fuse_whole_updates: bool = False):
        self.pending: dict[tuple, list] = {}
        self.fuse_whole_updates = fuse_whole_updates

    def _add(self, op, device, hp: tuple, tensors: tuple) -> None:
        self.pending.setdefault((op, device, hp), []).append(tensors)

    def lion(self, param, m, grad, lr, beta1, beta2, weight_decay) -> None:
        self._add(ops.lion_update_multi_, param.device,
                  (float(lr), float(beta1), float(beta2), float(weight_decay)),
                  (param, m, grad))

    def sage(self, param, m, grad, h, C, start, lr, beta1, beta2, weight_decay,
             momentum_first) -> None:
        self._add(ops.sage_update_multi_, param.device,
                  (float(lr), float(beta1), float(beta2), float(weight_decay),
                   bool(momentum_first)), (param, m, grad, h, int(C), int(start)))

    def scaled(self, param, grad, r, c, C, start, lr, weight_decay, step) -> None:
        """param <- param (1 - lr wd) - step (grad r c); an absent scale is ones (exact)."""
        n, C, start = param.numel(), int(C), int(start)
        if r is None:
            r = torch.ones((start + n - 1) // C + 1 if n else 1, dtype=torch.float32,
                           device=param.device)
        if c is None:
            c = torch.ones(C, dtype=torch.float32, device=param.device)
        self._add(ops.scaled_update_multi_, param.device,
                  (float(lr), float(weight_decay), float(step)), (param, grad, r, c, C, start))

    def whole_sinkhorn(self, param, grad, R, C, iters, eps, row_target, col_target, lr,
                       weight_decay, step) -> WholeSinkhorn | None:
        """Queue the Sinkhorn scales of a whole [R, C] matrix (ALGORITHMS.md §2-3) and, with
        `fuse_whole_updates`, the scaled update p <- p (1 - lr wd) - step (g r c) of a finite
        gradient. None where the device has no native kernel for it (the rule then runs its
        phases)."""
        device = grad.device
        flag = torch.zeros(1, dtype=torch.float32, device=device)
        R, C = int(R), int(C)
        if self.fuse_whole_updates and has_kernel("sinkhorn_update_multi_", device.type):
            self._add(ops.sinkhorn_update_multi_, device,
                      (int(iters), float(eps), float(lr), float(weight_decay), float(step)),
                      (param, grad, flag, R, C, float(row_target), float(col_target)))
            return WholeSinkhorn(flag, updated=True)
        if not has_kernel("sinkhorn_scales_multi_", device.type):
            return None
        r = torch.empty(R, dtype=torch.float32, device=device)
        c = torch.empty(C, dtype=torch.float32, device=device)
        self._add(ops.sinkhorn_scales_multi_, device, (int(iters), float(eps)),
                  (grad, r, c, flag, R, C, float(row_target), float(col_target)))
        return WholeSinkhorn(flag, r, c)

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for (op, _device, hp), items in pending.items():
            op(*[list(t) for t in zip(*items)], *hp)
