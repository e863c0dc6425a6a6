"""Training data: documents -> tokenizer -> token memmaps (packed once, reused) -> a
deterministic, rank-sharded, resumable sampler.

Sources: the embedded stdlib corpus ("embedded"), a .txt / .jsonl file, a directory of them
(recursively, sorted), or a Hugging Face dataset saved with `save_to_disk` (needs `datasets`).
A .txt file is one document; a JSONL line is one document (its `text_key` field). Every 20th
document is held out for validation (with fewer than 20 documents, the last 5 % of tokens).

Tokenizer: a Hugging Face tokenizer directory, or a byte-level BPE trained with `tokenizers` on
the train documents and cached beside the data (the embedded corpus: under SAGE_DIST_CACHE).
Token files are raw uint16/int32 arrays named by a hash of the sources and the tokenizer, so a
changed file or tokenizer never reuses a stale pack; all writes are atomic.

Sampling: the train stream is cut into non-overlapping windows of seq_len + 1 tokens. Global
step s of epoch e = s // steps_per_epoch takes `global_batch` windows from a permutation seeded
by (seed, e); rank r's micro-step a takes its slice of them. The batch is a pure function of
(seed, step): every world size sees the same global batches, and resuming mid-epoch needs only
the step number.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, TrainConfig
from .corpus import VALIDATION_EVERY, atomic_write_bytes

PACK_VERSION = 1
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")


# -- sources -----------------------------------------------------------------------------------
def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists()
                              or (path / "dataset_dict.json").exists())


def source_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES
                   and not any(part.endswith(".sage_dist") for part in p.parts))
    if not files:
        raise ConfigError(f"data={str(path)!r}: no .txt or .jsonl files found in the directory")
    return files


def _read_jsonl(path: Path, key: str) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"data: {path}:{n} is not valid JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get(key), str):
                raise ConfigError(f"data: {path}:{n} has no string field text_key={key!r}")
            docs.append(row[key])
    return docs


def read_documents(cfg: TrainConfig) -> list[str]:
    path = cfg.resolve(cfg.data)
    if _is_hf_dataset(path):
        try:
            import datasets
        except ImportError:
            raise ConfigError(f"data={cfg.data!r} is a Hugging Face dataset on disk; reading it "
                              f"needs the `datasets` package (pip install datasets)") from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
        if cfg.text_key not in ds.column_names:
            raise ConfigError(f"text_key={cfg.text_key!r}: not a column of {cfg.data} "
                              f"(columns: {', '.join(ds.column_names)})")
        return [t for t in ds[cfg.text_key] if t]
    docs = []
    for f in source_files(path):
        if f.suffix in JSONL_SUFFIXES:
            docs.extend(_read_jsonl(f, cfg.text_key))
        else:
            docs.append(f.read_text(encoding="utf-8", errors="replace"))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ConfigError(f"data={cfg.data!r}: no text found")
    return docs


def _fingerprint(cfg: TrainConfig) -> str:
    path = cfg.resolve(cfg.data)
    h = hashlib.sha256(f"{PACK_VERSION}|{cfg.text_key}".encode())
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                 and ".sage_dist" not in str(p))
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}|{st.st_size}|"
                 f"{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def data_cache_dir(cfg: TrainConfig) -> Path:
    """Beside the data: `<parent>/<name>.sage_dist/` (the embedded corpus: SAGE_DIST_CACHE)."""
    from .corpus import cache_dir

    if cfg.data == "embedded":
        return cache_dir()
    path = cfg.resolve(cfg.data).resolve()
    return path.parent / f"{path.name}.sage_dist"


# -- tokenizers --------------------------------------------------------------------------------
class Tok:
    """The few things we need from either tokenizer kind."""

    def __init__(self, kind: str, obj, ident: str):
        self.kind, self.obj, self.ident = kind, obj, ident

    @property
    def vocab_size(self) -> int:
        return len(self.obj) if self.kind == "hf" else self.obj.get_vocab_size()

    @property
    def eot(self) -> int:
        if self.kind == "hf":
            eot = self.obj.eos_token_id
            if eot is None:
                raise ConfigError("tokenizer: the Hugging Face tokenizer has no eos_token; it "
                                  "is needed to separate documents")
            return eot
        from .tokenizer import EOT
        return self.obj.token_to_id(EOT)

    def encode(self, docs: list[str]) -> np.ndarray:
        eot, ids = self.eot, []
        if self.kind == "hf":
            batches = self.obj(docs, add_special_tokens=False)["input_ids"]
        else:
            batches = [e.ids for e in self.obj.encode_batch(docs, add_special_tokens=False)]
        for b in batches:
            ids.extend(b)
            ids.append(eot)
        dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.int32
        return np.asarray(ids, dtype=dtype)


def hf_tokenizer(cfg: TrainConfig) -> Tok:
    from transformers import AutoTokenizer

    path = cfg.resolve(cfg.tokenizer)
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ConfigError(f"tokenizer={cfg.tokenizer!r}: cannot load a Hugging Face tokenizer "
                          f"({type(e).__name__}: {e})") from None
    ident = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:12]
    return Tok("hf", tok, f"hf-{ident}")


def tokenizer_vocab(cfg: TrainConfig, model_vocab: int) -> int:
    """The tokenizer's vocabulary size, known before any data is read (checks run early)."""
    if cfg.tokenizer is not None:
        return hf_tokenizer(cfg).vocab_size
    return cfg.vocab_size or model_vocab


