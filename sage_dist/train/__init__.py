"""Llama pretraining: `python -m sage_dist.train [--config NAME_OR_PATH] [--key value ...]`
(loop.py; without --config the shipped `tiny_single` config) on DeepSpeed ZeRO-1/2/3, FSDP2,
DDP or one process (engines.py, deepspeed_engine.py), with typed configs and the lr schedule
(config.py), packed token memmaps and a resumable rank-sharded sampler (data.py), atomic
checkpoints (checkpoint.py), process-group helpers (dist.py), metrics and plots (metrics.py);
the embedded stdlib-docstring corpus and cached BPE tokenizer (corpus.py, tokenizer.py)."""
