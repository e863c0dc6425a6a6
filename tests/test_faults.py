"""Faults at scale (docs/TRAINING.md, "Faults"): elastic restarts, damaged checkpoints, a full
disk, a dead or hung peer.

The slow tests run the real job: 2 ranks over gloo on CPU, the tiny Llama in fp32, 20 steps,
through torchrun (or launch/run_local.sh with restarts on), sharing one data cache.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sage_dist.train import checkpoint as CK
from sage_dist.train.config import ConfigError, TrainConfig
from sage_dist.train.loop import FAULT_KILL_ENV, fault_kill_spec
from sage_dist.train.metrics import read_metrics
from dist_harness import free_port
from test_trainer import _env

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
COMMON = ["--steps", str(STEPS), "--seq_len", "32", "--global_batch", "16", "--eval_every", "10",
          "--eval_batches", "1", "--progress", "false", "--plot", "false", "--threads", "1",
          "--checkpoint_every", "5", "--keep_checkpoints", "2"]


# -- checkpoint integrity without training -------------------------------------------------
def _fake_checkpoints(root: Path, steps=(5, 10)) -> list[Path]:
    out = []
    for s in steps:
        d = root / f"step_{s:08d}"
        (d / "deepspeed").mkdir(parents=True)
        for r in (0, 1):
            (d / "deepspeed" / f"zero_pp_rank_{r}_optim_states.pt").write_bytes(bytes(range(256)) * 8)
        (d / "trainer.json").write_text(json.dumps({"step": s}))
        CK.write_manifest(d)
        out.append(d)
    return out


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[:-7])


def _flip(p: Path):  # same size: only the sha256 can tell
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x10
    p.write_bytes(bytes(b))


DAMAGE = {"truncate": _truncate, "bitflip": _flip, "delete": Path.unlink}
RANK1 = "deepspeed/zero_pp_rank_1_optim_states.pt"


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_auto_skips_a_damaged_checkpoint_naming_the_file(damage, tmp_path):
    old, new = _fake_checkpoints(tmp_path)
    DAMAGE[damage](new / RANK1)
    warnings = []
    cfg = TrainConfig(resume="auto")
    assert CK.resolve_resume(cfg, tmp_path, warn=warnings.append) == old
    assert len(warnings) == 1 and new.name in warnings[0] and RANK1 in warnings[0], warnings
    # an explicit path to the damaged one is refused too
    with pytest.raises(ConfigError, match="zero_pp_rank_1"):
        CK.resolve_resume(TrainConfig(resume=str(new)), tmp_path)


def test_resume_auto_with_every_checkpoint_damaged_names_them(tmp_path):
    old, new = _fake_checkpoints(tmp_path)
    _flip(old / RANK1)
    (new / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError) as e:
        CK.resolve_resume(TrainConfig(resume="auto"), tmp_path, warn=None)
    msg = str(e.value)
    assert "none of the 2 checkpoint(s)" in msg and old.name in msg and new.name in msg, msg
    assert "sha256" in msg and "manifest.json" in msg, msg
    # no checkpoint at all is a fresh start, not an error
    assert CK.resolve_resume(TrainConfig(resume="auto"), tmp_path / "empty") is None


def test_fault_kill_spec():
    os.environ[FAULT_KILL_ENV] = "7:1:STOP"
    try:
        assert fault_kill_spec(1) == (7, signal.SIGSTOP)
        assert fault_kill_spec(0)[0] is None
        os.environ[FAULT_KILL_ENV] = "7"
        assert fault_kill_spec(0) == (7, signal.SIGKILL)
        os.environ[FAULT_KILL_ENV] = "7:x"
        with pytest.raises(ConfigError, match="STEP:RANK"):
            fault_kill_spec(0)
    finally:
        del os.environ[FAULT_KILL_ENV]


# -- the real job ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("faults_cache")


def torchrun(cache, config, out, *extra, env=None, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "sage_dist.train",
           "--config", f"configs/train/{config}.yaml", *COMMON, "--out_dir", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, env={**_env(cache), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def ok(p):
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return p


def final_loss(out):
    return next(r["loss"] for r in read_metrics(out / "metrics.jsonl")
                if r["kind"] == "train" and r["step"] == STEPS)


@pytest.fixture(scope="module")
def ref(cache, tmp_path_factory):
    """Uninterrupted 20-step runs (checkpoints at 15 and 20 kept), per engine."""
    base, outs = tmp_path_factory.mktemp("faults_ref"), {}

    def get(engine):
        if engine not in outs:
            outs[engine] = base / engine
            ok(torchrun(cache, f"tiny_{engine}", outs[engine]))
        return outs[engine]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "fsdp2"])
def test_sigkill_under_run_local_restarts_and_finishes_exactly(engine, ref, cache, tmp_path):
    expect = final_loss(ref(engine))
    out, step = tmp_path / "killed", random.Random().randint(6, 19)
    env = dict(_env(cache), NPROC="2", CONFIG=f"configs/train/tiny_{engine}.yaml",
               MAX_RESTARTS="2", LOG_RANK="all", **{FAULT_KILL_ENV: f"{step}:1"})
    t0 = time.perf_counter()
    p = subprocess.run(["bash", "launch/run_local.sh", *COMMON, "--out_dir", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    ok(p)
    restarts = p.stdout.count("elastic restart ")  # printed by rank 0 of each restarted group
    print(f"{engine}: rank 1 SIGKILLed at step {step}; restarts {restarts}, "
          f"wall {wall:.1f} s; final loss {final_loss(out)!r} vs {expect!r}")
    assert "elastic restart 1" in p.stdout and "elastic restart 2" not in p.stdout, p.stdout
    assert (out / f".fault_kill_rank1_step{step}").exists()
    assert final_loss(out) == expect  # exact: fp32 on CPU, the same global batches
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_damaged_newest_checkpoint_resume_takes_the_previous(ref, cache, tmp_path):
    base = ref("zero2")
    expect = final_loss(base)
    newest = base / "checkpoints" / "step_00000020"
    assert sorted(p.name for p in (base / "checkpoints").iterdir()) == \
        ["step_00000015", "step_00000020"]
    rank1 = "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    for damage in ("truncate", "bitflip", "delete"):
        out = tmp_path / damage
        shutil.copytree(base, out)
        DAMAGE[damage](out / "checkpoints" / newest.name / rank1)
        p = ok(torchrun(cache, "tiny_zero2", out, "--resume", "auto"))
        assert f"skipping checkpoint {newest.name}" in p.stderr and rank1 in p.stderr, p.stderr
        print(damage, "->", next((ln for ln in p.stderr.splitlines() if "skipping" in ln), ""))
        assert "resumed from" in p.stdout and "step_00000015 at step 15" in p.stdout, p.stdout
        assert final_loss(out) == expect, damage
    # every checkpoint damaged: exit 2 naming them, before any training
    out = tmp_path / "all"
    shutil.copytree(base, out)
    for name in ("step_00000015", "step_00000020"):
        _flip(out / "checkpoints" / name / rank1)
    p = torchrun(cache, "tiny_zero2", out, "--resume", "auto")
    assert p.returncode != 0
    assert "exitcode  : 2" in p.stderr or "exitcode: 2" in p.stderr, p.stderr[-3000:]
    assert "none of the 2 checkpoint(s)" in p.stderr and "step_00000015" in p.stderr \
        and "step_00000020" in p.stderr, p.stderr[-3000:]
    print("all damaged ->", next((ln for ln in p.stderr.splitlines() if "none of" in ln), ""))


def _small_tmpfs(path: Path, mib: int) -> bool:
    """Mount a size-limited tmpfs at `path` (root only); False where that is not possible."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


