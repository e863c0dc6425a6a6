"""`python -m sage_dist.train --config configs/train/NAME.yaml [--key value ...]`: the
pretraining job (any engine, launched by torchrun or the DeepSpeed launcher). Without --config,
the original single-process smoke test (`sage_dist.train.single`) keeps its flags."""
from .cli import entry

entry()
