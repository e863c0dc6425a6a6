"""sage_dist: memory-efficient optimizers (SAGE, Sinkhorn, SinkGD, SCALE) that run exactly on
sharded training state.

    opt = sage_dist.build_optimizer(model, "sage-hybrid")

The engine faces load on first use, so DeepSpeed is imported only by code that uses it:
`sage_dist.deepspeed` (ZeRO-1/2/3), `sage_dist.fsdp` (FSDP2/HSDP), `sage_dist.memory`
(per-rank accounting and the estimator).
"""
import importlib

from . import optim
from .optim import build_optimizer, describe

__version__ = "0.1.0"
_LAZY = ("deepspeed", "fsdp", "memory", "models", "ops", "shard", "train", "bench", "testing")
__all__ = ["build_optimizer", "describe", "optim", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'sage_dist' has no attribute {name!r}")