@pytest.mark.slow
def test_disk_full_during_a_save_stops_clearly_and_keeps_earlier_checkpoints(ref, cache,
                                                                             tmp_path):
    expect = final_loss(ref("zero2"))
    out = tmp_path / "full"
    mounted = _small_tmpfs(out, 20)  # one 12 MiB ZeRO-2 checkpoint fits, a second does not
    env = None if mounted else {CK.FAULT_SAVE_ENV: "10:1"}
    try:
        p = torchrun(cache, "tiny_zero2", out, env=env)
        print(f"disk full via {'a 20 MiB tmpfs' if mounted else 'an injected OSError'}: exit "
              f"{p.returncode}")
        assert p.returncode != 0
        assert "saving the checkpoint of step 10" in p.stderr, p.stderr[-4000:]
        print(next((ln for ln in p.stderr.splitlines() if "error: saving" in ln), "")[:600])
        assert ("the filesystem is full" if mounted else "No space left on device") \
            in p.stderr, p.stderr[-4000:]
        assert "earlier checkpoints are untouched (step_00000005)" in p.stderr, p.stderr[-4000:]
        ckpts = out / "checkpoints"
        assert sorted(d.name for d in ckpts.iterdir()) == ["step_00000005"]
        CK.verify_checkpoint(ckpts / "step_00000005")
        # the earlier checkpoint loads and the run reaches the uninterrupted loss
        again = tmp_path / "again"
        ok(torchrun(cache, "tiny_zero2", again, "--resume", str(ckpts / "step_00000005")))
        assert final_loss(again) == expect
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(out)], capture_output=True)


