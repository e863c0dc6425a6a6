"""Batching of element-wise updates: the engine's policy, not the ops'.

Rules hand their element-wise updates (Lion's, SAGE's, the scaled Sinkhorn/SCALE step) to an
`UpdateBatch` instead of calling the single-tensor ops. At the end of each phase the engine
calls `flush()`, which issues every set of updates that shares an op, its hyperparameters and
a device as ONE multi-tensor call (on CUDA one launch per dtype pair). A rule must not read a
tensor it has handed over before the flush; the engine flushes before it writes finished
fragments back to their storage.
"""
from __future__ import annotations

import torch

from .. import ops


class UpdateBatch:
    def __init__(self):
        self.pending: dict[tuple, list] = {}

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

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for (op, _device, hp), items in pending.items():
            op(*[list(t) for t in zip(*items)], *hp)
