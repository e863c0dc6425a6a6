"""sage_dist: memory-efficient optimizers (SAGE, Sinkhorn, SinkGD, SCALE) that run exactly on
sharded training state."""
from .optim import build_optimizer, describe
from . import optim

__version__ = "0.1.0"
__all__ = ["build_optimizer", "describe", "optim", "__version__"]