def check_vocab(cfg: TrainConfig, model_vocab: int) -> None:
    v = tokenizer_vocab(cfg, model_vocab)
    if v > model_vocab:
        what = f"tokenizer={cfg.tokenizer!r}" if cfg.tokenizer else f"vocab_size={v}"
        raise ConfigError(f"{what}: the tokenizer's vocabulary ({v}) is larger than the model's "
                          f"vocab_size {model_vocab} ({cfg.model}); allowed: <= {model_vocab}")


# -- packing -----------------------------------------------------------------------------------
def _split_docs(docs: list[str]) -> tuple[list[str], list[str]]:
    if len(docs) < VALIDATION_EVERY:
        return docs, []
    val = [d for i, d in enumerate(docs) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
    train = [d for i, d in enumerate(docs) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1]
    return train, val


def _write_bin(path: Path, arr: np.ndarray) -> None:
    atomic_write_bytes(path, arr.tobytes())


def prepare(cfg: TrainConfig, model_vocab: int) -> dict:
    """Pack (once) and describe the token files; returns the manifest. Call on one rank first."""
    if cfg.data == "embedded":
        from .corpus import load_splits
        from .tokenizer import corpus_hash, load_tokenizer

        splits = load_splits()
        vocab = cfg.vocab_size or model_vocab
        if cfg.tokenizer is not None:
            tok = hf_tokenizer(cfg)
        else:
            tok = Tok("bpe", load_tokenizer(vocab, splits), f"bpe{vocab}")
        key = f"pack-v{PACK_VERSION}-embedded-{corpus_hash(splits)}-{tok.ident}"
        get_docs = lambda: (splits["train"], splits["validation"])  # noqa: E731
    else:
        key_data = _fingerprint(cfg)
        cache = data_cache_dir(cfg)
        docs_cache: list = []

        def get_docs():
            if not docs_cache:
                docs_cache.append(_split_docs(read_documents(cfg)))
            return docs_cache[0]

        if cfg.tokenizer is not None:
            tok = hf_tokenizer(cfg)
        else:
            from tokenizers import Tokenizer
            from .tokenizer import train_tokenizer

            vocab = cfg.vocab_size or model_vocab
            tpath = cache / f"bpe-{vocab}-{key_data}.tokenizer.json"
            if tpath.exists():
                bpe = Tokenizer.from_file(str(tpath))
            else:
                bpe = train_tokenizer(get_docs()[0], vocab)
                atomic_write_bytes(tpath, bpe.to_str().encode("utf-8"))
            tok = Tok("bpe", bpe, f"bpe{vocab}-{key_data}")
        key = f"pack-v{PACK_VERSION}-{key_data}-{tok.ident}"
    cache = data_cache_dir(cfg)
    manifest_path = cache / f"{key}.json"
    if manifest_path.exists():
        return json.loads(manifest_path.read_text())
    if tok.vocab_size > model_vocab:
        raise ConfigError(f"the tokenizer's vocabulary ({tok.vocab_size}) is larger than the "
                          f"model's vocab_size {model_vocab}")
    train_docs, val_docs = get_docs()
    train = tok.encode(train_docs)
    if val_docs:
        val = tok.encode(val_docs)
    else:  # too few documents: hold out the last 5 % of tokens
        cut = len(train) - max(cfg.seq_len + 2, len(train) // VALIDATION_EVERY)
        train, val = train[:cut], train[cut:]
    manifest = {"dtype": str(train.dtype), "vocab_size": tok.vocab_size, "tokenizer": tok.ident,
                "source": cfg.data, "splits": {}}
    for name, arr in (("train", train), ("validation", val)):
        fname = f"{key}.{name}.bin"
        _write_bin(cache / fname, arr)
        manifest["splits"][name] = {"file": fname, "tokens": int(len(arr))}
    atomic_write_bytes(manifest_path, json.dumps(manifest, indent=1).encode())
    return manifest


def open_tokens(cfg: TrainConfig, manifest: dict) -> dict[str, np.ndarray]:
    cache = data_cache_dir(cfg)
    out = {}
    for name, info in manifest["splits"].items():
        arr = np.memmap(cache / info["file"], dtype=manifest["dtype"], mode="r")
        if len(arr) != info["tokens"]:
            raise ConfigError(f"token file {cache / info['file']} is truncated "
                              f"({len(arr)} of {info['tokens']} tokens); delete it to re-pack")
        if len(arr) < cfg.seq_len + 2:
            raise ConfigError(f"seq_len={cfg.seq_len}: the {name} split has only {len(arr)} "
                              f"tokens")
        out[name] = arr
    return out


# -- sampling ----------------------------------------------------------------------------------
class Sampler:
    """Global batches as a pure function of (seed, step); each rank reads only its slice."""

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int):
        self.tokens, self.seq, self.gb, self.seed = tokens, seq_len, global_batch, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < global_batch:
            raise ConfigError(f"global_batch={global_batch}: the train split has only "
                              f"{self.n_windows} windows of seq_len={seq_len}")
        self.steps_per_epoch = self.n_windows // global_batch
        self._perm_epoch, self._perm = -1, None

    def global_windows(self, step: int) -> np.ndarray:
        """Window indices of global batch `step` (0-based)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.n_windows), epoch
        return self._perm[pos * self.gb:(pos + 1) * self.gb]

    def _rows(self, starts: np.ndarray) -> torch.Tensor:
        rows = np.stack([np.asarray(self.tokens[s:s + self.seq + 1], dtype=np.int64)
                         for s in starts])
        return torch.from_numpy(rows)

    def micro_batch(self, step: int, micro: int, rank: int, world: int, micro_size: int):
        """(inputs, targets) of this rank's micro-step `micro` of global step `step`."""
        idx = self.global_windows(step)
        lo = (micro * world + rank) * micro_size
        rows = self._rows(idx[lo:lo + micro_size] * self.seq)
        return rows[:, :-1], rows[:, 1:]


def eval_windows(tokens: np.ndarray, count: int, seq: int) -> torch.Tensor:
    """Evenly spaced windows over the whole validation stream: the same tokens for every run."""
    starts = np.linspace(0, len(tokens) - seq - 1, count).astype(np.int64)
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq + 1], dtype=np.int64)
                                      for s in starts]))
