"""Entry point of `python -m sage_dist.train` and the `sage-dist-train` console script."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        from .loop import main as train_main
        return train_main(argv)
    from .single import main as single_main  # the original flags (--model, --recipe, ...)
    return single_main(argv)
