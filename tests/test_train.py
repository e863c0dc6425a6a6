"""The trainer's parts and its no-argument entry: stdlib corpus, BPE tokenizer, token packing,
the lr schedule, the sampler, the DeepSpeed-JSON reconciliation, `python -m sage_dist.train`
without --config (the shipped tiny_single config, overridden by the arguments).

Every test writes its caches under a temporary SAGE_DIST_CACHE, never the user's home. Building
the corpus (in a child process) and the tokenizer takes a few seconds, so most tests share one
session-wide cache; the tests about caching itself use a fresh directory. Tests marked slow
spawn processes or train; the others are pure functions and run in well under a second each.
"""
import collections
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sage_dist.train import cli, corpus, data, tokenizer
from sage_dist.train import config as C
from sage_dist.train.config import ConfigError, TrainConfig, lr_factor
from sage_dist.train.loop import main
from sage_dist.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 2048
SHORT = ["--steps", "3", "--eval_every", "3", "--eval_batches", "1", "--plot", "false",
         "--progress", "false"]


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


# -- corpus, tokenizer, token files (build the corpus in a child process) ----------------------
@pytest.mark.slow
def test_corpus_is_megabytes_of_english(cache):
    docs = corpus.load_documents()
    assert sum(len(d.encode("utf-8")) for d in docs) > 1_000_000
    assert len(docs) == len(set(docs)) > 200
    words = collections.Counter(w.lower() for d in docs for w in re.findall(r"[A-Za-z]+", d))
    # Prose, not code: the commonest words are English function words.
    common = {w for w, _ in words.most_common(10)}
    assert {"the", "of", "to", "is", "a"} <= common, common
    assert all(d == d.strip() and "\n\n\n" not in d for d in docs)


@pytest.mark.slow
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


@pytest.mark.slow
def test_corpus_cache_is_reused(fresh_cache, monkeypatch):
    docs = corpus.load_documents()
    assert corpus.corpus_path().is_relative_to(fresh_cache)
    assert not list(fresh_cache.rglob("*.tmp"))  # the atomic write left no temp file
    monkeypatch.setattr(corpus, "_collect_in_child", _refuse)
    assert corpus.load_documents() == docs


@pytest.mark.slow
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


@pytest.mark.slow
def test_tokenizer_and_token_files_are_cached(fresh_cache, monkeypatch):
    cfg = TrainConfig(vocab_size=512)
    manifest = data.prepare(cfg, VOCAB)
    tokens = data.open_tokens(cfg, manifest)
    files = sorted(p.name for p in fresh_cache.rglob("*") if p.name.startswith(("bpe-", "pack-")))
    assert len(files) == 4, files  # tokenizer.json, pack manifest, train.bin, validation.bin
    monkeypatch.setattr(tokenizer, "train_tokenizer", _refuse)
    monkeypatch.setattr(data.Tok, "encode", _refuse)
    assert data.prepare(cfg, VOCAB) == manifest
    again = data.open_tokens(cfg, manifest)
    assert all(np.array_equal(tokens[k], again[k]) for k in tokens)


@pytest.mark.slow
def test_token_stream_separates_documents(cache):
    cfg = TrainConfig()
    tokens = data.open_tokens(cfg, data.prepare(cfg, VOCAB))
    splits = corpus.load_splits()
    for name, t in tokens.items():
        assert 0 <= t.min() and t.max() < VOCAB
        assert (t == 0).sum() == len(splits[name])  # one EOT after each document
        assert t[-1] == 0


