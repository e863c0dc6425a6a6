"""Byte-level BPE trained on the train split of the stdlib corpus (or any documents).

The corpus tokenizer is cached beside the corpus; its name carries the vocabulary size and a
hash of the corpus, so a different Python (hence a different corpus) or vocabulary never
reuses a stale file. The trainer packs the token files itself (data.py).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .corpus import atomic_write_bytes, cache_dir, load_splits

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOT, PAD)  # EOT gets id 0: it separates documents in the token stream
FORMAT_VERSION = 1  # bump when the tokenizer setup changes


def corpus_hash(splits: dict[str, list[str]]) -> str:
    """A short content hash of both splits (the split rule is part of what is hashed)."""
    blob = json.dumps(splits, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:12]


def _stem(vocab_size: int, chash: str) -> str:
    return f"bpe-v{FORMAT_VERSION}-{vocab_size}-{chash}"


def tokenizer_path(vocab_size: int, chash: str) -> Path:
    return cache_dir() / f"{_stem(vocab_size, chash)}.tokenizer.json"


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: every byte is in the base alphabet, so any text encodes without <unk>
    and decodes back exactly."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
                         f"{256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def load_tokenizer(vocab_size: int = 2048, splits: dict | None = None) -> Tokenizer:
    """The cached tokenizer for this corpus and vocabulary size, trained on first use."""
    splits = splits if splits is not None else load_splits()
    path = tokenizer_path(vocab_size, corpus_hash(splits))
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = train_tokenizer(splits["train"], vocab_size)
    atomic_write_bytes(path, tok.to_str().encode("utf-8"))
    return tok
