"""The pretraining entry point and its data: stdlib corpus, BPE tokenizer, a short training run.

Every test writes its caches under a temporary SAGE_DIST_CACHE, never the user's home. Building
the corpus and tokenizer takes a second or two, so most tests share one session-wide cache; the
tests about caching itself use a fresh directory.
"""
import collections
import re

import pytest
import torch

from sage_dist.train import corpus, tokenizer
from sage_dist.train.single import lr_lambda, main, run, sample_batch

VOCAB = 2048


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sage_dist_cache")


@pytest.fixture
def cache(shared_cache, monkeypatch):
    monkeypatch.setenv("SAGE_DIST_CACHE", str(shared_cache))
    return shared_cache


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGE_DIST_CACHE", str(tmp_path))
    return tmp_path


def _refuse(*args, **kwargs):
    raise AssertionError("the cache should have been used")


def test_corpus_is_megabytes_of_english(cache):
    docs = corpus.load_documents()
    assert sum(len(d.encode("utf-8")) for d in docs) > 1_000_000
    assert len(docs) == len(set(docs)) > 200
    words = collections.Counter(w.lower() for d in docs for w in re.findall(r"[A-Za-z]+", d))
    # Prose, not code: the commonest words are English function words.
    common = {w for w, _ in words.most_common(10)}
    assert {"the", "of", "to", "is", "a"} <= common, common
    assert all(d == d.strip() and "\n\n\n" not in d for d in docs)


def test_collection_and_split_are_deterministic(tmp_path, monkeypatch):
    collections_ = []
    for name in ("a", "b"):  # two independent collections from scratch
        monkeypatch.setenv("SAGE_DIST_CACHE", str(tmp_path / name))
        collections_.append(corpus.load_documents())
    docs = collections_[0]
    assert collections_[1] == docs
    a, b = corpus.split_documents(docs), corpus.split_documents(list(docs))
    assert a == b
    assert len(a["train"]) + len(a["validation"]) == len(docs)
    assert set(a["train"]).isdisjoint(a["validation"])
    assert len(a["validation"]) == len(docs) // corpus.VALIDATION_EVERY
    assert a["validation"][0] == docs[corpus.VALIDATION_EVERY - 1]


def test_corpus_cache_is_reused(fresh_cache, monkeypatch):
    docs = corpus.load_documents()
    assert corpus.corpus_path().is_relative_to(fresh_cache)
    assert not list(fresh_cache.rglob("*.tmp"))  # the atomic write left no temp file
    monkeypatch.setattr(corpus, "_collect_in_child", _refuse)
    assert corpus.load_documents() == docs


def test_tokenizer_round_trips_text(cache):
    tok = tokenizer.load_tokenizer(VOCAB)
    assert tok.get_vocab_size() == VOCAB
    assert tok.token_to_id(tokenizer.EOT) == 0
    samples = corpus.load_splits()["validation"][:5] + ["naïve café — 漢字 🙂\ttab  two spaces\n"]
    for text in samples:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    # A trained BPE compresses English well beyond one token per byte.
    text = "\n".join(samples[:5])
    assert len(tok.encode(text).ids) < len(text.encode("utf-8")) / 2.5


def test_tokenizer_and_tokens_are_cached(fresh_cache, monkeypatch):
    tok, tokens = tokenizer.load_tokens(512)
    files = sorted(p.name for p in fresh_cache.rglob("bpe-*"))
    assert len(files) == 3, files  # tokenizer.json, train.npy, validation.npy
    monkeypatch.setattr(tokenizer, "train_tokenizer", _refuse)
    monkeypatch.setattr(tokenizer, "encode_documents", _refuse)
    tok2, tokens2 = tokenizer.load_tokens(512)
    assert tok2.to_str() == tok.to_str()
    assert all(torch.equal(tokens[k], tokens2[k]) for k in tokens)


def test_token_stream_separates_documents(cache):
    tok, tokens = tokenizer.load_tokens(VOCAB)
    splits = corpus.load_splits()
    for name, t in tokens.items():
        assert t.dtype == torch.int64 and 0 <= t.min() and t.max() < VOCAB
        assert (t == 0).sum() == len(splits[name])  # one EOT after each document
        assert t[-1] == 0


def test_lr_schedule_warms_up_then_decays():
    f = lr_lambda(100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 101)]
    assert values == sorted(values, reverse=True)


def test_batches_are_seeded_and_shifted():
    tokens = torch.arange(1000)
    x1, y1 = sample_batch(tokens, 4, 16, torch.Generator().manual_seed(3))
    x2, y2 = sample_batch(tokens, 4, 16, torch.Generator().manual_seed(3))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (4, 16) and torch.equal(y1, x1 + 1)


@pytest.mark.parametrize("argv, words", [
    (["--vocab-size", "4096"], ["4096", "2048"]),
    (["--seq", "1000"], ["--seq", "1000", "256"]),
    (["--steps", "0"], ["--steps", "0"]),
    (["--model", "/nonexistent.json"], ["--model", "/nonexistent.json"]),
    (["--lr", "-1"], ["--lr", "-1"]),
    (["--recipe", "no-such-recipe"], ["--recipe", "no-such-recipe", "sage-hybrid"]),
])
def test_bad_arguments_fail_clearly(argv, words, cache, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_short_run_lowers_validation_loss(cache, capsys):
    argv = ["--steps", "30", "--batch", "4", "--seq", "64", "--eval-every", "15",
            "--eval-batches", "2", "--seed", "1"]
    result = run(argv)
    assert result["final_val_loss"] < result["step0_val_loss"] - 0.5, result
    out = capsys.readouterr().out
    assert re.search(r"^final: step 30 val_loss [\d.]+ val_ppl [\d.]+ \(step-0 val_loss", out, re.M)