def _launch_by_hand(cache, config, out, extra, kill, logs: Path):
    """Two ranks without torchrun (nothing kills the survivor for us); output into files (a
    pipe nobody reads would block a rank)."""
    port, procs = free_port(), []
    logs.mkdir(parents=True, exist_ok=True)
    for rank in (0, 1):
        env = dict(_env(cache), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE="2", LOCAL_RANK=str(rank), **{FAULT_KILL_ENV: kill})
        with open(logs / f"rank{rank}.log", "w") as f:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "sage_dist.train", "--config",
                 f"configs/train/{config}.yaml", *COMMON, "--checkpoint_every", "0",
                 "--out_dir", str(out), *extra], cwd=ROOT, env=env, stdout=f,
                stderr=subprocess.STDOUT))
    return procs


@pytest.mark.slow
@pytest.mark.parametrize("how", ["KILL", "STOP"])
def test_dead_or_hung_peer_survivor_exits_naming_step_and_collective(how, cache, tmp_path):
    timeout_s, step = 15, 4
    config = "tiny_ddp" if how == "KILL" else "tiny_zero2"
    procs = _launch_by_hand(cache, config, tmp_path / how, ["--dist_timeout_s", str(timeout_s)],
                            f"{step}:1:{how}", tmp_path / "logs")
    marker = tmp_path / how / f".fault_kill_rank1_step{step}"
    try:
        deadline = time.time() + 300
        while not marker.exists() and time.time() < deadline and procs[0].poll() is None:
            time.sleep(0.1)
        t_fault = time.perf_counter()
        assert marker.exists(), (tmp_path / "logs" / "rank0.log").read_text()[-3000:]
        procs[0].wait(timeout=timeout_s + 120)
        waited = time.perf_counter() - t_fault
        err = (tmp_path / "logs" / "rank0.log").read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    print(f"{how} under {config}: survivor exited {procs[0].returncode} {waited:.1f} s after the "
          f"fault (dist_timeout_s={timeout_s})")
    assert procs[0].returncode == 1, err[-3000:]
    print(next((ln for ln in err.splitlines() if ln.startswith("error: step")), "")[:500])
    assert f"error: step {step}: the collective of" in err, err[-3000:]
    assert f"process-group timeout {timeout_s} s" in err, err[-3000:]
    assert waited < timeout_s + 30, waited


