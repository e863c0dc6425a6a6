"""The pretraining job (`python -m sage_dist.train --config ...`): engines agree, kill + resume
is exact, two torchrun nodes train one model, bad input fails before training.

Multi-process runs go through torchrun (gloo on CPU, DeepSpeed's CPU accelerator), 2 ranks,
20 steps of the tiny Llama on the embedded corpus in fp32; every run shares one data cache.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sage_dist.train.checkpoint import verify_checkpoint
from sage_dist.train.loop import FAULT_KILL_ENV, main
from sage_dist.train.metrics import read_metrics
from dist_harness import free_port

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
COMMON = ["--steps", str(STEPS), "--seq_len", "32", "--global_batch", "16", "--eval_every", "10",
          "--eval_batches", "1", "--checkpoint_every", "0", "--progress", "false",
          "--plot", "false", "--threads", "1"]
DIST_ENGINES = ["ddp", "fsdp2", "zero1", "zero2", "zero3"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("trainer_cache")
    old = os.environ.get("SAGE_DIST_CACHE")
    os.environ["SAGE_DIST_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SAGE_DIST_CACHE", None)
    else:
        os.environ["SAGE_DIST_CACHE"] = old


def _env(cache):
    # DeepSpeed JIT-builds a CPU comm op; a directory per Python environment stops other
    # environments on the machine from invalidating (and rebuilding) ours at every run.
    ext = Path.home() / ".cache" / "torch_extensions" / \
        f"env-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               SAGE_DIST_CACHE=str(cache), PYTHON=sys.executable, TORCH_EXTENSIONS_DIR=str(ext))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def torchrun(cache, config, out, *extra, nproc=2, check=True, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), "-m", "sage_dist.train",
           "--config", f"configs/train/{config}.yaml", *COMMON, "--out_dir", str(out), *extra]
    p = subprocess.run(cmd, cwd=ROOT, env={**_env(cache), **(env or {})}, capture_output=True,
                       text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return p


def step_loss(out, step=STEPS):
    return next(r["loss"] for r in read_metrics(out / "metrics.jsonl")
                if r["kind"] == "train" and r["step"] == step)


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
    """20 steps of every engine on the same global batches; returns out_dir per engine."""
    base = tmp_path_factory.mktemp("engines")
    outs = {"single": base / "single"}
    assert main(["--config", "configs/train/tiny_single.yaml", *COMMON,
                 "--out_dir", str(outs["single"])]) == 0
    for engine in DIST_ENGINES:
        outs[engine] = base / engine
        torchrun(cache, f"tiny_{engine}", outs[engine])
    return outs


@pytest.mark.slow
def test_engines_agree_on_the_step_20_loss(runs):
    losses = {e: step_loss(out) for e, out in runs.items()}
    ref = losses["single"]
    print("step-20 losses:", json.dumps(losses))
    for engine, loss in losses.items():
        assert abs(loss - ref) <= 1e-4 * abs(ref), (engine, losses)
    for engine, out in runs.items():
        recs = read_metrics(out / "metrics.jsonl")
        final = next(r for r in recs if r["kind"] == "final")
        assert final["world_size"] == (1 if engine == "single" else 2)
        mem = final["memory"]
        assert all(m["optimizer_state/total"] > 0 and m["peak_rss"] > 0 for m in mem), mem
        train = [r for r in recs if r["kind"] == "train"]
        assert [r["step"] for r in train] == list(range(1, STEPS + 1))
        assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in train)
    # ZeRO-2 holds half the optimizer state per rank of one process (even split of state).
    z2 = read_metrics(runs["zero2"] / "metrics.jsonl")[-1]["memory"]
    one = read_metrics(runs["single"] / "metrics.jsonl")[-1]["memory"][0]
    one = one["optimizer_state/total"]
    assert sum(m["optimizer_state/total"] for m in z2) == pytest.approx(one, rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_fsdp2_with_tp2_agrees_with_the_other_engines(runs, cache, tmp_path, nproc):
    """FSDP2 x TP 2 (sage_dist.fsdp.parallelize_llama): TP 2 alone on 2 ranks, FSDP 2 x TP 2
    on 4; the step-20 loss equals the single-process one within the engines' bound."""
    out = tmp_path / f"tp2_{nproc}"
    torchrun(cache, "tiny_fsdp2", out, "--tp", "2", nproc=nproc)
    ref, loss = step_loss(runs["single"]), step_loss(out)
    print(f"step-20 loss: single {ref}, fsdp2 x tp2 on {nproc} ranks {loss}")
    assert abs(loss - ref) <= 1e-4 * abs(ref)
    final = next(r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "final")
    assert final["world_size"] == nproc
    one = read_metrics(runs["single"] / "metrics.jsonl")[-1]["memory"][0]
    # every rank holds 1/nproc of the optimizer state (TP and FSDP both cut it)
    assert sum(m["optimizer_state/total"] for m in final["memory"]) == \
        pytest.approx(one["optimizer_state/total"], rel=0.05)


