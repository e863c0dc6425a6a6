"""`python -m sage_dist.train [--config NAME_OR_PATH] [--key value ...]`: the pretraining job
(any engine, launched by torchrun or the DeepSpeed launcher). Without --config it runs the
shipped single-process config `tiny_single`, overridden by the arguments given."""
from .cli import entry

entry()
