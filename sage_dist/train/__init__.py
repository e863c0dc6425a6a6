"""Llama pretraining: `python -m sage_dist.train --config configs/train/NAME.yaml` (loop.py) on
DeepSpeed ZeRO-1/2/3, FSDP2, DDP or one process (engines.py), with typed configs (config.py),
packed token memmaps and a resumable rank-sharded sampler (data.py), metrics and plots
(metrics.py); the embedded stdlib-docstring corpus and cached BPE tokenizer (corpus.py,
tokenizer.py); and the original single-process smoke test (single.py, used without --config)."""
