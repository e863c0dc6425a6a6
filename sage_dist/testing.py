"""Comparison helpers shared by the test suite (and usable by anyone checking a port)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Diff:
    rel: float        # max |a - b| over max |b|, outside the tolerated sign flips
    flips: int        # elements whose difference looks like a sign flip of a near-zero value
    numel: int


def compare(actual: torch.Tensor, expected: torch.Tensor, rtol: float,
            flip_size: float | None = None) -> Diff:
    """Relative difference per the project's rule: max abs diff / max abs value.

    With `flip_size` (the size of a sign update, e.g. 2*lr), elements that differ by about
    that much are counted as sign flips instead of failing the relative bound: sign-based rules
    may flip the sign of a value that is within rounding of zero.
    """
    a, b = actual.detach().float().reshape(-1), expected.detach().float().reshape(-1)
    d = (a - b).abs()
    scale = b.abs().max().clamp(min=1e-30)
    flips = 0
    if flip_size:
        is_flip = (d > rtol * scale) & (d <= 1.01 * flip_size)
        flips = int(is_flip.sum())
        d = torch.where(is_flip, torch.zeros_like(d), d)
    return Diff(float(d.max() / scale) if d.numel() else 0.0, flips, a.numel())
