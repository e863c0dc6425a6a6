"""Entry point of `python -m sage_dist.train` and the `sage-dist-train` console script."""
from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    """The training job (sage_dist.train.loop); without --config, the shipped tiny_single
    config with the command line's overrides."""
    from .loop import main as train_main
    return train_main(sys.argv[1:] if argv is None else list(argv))


def end_process(code: int) -> None:
    """Exit with `code`. After a gloo process group, skip interpreter finalisation.

    Gloo's worker threads release the last collective's work objects (and the tensors they
    hold) a little after the caller's wait returns. Those groups stay referenced after
    `destroy_process_group()` (DeviceMesh keeps its groups, DeepSpeed keeps them in module
    globals and on parameters), so their threads are still alive when Python finalises; a
    thread that then needs the GIL to free a tensor is killed mid-destructor and the process
    aborts ("terminate called without an active exception", exit -6) after a run that
    finished. pytorch/pytorch PR 179291 describes the same crash. By the time this runs every
    output of the job (metrics, checkpoints, plot) is written and closed, so the process only
    flushes its streams and leaves with the job's own exit code.
    """
    from . import dist
    if not dist.GLOO_USED:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe must not change the exit code
            pass
    os._exit(code)


def entry() -> None:
    """`python -m sage_dist.train` and the `sage-dist-train` console script."""
    end_process(main())
