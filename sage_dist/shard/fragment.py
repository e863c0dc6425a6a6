"""Fragments: what this rank holds of each parameter, in the terms the rules need.

A fragment names one parameter (its place in the optimizer's global order), its GLOBAL shape
seen as a matrix [R, C] (a 1-D parameter of n elements is [1, n]; more dims fold into
[size(0), rest]), the span of the row-major flat index this rank holds, and flat views of the
local data and gradient. Layout adapters build fragments; rules only ever see fragments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ops.span import Span


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The [R, C] view the rules use: 0-D and 1-D are one row, >2-D folds the trailing dims."""
    if len(shape) <= 1:
        return 1, (shape[0] if shape else 1)
    return shape[0], math.prod(shape[1:])


_DS_SHAPE = None  # zero.ds_shape, bound on first use (zero.py imports this module)


def global_shape(p: torch.Tensor) -> tuple[int, ...]:
    """Shape of the whole parameter, whatever engine holds it.

    DTensor reports its global shape; a DeepSpeed ZeRO-3 parameter keeps it elsewhere.
    """
    global _DS_SHAPE
    if _DS_SHAPE is None:  # (an import statement per call costs a step ~0.1 ms)
        from .zero import ds_shape
        _DS_SHAPE = ds_shape
    shape = _DS_SHAPE(p)
    return shape if shape is not None else tuple(p.shape)


@dataclass
class Fragment:
    name: str
    param: torch.Tensor     # the object in param_groups (keys optimizer.state)
    shape: tuple[int, ...]  # global shape
    span: Span              # the part of the [R, C] matrix held here
    data: torch.Tensor      # flat local view of the parameter (may be any float dtype)
    grad: torch.Tensor | None
    whole: bool             # this rank holds the entire parameter: no statistic needs a reduction
    # Every rank holds whole rows: row statistics are complete locally. (Rules use row
    # statistics on the fragment's own rows only; column statistics, SAGE's on all columns,
    # so those travel whenever the parameter is cut, even by columns only.)
    rows_local: bool
    slot: int = 0           # position among the fragments of its optimizer entry
    # Where the layout knows every rank's range (DeepSpeed ZeRO): the global rows that some
    # rank's range starts or ends inside, the same on every rank (None: not known). Sinkhorn
    # completes these few rows from their values, gathered in its first all-reduce, so that
    # each iteration needs one all-reduce instead of two.
    straddle_rows: tuple[int, ...] | None = None
    # False on all but one of the ranks that hold the same block (a parameter replicated over a
    # mesh dim the statistics are summed over): it then adds zeros, so each element counts once.
    contributes: bool = True

    @property
    def rows(self) -> int:
        return self.span.rows

    @property
    def cols(self) -> int:
        return self.span.cols

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) >= 2

    def is_local(self, kind: str) -> bool:
        """Whether a statistic of this kind ('row', 'col' or 'scalar') is already complete here."""
        return self.whole or (kind == "row" and self.rows_local)