# -- kernel self-check ---------------------------------------------------------------------------
WRONG_KERNEL = r'''
import json, warnings, torch
from sage_dist import ops
lib = torch.library.Library("sage_dist", "IMPL")
def wrong(grad, C, start):  # 0.1 % off: far beyond the 1e-6 tolerance
    return ops.reference.colsum_abs(grad, C, start) * 1.001
lib.impl("colsum_abs", wrong, "CPU")
gen = torch.Generator().manual_seed(0)
R, C, start, end = 29, 67, 45, 29 * 67 - 13  # a fragment starting and ending mid-row
g = torch.randn(end - start, generator=gen)
ref = ops.reference.colsum_abs(g, C, start)
p, m, grad = (torch.randn(end - start, generator=gen) for _ in range(3))
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    outs = [ops.colsum_abs(g, C, start) for _ in range(3)]
    ops.lion_update_(p, m, grad, 1e-2, 0.9, 0.99, 0.1)  # a correct kernel: no warning
native = torch.ops.sage_dist.colsum_abs(g, C, start)
print(json.dumps({
    "warnings": [str(x.message) for x in w if "self-check" in str(x.message)],
    "equal_reference": [torch.equal(o, ref) for o in outs],
    "equal_wrong": [torch.equal(o, native) for o in outs],
    "override_in_effect": not torch.allclose(native, ref, rtol=1e-6, atol=0),
}))
'''


@pytest.mark.slow
@pytest.mark.parametrize("enabled", [True, False])
def test_a_wrong_kernel_is_caught_once_and_replaced_by_the_reference(enabled):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env["SAGE_DIST_SELF_CHECK"] = "1" if enabled else "0"
    p = subprocess.run([sys.executable, "-c", WRONG_KERNEL], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["override_in_effect"], res  # the Python kernel replaced the native one
    if enabled:
        assert len(res["warnings"]) == 1, res
        assert "sage_dist::colsum_abs" in res["warnings"][0] and "cpu" in res["warnings"][0]
        assert all(res["equal_reference"]), res
    else:
        assert res["warnings"] == [] and all(res["equal_wrong"]), res


def test_self_check_passes_for_every_native_kernel_and_is_cheap():
    import torch
    from sage_dist import ops
    from sage_dist.ops import selfcheck

    cpu = torch.device("cpu")
    t = selfcheck._inputs(cpu)
    assert not selfcheck._sage_ties(t, True).any() and not selfcheck._sage_ties(t, False).any()
    for name in ops.OPS:  # (the dispatcher's op: native where built, else the reference)
        selfcheck.check(name, cpu, getattr(torch.ops.sage_dist, name))  # warm up
        t0 = time.perf_counter()
        assert selfcheck.check(name, cpu, getattr(torch.ops.sage_dist, name)) is None, name
        assert time.perf_counter() - t0 < 0.05, name  # ~0.5 ms; generous on a loaded machine
    assert set(selfcheck._cases(t)) == set(ops.OPS)  # every op has a self-check case


# -- a NaN in one rank's gradient ---------------------------------------------------------------
NAN_STEPS, NAN_AT = 12, 6
NAN_ARGS = ["--steps", str(NAN_STEPS), "--eval_every", "100", "--checkpoint_every", "0",
            "--log_every", "100"]


def _train_losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")
            if r["kind"] == "train"}