# -- the lr schedule ---------------------------------------------------------------------------
def test_lr_schedule_warms_up_then_decays_to_min_lr_ratio():
    cfg = TrainConfig(steps=100)  # warmup: 10 % of the steps; min_lr_ratio 0.1
    f = lambda s: lr_factor(cfg, s)  # noqa: E731
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)  # the cosine starts at the peak
    assert f(55) == pytest.approx(0.55)  # half way: (1 + 0.1) / 2
    assert f(100) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 101)]
    assert values == sorted(values, reverse=True)

    cfg = TrainConfig(steps=20, warmup_steps=4, min_lr_ratio=0.2)
    assert lr_factor(cfg, 0) == pytest.approx(0.25)
    assert lr_factor(cfg, 3) == pytest.approx(1.0)
    assert lr_factor(cfg, 12) == pytest.approx(0.6)  # progress 8/16: 0.2 + 0.8 / 2
    assert lr_factor(cfg, 19) == pytest.approx(0.2 + 0.4 * (1 + math.cos(math.pi * 15 / 16)))
    assert lr_factor(cfg, 20) == pytest.approx(0.2)
    assert lr_factor(TrainConfig(steps=10, warmup_steps=0), 0) == pytest.approx(1.0)


# -- the sampler -------------------------------------------------------------------------------
SEQ, GB = 8, 12


def _sampler(seed=0, n_tokens=10 * SEQ * GB + 5):
    return data.Sampler(np.arange(n_tokens, dtype=np.int64), SEQ, GB, seed)


def _global_batch(sampler, step, world, accum):
    """The global batch as every (micro-step, rank) slice concatenated, and the slices."""
    micro = GB // (world * accum)
    slices = [sampler.micro_batch(step, a, r, world, micro)
              for a in range(accum) for r in range(world)]
    return torch.cat([x for x, _ in slices]), slices


