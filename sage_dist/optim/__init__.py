"""The optimizers: one engine (RoutedOptimizer), one rule per algorithm, recipes that route."""
from .classes import (SAGE, AdamW, Lion, ScaleAdamW, ScaleDense, ScaleEmbedding, ScaleHead,
                      SinkGD, Sinkhorn)
from .optimizer import RoutedOptimizer
from .recipes import RECIPES, build_optimizer, describe
from .registry import RULES

__all__ = ["SAGE", "AdamW", "Lion", "ScaleAdamW", "ScaleDense", "ScaleEmbedding", "ScaleHead",
           "SinkGD", "Sinkhorn", "RoutedOptimizer", "RECIPES", "RULES", "build_optimizer",
           "describe"]