@pytest.mark.slow
def test_sigkill_then_resume_auto_matches_an_uninterrupted_run(runs, cache, tmp_path):
    out = tmp_path / "killed"
    ckpt10 = ["--checkpoint_every", "10"]
    p = torchrun(cache, "tiny_zero2", out, *ckpt10, check=False,
                 env={FAULT_KILL_ENV: "12:1"})  # rank 1 SIGKILLs itself at step 12
    assert p.returncode != 0
    ckpts = out / "checkpoints"
    assert sorted(d.name for d in ckpts.iterdir()) == ["step_00000010"], list(ckpts.iterdir())
    verify_checkpoint(ckpts / "step_00000010")  # every file matches its sha256
    manifest = (ckpts / "step_00000010" / "manifest.json").read_text()
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) == 11

    torchrun(cache, "tiny_zero2", out, *ckpt10, "--resume", "auto")
    assert step_loss(out) == step_loss(runs["zero2"])  # exact: fp32 on CPU, same batches
    assert (ckpts / "step_00000010" / "manifest.json").read_text() == manifest
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))  # the records past step 10 were replaced


@pytest.mark.slow
def test_multinode_script_two_nodes_one_rank_each(cache, tmp_path):
    out = tmp_path / "multinode"
    port = free_port()
    procs = []
    for node in (0, 1):
        env = dict(_env(cache), NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), NPROC_PER_NODE="1", CONFIG="configs/train/tiny_ddp.yaml",
                   RDZV_ID=f"test{port}")
        procs.append(subprocess.Popen(
            ["bash", "launch/multinode.sh", *COMMON, "--steps", "5", "--out_dir", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
    finals = [json.loads((out / f"final_rank{r}.json").read_text()) for r in (0, 1)]
    assert [f["world_size"] for f in finals] == [2, 2]
    assert finals[0]["param_sha256"] == finals[1]["param_sha256"] is not None


def _hf_tokenizer_dir(path: Path, size: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{f"w{i}": i + 1 for i in range(size - 1)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(str(path))
    return path


@pytest.mark.parametrize("case", ["missing_data", "unknown_key", "unknown_yaml_key",
                                  "bpe_vocab_too_large", "hf_tokenizer_too_large",
                                  "batch_not_divisible", "deepspeed_micro_batch"])
def test_bad_input_fails_before_training(case, cache, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = ["--config", "configs/train/tiny_single.yaml", "--out_dir", str(out)]
    if case == "missing_data":
        argv += ["--data", str(tmp_path / "no_such_corpus")]
        words = ["data=", "no_such_corpus", "not found"]
    elif case == "unknown_key":
        argv += ["--stepz", "3"]
        words = ["'stepz'", "did you mean 'steps'", "allowed keys"]
    elif case == "unknown_yaml_key":
        bad = tmp_path / "bad.yaml"
        bad.write_text((ROOT / "configs/train/tiny_single.yaml").read_text() + "lr_warmup: 5\n")
        argv = ["--config", str(bad), "--out_dir", str(out)]
        words = ["'lr_warmup'", "bad.yaml", "allowed keys"]
    elif case == "bpe_vocab_too_large":
        argv += ["--vocab_size", "4096"]
        words = ["4096", "larger than the model's vocab_size 2048"]
    elif case == "hf_tokenizer_too_large":
        argv += ["--tokenizer", str(_hf_tokenizer_dir(tmp_path / "tok", 3000))]
        words = ["(3000)", "larger than the model's vocab_size 2048"]
    elif case == "batch_not_divisible":
        monkeypatch.setenv("WORLD_SIZE", "3")
        argv += ["--engine", "ddp"]
        words = ["global_batch=16", "world size 3"]
    else:  # configs/deepspeed/zero2.json says micro-batch 8; one rank x 16 disagrees
        argv += ["--engine", "deepspeed", "--deepspeed_config", "configs/deepspeed/zero2.json"]
        words = ["train_micro_batch_size_per_gpu=8", "16", "zero2.json"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not out.exists()  # nothing was trained or written


@pytest.mark.slow
def test_entry_point_exit_code(cache):
    p = subprocess.run([sys.executable, "-m", "sage_dist.train", "--config",
                        "configs/train/tiny_single.yaml", "--no_such_key", "1"], cwd=ROOT,
                       env=_env(cache), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "no_such_key" in p.stderr, p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("gloo_used", [False, True])
def test_end_process_after_gloo_skips_finalisation(gloo_used):
    """After a gloo group the entry point leaves without interpreter finalisation (gloo's
    worker threads may still be freeing tensors then), keeping the job's exit code and every
    line already printed; without one it exits normally."""
    code = ("import atexit, sys\n"
            "from sage_dist.train import cli, dist\n"
            f"dist.GLOO_USED = {gloo_used}\n"
            "atexit.register(lambda: print('finalised'))\n"
            "sys.stdout.write('written before exit')\n"  # no newline: still buffered
            "cli.end_process(3)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert p.returncode == 3, p.stderr
    assert p.stdout.startswith("written before exit"), p.stdout
    assert ("finalised" in p.stdout) is not gloo_used, p.stdout
