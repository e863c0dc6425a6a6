"""Llama pretraining entry point and its data: an embedded stdlib-docstring corpus, a cached
byte-level BPE tokenizer, and a short single-process training loop (`python -m sage_dist.train`)."""
