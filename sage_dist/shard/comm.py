"""What one optimizer step all-reduces for a parameter, from its global shape and the tensor
dims cut over the summed ranks alone. The tests hold the optimizer's measured `comm_stats()`
to these counts on real meshes; sage_dist.fsdp.llama_step_floats adds them up for a Llama
config under parallelize_llama without building it.
"""
from __future__ import annotations

import math


def param_floats(rule: str, shape, cuts, sinkhorn_iters: int = 0) -> int:
    """Floats one step sends for a parameter of global `shape` whose tensor dims `cuts` are
    cut over the summed ranks: its finiteness flag, plus each statistic its rule needs. Column
    sums travel whenever the matrix is cut (SAGE's damper reads every column, even those held
    elsewhere); row sums only when columns are cut (rows are otherwise complete here)."""
    if not cuts:
        return 0
    shape = tuple(shape)
    matrix = len(shape) >= 2
    R = shape[0] if matrix else 1
    C = math.prod(shape[1:]) if matrix else math.prod(shape)
    col = C if matrix else 0
    row = R if matrix and 1 in cuts else 0
    extra = {"sage": col if matrix else 2,
             "sinkhorn": sinkhorn_iters * (row + col), "sinkgd": sinkhorn_iters * (row + col),
             "scale_embedding": col, "scale_dense": row, "scale_head": row}.get(rule, 0)
    return 1 + extra
