"""A contiguous range of a row-major matrix, and the few reductions the rules need on it.

Every layout the optimizers meet (a whole parameter, the local rows of an FSDP2 shard, a ZeRO
flat slice that starts and ends mid-row) is a range [a, b) of the row-major flat index of a
global [R, C] matrix. Such a range is at most three pieces: a partial first row (head), a block
of whole rows (body) and a partial last row (tail). The functions here work piece by piece, so
the whole-matrix case is just "body only" and costs nothing extra.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Piece:
    """Elements [offset, offset + rows * (col_end - col_start)) of the local flat tensor.

    They cover rows [row, row + rows) and columns [col_start, col_end) of the global matrix.
    A partial row has rows == 1; a block of whole rows has col_start == 0 and col_end == C.
    """

    offset: int
    row: int
    rows: int
    col_start: int
    col_end: int

    @property
    def numel(self) -> int:
        return self.rows * (self.col_end - self.col_start)


class Span:
    """Range [start, end) of the flat index of a global [R, C] matrix."""

    def __init__(self, rows: int, cols: int, start: int, end: int):
        if not (0 <= start <= end <= rows * cols):
            raise ValueError(
                f"span [{start}, {end}) is outside a [{rows}, {cols}] matrix")
        self.rows, self.cols, self.start, self.end = rows, cols, start, end
        self.pieces = self._cut()

    def _cut(self) -> tuple[Piece, ...]:
        C, a, b = self.cols, self.start, self.end
        pieces, k = [], a
        if k < b and k % C:  # head: partial first row
            r, c0 = divmod(k, C)
            c1 = min(C, c0 + (b - k))
            pieces.append(Piece(k - a, r, 1, c0, c1))
            k += c1 - c0
        full = (b - k) // C
        if full:
            pieces.append(Piece(k - a, k // C, full, 0, C))
            k += full * C
        if k < b:  # tail: partial last row
            pieces.append(Piece(k - a, k // C, 1, 0, b - k))
        return tuple(pieces)

    @property
    def numel(self) -> int:
        return self.end - self.start

    @property
    def row_aligned(self) -> bool:
        """True when the span holds whole rows only, so row sums are complete locally."""
        return self.start % self.cols == 0 and self.end % self.cols == 0

    def _block(self, flat: torch.Tensor, p: Piece) -> torch.Tensor:
        return flat[p.offset:p.offset + p.numel].view(p.rows, p.col_end - p.col_start)

    def col_sum(self, flat: torch.Tensor) -> torch.Tensor:
        """Length-C partial column sums of the local values (zeros where nothing is held)."""
        out = torch.zeros(self.cols, dtype=flat.dtype, device=flat.device)
        for p in self.pieces:
            out[p.col_start:p.col_end] += self._block(flat, p).sum(0)
        return out

    def row_sum(self, flat: torch.Tensor) -> torch.Tensor:
        """Length-R partial row sums of the local values (zeros where nothing is held)."""
        out = torch.zeros(self.rows, dtype=flat.dtype, device=flat.device)
        for p in self.pieces:
            out[p.row:p.row + p.rows] += self._block(flat, p).sum(1)
        return out

    def scale(self, flat: torch.Tensor, row: torch.Tensor | None = None,
              col: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """flat[k] * row[k // C] * col[k % C] over the span (either factor may be None)."""
        out = torch.empty_like(flat) if out is None else out
        for p in self.pieces:
            blk, dst = self._block(flat, p), self._block(out, p)
            if row is not None and col is not None:
                torch.mul(blk, row[p.row:p.row + p.rows, None], out=dst)
                dst.mul_(col[None, p.col_start:p.col_end])
            elif row is not None:
                torch.mul(blk, row[p.row:p.row + p.rows, None], out=dst)
            elif col is not None:
                torch.mul(blk, col[None, p.col_start:p.col_end], out=dst)
            else:
                dst.copy_(blk)
        return out

    def expand_col(self, col: torch.Tensor) -> torch.Tensor:
        """The per-column vector laid out over the span's elements."""
        ones = torch.ones(self.numel, dtype=col.dtype, device=col.device)
        return self.scale(ones, col=col, out=ones)

    def expand_row(self, row: torch.Tensor) -> torch.Tensor:
        """The per-row vector laid out over the span's elements."""
        ones = torch.ones(self.numel, dtype=row.dtype, device=row.device)
        return self.scale(ones, row=row, out=ones)