@pytest.fixture(scope="module")
def nan_oracle(cache, tmp_path_factory):
    """One process (engine=single) with the same NaN at step NAN_AT: torch's clipping spreads
    it to every gradient, so the optimizer skips every parameter of that step."""
    from sage_dist.train.engines import FAULT_NAN_ENV
    from sage_dist.train.loop import main

    out = tmp_path_factory.mktemp("nan_oracle")
    old = {k: os.environ.get(k) for k in ("SAGE_DIST_CACHE", FAULT_NAN_ENV)}
    os.environ.update({"SAGE_DIST_CACHE": str(cache), FAULT_NAN_ENV: f"{NAN_AT}:0"})
    try:
        assert main(["--config", "configs/train/tiny_single.yaml", *COMMON, *NAN_ARGS,
                     "--out_dir", str(out)]) == 0
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero1", "zero2", "zero3"])
def test_nan_in_one_ranks_gradient_under_zero_every_rank_skips_the_same(engine, nan_oracle,
                                                                          cache, tmp_path):
    from sage_dist.train.engines import FAULT_NAN_ENV

    out = tmp_path / engine
    ok(torchrun(cache, f"tiny_{engine}", out, *NAN_ARGS, env={FAULT_NAN_ENV: f"{NAN_AT}:1"}))
    finals = [json.loads((out / f"final_rank{r}.json").read_text()) for r in (0, 1)]
    per_rank = [(f["nonfinite"], f["nonfinite_count"]) for f in finals]
    print(f"{engine}: per rank (skipped, optimizer count): {per_rank}")
    assert per_rank[0] == per_rank[1]  # identical on every rank
    assert finals[0]["nonfinite"] == [{"step": NAN_AT, "params_skipped": 0,
                                       "step_skipped": True}]  # DeepSpeed skipped the step
    oracle = json.loads((nan_oracle / "final_rank0.json").read_text())["nonfinite"]
    print(f"oracle (engine=single): {oracle}")
    assert [r["step"] for r in oracle] == [NAN_AT] and oracle[0]["params_skipped"] > 0
    # the step changed nothing, as in the oracle, whose next steps it follows
    got, want = _train_losses(out), _train_losses(nan_oracle)
    for s in range(NAN_AT + 1, NAN_STEPS + 1):
        assert got[s] == pytest.approx(want[s], rel=1e-5), (s, got[s], want[s])
    assert finals[0]["param_sha256"] == finals[1]["param_sha256"]


@pytest.mark.slow
def test_nan_with_nonfinite_raise_under_zero_raises_on_every_rank(cache, tmp_path):
    from sage_dist.train.engines import FAULT_NAN_ENV

    port, procs, logs = free_port(), [], tmp_path / "logs"
    logs.mkdir()
    for rank in (0, 1):
        env = dict(_env(cache), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE="2", LOCAL_RANK=str(rank), **{FAULT_NAN_ENV: f"{NAN_AT}:1"})
        with open(logs / f"rank{rank}.log", "w") as f:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "sage_dist.train", "--config",
                 "configs/train/tiny_zero2.yaml", *COMMON, *NAN_ARGS, "--nonfinite", "raise",
                 "--dist_timeout_s", "60", "--out_dir", str(tmp_path / "out")], cwd=ROOT,
                env=env, stdout=f, stderr=subprocess.STDOUT))
    ends = []
    try:
        for p in procs:
            p.wait(timeout=400)
            ends.append(time.perf_counter())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    texts = [(logs / f"rank{r}.log").read_text() for r in (0, 1)]
    print(f"raise: exit codes {[p.returncode for p in procs]}, exits {abs(ends[1] - ends[0]):.2f} "
          f"s apart")
    for t, p in zip(texts, procs):
        assert p.returncode == 1, t[-3000:]
        assert "error: non-finite gradient: DeepSpeed's global gradient norm is inf" in t, \
            t[-3000:]
    assert abs(ends[1] - ends[0]) < 10  # nobody waited in a collective
    steps = [r["step"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")
             if r["kind"] == "train"]
    assert max(steps) == NAN_AT - 1


@pytest.mark.slow
def test_injected_save_error_single_process(cache, tmp_path, monkeypatch, capsys):
    """The injected-ENOSPC hook (for machines that cannot mount a small tmpfs): exit 1, clear
    message, the earlier checkpoint intact."""
    from sage_dist.train.loop import main

    monkeypatch.setenv("SAGE_DIST_CACHE", str(cache))
    monkeypatch.setenv(CK.FAULT_SAVE_ENV, "4:0")
    out = tmp_path / "out"
    argv = ["--config", "configs/train/tiny_single.yaml", *COMMON, "--steps", "6",
            "--checkpoint_every", "2", "--out_dir", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "saving the checkpoint of step 4" in err and "No space left on device" in err, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]
    CK.verify_checkpoint(out / "checkpoints" / "step_00000002")
