"""What a rank holds of a row-major matrix, and the few reductions the rules need on it.

Most layouts the optimizers meet (a whole parameter, the local rows of an FSDP2 shard, a ZeRO
flat slice that starts and ends mid-row) are a range [a, b) of the row-major flat index of a
global [R, C] matrix (`Span`). Such a range is at most three pieces: a partial first row
(head), a block of whole rows (body) and a partial last row (tail). The functions here work
piece by piece, so the whole-matrix case is just "body only" and costs nothing extra.

Tensor parallelism also cuts columns: a rank then holds a block, rows [r0, r1) x columns
[c0, c1), stored row-major (`BlockSpan`). The native ops take a range (C, start); a block is
handed to them as the whole local [r1 - r0, c1 - c0] matrix (`op_args`), and the statistics
they return are placed into, or the global vectors cut to, the block's rows and columns
(`global_rows`, `global_cols`, `local_rows`, `local_cols`). On a range those four are the
identity, so the rules call them everywhere at no cost.
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

    # -- the ops' view of this span (a range is its own view) ----------------------------
    is_block = False

    @property
    def op_args(self) -> tuple[int, int, int]:
        """(R, C, start) to pass the native ops for the local values."""
        return self.rows, self.cols, self.start

    def global_rows(self, v: torch.Tensor) -> torch.Tensor:
        """A length-R vector from per-row values the ops returned for this span."""
        return v

    def global_cols(self, v: torch.Tensor) -> torch.Tensor:
        """A length-C vector from per-column values the ops returned for this span."""
        return v

    def local_rows(self, v: torch.Tensor) -> torch.Tensor:
        """The part of a length-R vector the ops need for this span."""
        return v

    def local_cols(self, v: torch.Tensor) -> torch.Tensor:
        """The part of a length-C vector the ops need for this span."""
        return v

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This span's elements of the whole matrix's flat tensor, in local order."""
        return full.reshape(-1)[self.start:self.end]

    def row_starts(self):
        """(local offset, global flat index, length) of each contiguous run of the span."""
        return [(0, self.start, self.numel)] if self.numel else []

    def expand_col(self, col: torch.Tensor) -> torch.Tensor:
        """The per-column vector laid out over the span's elements."""
        ones = torch.ones(self.numel, dtype=col.dtype, device=col.device)
        return self.scale(ones, col=col, out=ones)

    def expand_row(self, row: torch.Tensor) -> torch.Tensor:
        """The per-row vector laid out over the span's elements."""
        ones = torch.ones(self.numel, dtype=row.dtype, device=row.device)
        return self.scale(ones, row=row, out=ones)


class BlockSpan(Span):
    """Rows [r0, r1) x columns [c0, c1) of a global [R, C] matrix, stored row-major."""

    is_block = True

    def __init__(self, rows: int, cols: int, r0: int, r1: int, c0: int, c1: int):
        if not (0 <= r0 <= r1 <= rows and 0 <= c0 <= c1 <= cols):
            raise ValueError(f"block rows [{r0}, {r1}) x columns [{c0}, {c1}) is outside a "
                             f"[{rows}, {cols}] matrix")
        self.rows, self.cols = rows, cols
        self.r0, self.r1, self.c0, self.c1 = r0, r1, c0, c1
        n = (r1 - r0) * (c1 - c0)
        # start/end bound the block in the global flat index (it is not contiguous).
        self.start = r0 * cols + c0 if n else 0
        self.end = self.start + ((r1 - r0 - 1) * cols + (c1 - c0) if n else 0)
        self._numel = n
        self.pieces = (Piece(0, r0, r1 - r0, c0, c1),) if n else ()

    @property
    def numel(self) -> int:
        return self._numel

    @property
    def row_aligned(self) -> bool:
        return self.c0 == 0 and self.c1 == self.cols

    @property
    def op_args(self) -> tuple[int, int, int]:
        return self.r1 - self.r0, self.c1 - self.c0, 0

    def global_rows(self, v):
        out = torch.zeros(self.rows, dtype=v.dtype, device=v.device)
        out[self.r0:self.r1] = v
        return out

    def global_cols(self, v):
        out = torch.zeros(self.cols, dtype=v.dtype, device=v.device)
        out[self.c0:self.c1] = v
        return out

    def local_rows(self, v):
        return None if v is None else v[self.r0:self.r1].contiguous()

    def local_cols(self, v):
        return None if v is None else v[self.c0:self.c1].contiguous()

    def take(self, full):
        return full.reshape(self.rows, self.cols)[self.r0:self.r1, self.c0:self.c1].reshape(-1)

    def row_starts(self):
        w = self.c1 - self.c0
        return [(i * w, (self.r0 + i) * self.cols + self.c0, w)
                for i in range(self.r1 - self.r0)] if w else []