def test_sampler_same_global_batches_for_any_world_size():
    ref = _sampler()
    for step in (0, 3, 9, 10, 25):  # steps_per_epoch is 10: these cross epochs
        want, _ = _global_batch(ref, step, 1, 1)
        for world, accum in ((2, 1), (3, 1), (2, 2), (4, 3), (1, 4)):
            got, slices = _global_batch(_sampler(), step, world, accum)
            assert torch.equal(got, want), (step, world, accum)
            for x, y in slices:  # targets are the inputs shifted by one token
                assert x.shape == (GB // (world * accum), SEQ)
                assert torch.equal(y[:, :-1], x[:, 1:])


def test_sampler_micro_batch_slices_tile_the_global_batch():
    s = _sampler()
    for world, accum in ((2, 3), (4, 1), (6, 2)):
        _, slices = _global_batch(s, 7, world, accum)
        starts = sorted(int(x[i, 0]) for x, _ in slices for i in range(len(x)))
        assert starts == sorted(int(w) * SEQ for w in s.global_windows(7))  # each window once
        assert len(set(starts)) == GB


def test_sampler_resume_at_step_s_gives_the_same_batch():
    walked = _sampler(seed=3)
    seen = {step: walked.micro_batch(step, 0, 1, 2, GB // 2)[0] for step in range(25)}
    for step in (0, 9, 10, 17, 24):  # a new sampler (a resumed run) jumps straight to `step`
        assert torch.equal(_sampler(seed=3).micro_batch(step, 0, 1, 2, GB // 2)[0], seen[step])
    assert not torch.equal(_sampler(seed=4).micro_batch(5, 0, 1, 2, GB // 2)[0], seen[5])


def test_sampler_epochs_repermute():
    s = _sampler()
    assert s.steps_per_epoch == 10 and s.n_windows == 10 * GB
    epochs = [np.concatenate([s.global_windows(e * 10 + i) for i in range(10)]) for e in range(3)]
    for ep in epochs:  # every epoch visits every window exactly once ...
        assert sorted(ep) == list(range(s.n_windows))
    assert not np.array_equal(epochs[0], epochs[1])  # ... in a new order
    assert not np.array_equal(epochs[1], epochs[2])


# -- the DeepSpeed JSON ------------------------------------------------------------------------
def _ds_cfg(tmp_path, ds: dict, **kw) -> TrainConfig:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    args = dict(engine="deepspeed", deepspeed_config=str(path), global_batch=16, grad_accum=2,
                grad_clip=0.5, recipe="sage-hybrid", lr=1e-3)
    return TrainConfig(**{**args, **kw})


def test_deepspeed_json_fills_agreeing_and_auto_fields(tmp_path):
    from sage_dist.train.deepspeed_engine import deepspeed_json

    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2,
          "gradient_clipping": 0.5, "bf16": {"enabled": "auto"},
          "optimizer": {"type": "sage_hybrid", "params": {"lr": 5.0, "betas": [0.1, 0.2]}},
          "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 10}},
          "zero_optimization": {"stage": 2}}
    out = deepspeed_json(_ds_cfg(tmp_path, ds), world=2)
    assert out["train_micro_batch_size_per_gpu"] == 4  # 16 / (2 ranks x 2 micro-steps)
    assert out["gradient_accumulation_steps"] == 2 and out["train_batch_size"] == 16
    assert out["gradient_clipping"] == 0.5 and out["bf16"] == {"enabled": False}
    assert out["optimizer"] == {"type": "sage-hybrid", "params": {"lr": 1e-3}}
    assert "scheduler" not in out  # the loop schedules the lr itself
    assert out["zero_optimization"] == {"stage": 2}
    # Our adamw, not DeepSpeed's built-in of the same name.
    out = deepspeed_json(_ds_cfg(tmp_path, {"gradient_clipping": "auto"}, recipe="adamw"), world=2)
    assert out["optimizer"]["type"] == "sage_dist.adamw"
    # Fields the JSON leaves out count as "auto".
    out = deepspeed_json(_ds_cfg(tmp_path, {}, bf16=True, grad_accum=1), world=4)
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"],
            out["train_batch_size"], out["bf16"]["enabled"]) == (4, 1, 16, True)


@pytest.mark.parametrize("field, words", [
    ({"train_micro_batch_size_per_gpu": 8}, ["train_micro_batch_size_per_gpu=8", "world size 2",
                                             'allowed: 4 or "auto"']),
    ({"gradient_accumulation_steps": 4}, ["gradient_accumulation_steps=4", "grad_accum = 2",
                                          'allowed: 2 or "auto"']),
    ({"train_batch_size": 32}, ["train_batch_size=32", "global_batch = 16", "allowed: 16"]),
    ({"gradient_clipping": 1.0}, ["gradient_clipping=1.0", "grad_clip = 0.5", "allowed: 0.5"]),
    ({"bf16": {"enabled": True}}, ["bf16.enabled=True", "bf16=False", 'allowed: false or "auto"']),
    ({"optimizer": {"type": "adamw"}}, ["optimizer.type='adamw'", "recipe='sage-hybrid'",
                                        "allowed: 'sage-hybrid' or no optimizer section"]),
])
def test_deepspeed_json_refuses_what_disagrees(field, words, tmp_path):
    from sage_dist.train.deepspeed_engine import deepspeed_json

    with pytest.raises(ConfigError) as e:
        deepspeed_json(_ds_cfg(tmp_path, field), world=2)
    assert all(w in str(e.value) for w in words + ["ds.json"]), str(e.value)


# -- no --config: tiny_single, overridden by the arguments -------------------------------------
def _shipped(name: str) -> TrainConfig:
    from sage_dist.models import find_config
    return TrainConfig(**C.load_yaml(str(find_config(name, "train"))))


def test_no_arguments_is_tiny_single(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # shipped configs are found from any directory
    assert C.load_config([]) == _shipped("tiny_single")
    cfg = C.load_config(["--steps", "5", "--recipe", "scale"])
    want = _shipped("tiny_single")
    want.steps, want.recipe = 5, "scale"
    assert cfg == want
    assert C.model_config(cfg).vocab_size == VOCAB
    for spec in ("tiny_zero2", "configs/train/tiny_zero2.yaml"):  # a name, a docs path
        cfg = C.load_config(["--config", spec])
        assert cfg == _shipped("tiny_zero2") and cfg.engine == "deepspeed"
        assert C.find("deepspeed_config", cfg.deepspeed_config, "deepspeed").is_file()


def test_entry_point_without_config_runs_the_trainer(monkeypatch):
    seen = []
    monkeypatch.setattr("sage_dist.train.loop.main", lambda argv: seen.append(argv) or 7)
    assert cli.main([]) == 7 and cli.main(["--steps", "5"]) == 7
    assert seen == [[], ["--steps", "5"]]


@pytest.mark.parametrize("argv, words", [
    (["--vocab_size", "4096"], ["4096", "2048"]),
    (["--seq_len", "1000"], ["seq_len=1000", "256"]),
    (["--steps", "0"], ["steps=0", ">= 1"]),
    (["--model", "/nonexistent.json"], ["model=", "/nonexistent.json", "llama_tiny"]),
    (["--config", "no_such_config"], ["no_such_config", "tiny_single", "tiny_zero2"]),
    (["--lr", "-1"], ["lr=-1", "positive"]),
    (["--recipe", "no-such-recipe"], ["recipe=", "no-such-recipe", "sage-hybrid"]),
    (["--batch", "4"], ["'batch'", "allowed keys"]),
])
def test_bad_arguments_fail_clearly(argv, words, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*argv, "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not out.exists()


@pytest.mark.slow
def test_short_run_without_config_lowers_validation_loss(cache, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--steps", "30", "--global_batch", "4", "--eval_every", "15", "--eval_batches", "2",
            "--seed", "1", "--plot", "false", "--progress", "false", "--out_dir", str(out)]
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    want = C.to_dict(_shipped("tiny_single"))
    want.update(steps=30, global_batch=4, eval_every=15, eval_batches=2, seed=1, plot=False,
                progress=False, out_dir=str(out))
    assert saved == want
    recs = read_metrics(out / "metrics.jsonl")
    evals = [(r["step"], r["val_loss"]) for r in recs if r["kind"] == "eval"]
    assert [s for s, _ in evals] == [0, 15, 30]
    assert evals[-1][1] < evals[0][1] - 0.5, evals
    final = next(r for r in recs if r["kind"] == "final")
    mem = final["memory"][0]  # sage_dist.memory's breakdown, flat, plus the peak RSS
    assert mem["optimizer_state/total"] > 0 and mem["parameters/total"] > 0
    assert mem["peak_rss"] > 0
    text = capsys.readouterr().out
    assert re.search(r"^final: step 30 val_loss [\d.]+ val_ppl [\d.]+ \(1 ranks, single\)",
                     text, re.M), text
    assert text.count("sage_dist.memory breakdown") == 2  # at the start and after the end


@pytest.mark.slow
def test_module_entry_point_overrides_from_another_directory(cache, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", SAGE_DIST_CACHE=str(cache))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-m", "sage_dist.train", *SHORT, "--recipe", "scale",
                        "--out_dir", "tmp"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "final: step 3 " in p.stdout
    saved = json.loads((tmp_path / "tmp" / "config.json").read_text())
    assert (saved["recipe"], saved["steps"], saved["engine"]) == ("scale", 3, "single")


def test_fault_kill_test_hook_names_a_step_and_a_rank(monkeypatch):
    from sage_dist.train.loop import FAULT_KILL_ENV, fault_kill_step

    monkeypatch.delenv(FAULT_KILL_ENV, raising=False)
    assert fault_kill_step(0) is None
    monkeypatch.setenv(FAULT_KILL_ENV, "12:1")
    assert (fault_kill_step(0), fault_kill_step(1)) == (None, 12)
    monkeypatch.setenv(FAULT_KILL_ENV, "7")  # rank 0 by default
    assert fault_kill_step(0) == 7
    monkeypatch.setenv(FAULT_KILL_ENV, "soon")
    with pytest.raises(ConfigError, match="STEP:RANK"):
        fault_kill_step(0)
    assert "kill_at_step" not in C.FIELDS and "kill_rank" not in C.FIELDS
