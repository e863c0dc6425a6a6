"""The pretraining loop: `python -m sage_dist.train [--config NAME_OR_PATH] [--key value ...]`.

Order of work: parse and validate the config, the model config, the tokenizer vocabulary and
the DeepSpeed JSON (all before any process group exists, so bad input fails fast with exit
status 2); then join the process group, pack the data on rank 0 (the others wait and reuse it),
build the engine, resume if asked, train. Launch with torchrun (or the DeepSpeed launcher) for
ddp / fsdp2 / deepspeed; engine=single runs in one process. Without --config the job is the
shipped `tiny_single` config, with the command line's overrides.

Test hook (not a config key): SAGE_DIST_FAULT_KILL="STEP:RANK" makes rank RANK SIGKILL itself
at the start of step STEP, as a crash would; the tests use it to check that a resumed run
reproduces an uninterrupted one. It fires once per out_dir (a marker file there), so a group
that torchrun restarts runs on past STEP. "STEP:RANK:STOP" sends SIGSTOP instead (a rank that
hangs rather than dies: its peers fail after dist_timeout_s).

Faults: a failing or timed-out collective (a peer died or hangs) ends the run with
CollectiveError naming the step and the phase (exit 1); a checkpoint that cannot be written
(disk full, permission) with CheckpointWriteError (exit 1), the earlier ones untouched; under
torchrun's --max-restarts (the launchers pass it) a restarted group resumes from the newest
checkpoint that verifies, even if `resume` is none.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from . import checkpoint as CK
from . import config as C
from .config import ConfigError, TrainConfig
from . import dist as DI
from .dist import (CollectiveError, all_gather_objects, all_reduce_sum, barrier, destroy,
                   init_distributed, mean_across_ranks, on_rank0_then_all, pick_device)
from .metrics import MetricsLog, memory_record, plot_losses, ppl

DIGEST_MAX_PARAMS = 50_000_000  # final parameter hash (replica check) only for small models
FAULT_KILL_ENV = "SAGE_DIST_FAULT_KILL"


def fault_kill_spec(rank: int) -> tuple[int | None, int]:
    """(step, signal) at which this rank kills itself under the SAGE_DIST_FAULT_KILL hook."""
    spec = os.environ.get(FAULT_KILL_ENV, "").strip()
    if not spec:
        return None, signal.SIGKILL
    parts = spec.split(":")
    try:
        step_n, rank_n = int(parts[0]), int(parts[1] if len(parts) > 1 and parts[1] else 0)
        if len(parts) > 3 or (len(parts) == 3 and parts[2].upper() not in ("KILL", "STOP")):
            raise ValueError
    except ValueError:
        raise ConfigError(f"{FAULT_KILL_ENV}={spec!r}: allowed is STEP:RANK[:KILL|STOP] "
                          f"(integers), e.g. 12:1") from None
    sig = signal.SIGSTOP if len(parts) == 3 and parts[2].upper() == "STOP" else signal.SIGKILL
    return (step_n if rank == rank_n else None), sig


def fault_kill_step(rank: int) -> int | None:
    """The step at which this rank kills itself under the SAGE_DIST_FAULT_KILL test hook."""
    return fault_kill_spec(rank)[0]


def fault_kill(out: Path, rank: int, step: int, sig) -> None:
    """Fire the kill hook once per out_dir: a restarted group finds the marker and runs on."""
    marker = out / f".fault_kill_rank{rank}_step{step}"
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), sig)


def elastic_restart() -> int:
    """How many times torchrun has restarted this group (0: the first attempt)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


COLLECTIVE_WORDS = ("gloo", "nccl", "connection closed", "connection reset", "timed out",
                    "timeout", "broken pipe", "peer", "socket", "distbackenderror")


def is_collective_failure(e: BaseException) -> bool:
    """Whether an exception comes from a collective whose peer died or hangs."""
    dist_error = getattr(torch.distributed, "DistError", ())
    if dist_error and isinstance(e, dist_error):
        return True
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, RuntimeError) and any(w in text for w in COLLECTIVE_WORDS)


def collective_error(e: BaseException) -> CollectiveError:
    step, what = DI.PHASE["step"], DI.PHASE["what"]
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    limit = f"{DI.TIMEOUT_S:g} s" if DI.TIMEOUT_S is not None else "torch's default"
    return CollectiveError(
        f"step {step}: the collective of {what} failed on rank {DI.PHASE['rank']} -- a peer rank "
        f"died or stopped responding (process-group timeout {limit}, config key "
        f"dist_timeout_s): {first[:400]}")


def prepare_checks(argv: list[str]):
    """Everything that can fail on bad input, before any process group or training work."""
    cfg = C.load_config(argv)
    world = C.world_from_env()
    C.validate_world(cfg, world)
    mc = C.model_config(cfg)
    from .data import check_vocab
    check_vocab(cfg, mc.vocab_size)
    ds_cfg = None
    if cfg.engine == "deepspeed":
        from .deepspeed_engine import deepspeed_json
        ds_cfg = deepspeed_json(cfg, world)
    return cfg, mc, ds_cfg


def rank0_logger(rank: int):
    def log(msg: str) -> None:
        if rank == 0:
            from tqdm import tqdm
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()
    return log


def load_data(cfg: TrainConfig, vocab_size: int, rank: int):
    """(manifest, train sampler, validation windows); rank 0 packs the tokens first."""
    from . import data as D

    manifest = on_rank0_then_all(lambda: D.prepare(cfg, vocab_size), rank)
    tokens = D.open_tokens(cfg, manifest)
    if manifest["vocab_size"] > vocab_size:
        raise ConfigError(f"the tokenizer's vocabulary ({manifest['vocab_size']}) is larger "
                          f"than the model's vocab_size {vocab_size}")
    sampler = D.Sampler(tokens["train"], cfg.seq_len, cfg.global_batch, cfg.seed)
    val = D.eval_windows(tokens["validation"], cfg.eval_batches * cfg.global_batch, cfg.seq_len)
    return manifest, sampler, val


def describe(log, cfg, mc, engine, manifest, sampler, world: int) -> int:
    """Log the model, engine and data; returns the parameter count."""
    from sage_dist.shard.zero import numel

    n_params = sum(numel(p) for p in engine.module().parameters())
    log(f"model: {n_params / 1e6:.2f}M params, {mc.num_hidden_layers} layers, hidden "
        f"{mc.hidden_size}, vocab {mc.vocab_size} ({cfg.model})")
    log(f"{engine.describe()}; world size {world}, device {engine.device.type}, "
        f"{'bf16 mixed' if cfg.bf16 else 'fp32'}")
    log(f"data: {cfg.data}, tokenizer vocab {manifest['vocab_size']}, train "
        f"{manifest['splits']['train']['tokens']:,} tokens ({sampler.steps_per_epoch} steps per "
        f"epoch), validation {manifest['splits']['validation']['tokens']:,} tokens; global batch "
        f"{cfg.global_batch} = {cfg.data_parallel(0, world)[1]} data-parallel ranks x "
        f"{cfg.micro_batch(world)} x {cfg.grad_accum} accumulation, seq {cfg.seq_len}"
        + (f"; tensor parallel {cfg.tp}" if cfg.tp > 1 else ""))
    return n_params


def gather_memory(engine, world: int) -> tuple[list[dict], list[dict]]:
    """Every rank's sage_dist.memory breakdown and its flat metrics record (a collective)."""
    breakdown = engine.memory()
    pairs = all_gather_objects((breakdown, memory_record(breakdown)), world)
    return [b for b, _ in pairs], [r for _, r in pairs]


def memory_table(breakdowns: list[dict], title: str) -> str:
    from sage_dist.memory import format_table
    return format_table(breakdowns, title=title)


def evaluate(engine, windows: torch.Tensor, cfg: TrainConfig, rank: int, world: int) -> float:
    """Mean validation loss over `windows`, each rank scoring its micro-batch slices."""
    total = torch.zeros(2, dtype=torch.float64)
    g, micro = cfg.global_batch, cfg.micro_batch(world)
    rank, world = cfg.data_parallel(rank, world)   # tp ranks score the same slices
    for b in range(len(windows) // g):
        for a in range(cfg.grad_accum):
            lo = b * g + (a * world + rank) * micro
            chunk = windows[lo:lo + micro].to(engine.device)
            loss = engine.eval_loss(chunk[:, :-1], chunk[:, 1:])
            total += torch.tensor([loss.item() * len(chunk), len(chunk)], dtype=torch.float64)
    all_reduce_sum(total)
    return (total[0] / total[1]).item()


def train_step(engine, sampler, cfg: TrainConfig, step: int, rank: int, world: int,
               nan_at=(None, None)):
    """One optimizer step (1-based `step`): (mean loss over ranks, lr, grad norm, what was
    skipped for a NaN/Inf gradient on this rank: None, or {params_skipped, step_skipped})."""
    from .engines import inject_nan_hook

    lr = engine.set_lr(C.lr_factor(cfg, step - 1))
    micro, loss_sum = cfg.micro_batch(world), 0.0
    DI.set_phase(step, "forward/backward (the engine's gradient all-reduce / reduce-scatter)")
    hook = inject_nan_hook(engine.module(), nan_at[1])[1] if nan_at[0] == step else None
    try:
        for a in range(cfg.grad_accum):
            x, y = sampler.micro_batch(step - 1, a, *cfg.data_parallel(rank, world), micro)
            loss = engine.micro_step(x.to(engine.device), y.to(engine.device),
                                     last=a == cfg.grad_accum - 1)
            loss_sum += loss.item()
    finally:
        if hook is not None:
            hook.remove()
    DI.set_phase(step, "the optimizer step (the engine's gradient reduction, norm and "
                       "clipping, the optimizer's all-reduce)")
    before = engine.nonfinite_skips()
    grad_norm = engine.step()
    skipped = {"params_skipped": engine.nonfinite_skips() - before,
               "step_skipped": engine.step_skipped()}
    skipped = skipped if skipped["params_skipped"] or skipped["step_skipped"] else None
    DI.set_phase(step, "the all-reduce of the training loss")
    loss = mean_across_ranks(loss_sum / cfg.grad_accum)
    if not math.isfinite(loss):
        raise FloatingPointError(f"training diverged: loss {loss} at step {step}")
    return loss, lr, grad_norm, skipped


def open_out_dir_and_resume(engine, cfg: TrainConfig, out: Path, ckpt_root: Path, rank: int,
                            log) -> int:
    """Create out_dir, drop a killed save's leftovers, load the checkpoint `resume` names;
    returns the step to continue from (0: a fresh run)."""
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        CK.remove_stale(ckpt_root)
    barrier()
    start_step, ckpt = CK.resume(engine, cfg, ckpt_root, rank)
    if ckpt is not None:
        log(f"resumed from {ckpt} at step {start_step}")
    return start_step


def write_final(engine, cfg: TrainConfig, out: Path, rank: int, world: int, last_val: float,
                n_params: int, nonfinite: list | None = None):
    """final_rank<r>.json (with the parameter hash, a collective); returns it with every
    rank's memory breakdown and flat memory records."""
    tables, mem = gather_memory(engine, world)
    digest = engine.param_digest() if n_params <= DIGEST_MAX_PARAMS else None
    final = {"rank": rank, "world_size": world, "engine": engine.name, "steps": cfg.steps,
             "param_sha256": digest, "final_val_loss": last_val, "final_val_ppl": ppl(last_val),
             "nonfinite": nonfinite or [], "nonfinite_count": engine.nonfinite_skips()}
    (out / f"final_rank{rank}.json").write_text(json.dumps(final, indent=1))
    return final, tables, mem


def run(argv: list[str]) -> dict:
    """The outline of a run: checks, process group, data, engine, resume, train, finish."""
    start = time.perf_counter()
    cfg, mc, ds_cfg = prepare_checks(argv)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg)
    rank, world = init_distributed(cfg, device)
    is0, log, (kill_at, kill_sig) = rank == 0, rank0_logger(rank), fault_kill_spec(rank)
    DI.set_phase(0, "setup (data, engine, resume)", rank)
    restart = elastic_restart()
    if restart:
        log(f"elastic restart {restart} (torchrun restarted the group after a failure)")
        if cfg.resume == "none":
            cfg.resume = "auto"
            log("resume: none -> auto for the restarted group")
    try:
        return _train(cfg, mc, ds_cfg, device, rank, world, is0, log, kill_at, kill_sig, start)
    except RuntimeError as e:
        if isinstance(e, (CollectiveError, CK.CheckpointWriteError)) or \
                not is_collective_failure(e):
            raise
        raise collective_error(e) from e


def _train(cfg, mc, ds_cfg, device, rank, world, is0, log, kill_at, kill_sig, start) -> dict:
    manifest, sampler, val = load_data(cfg, mc.vocab_size, rank)

    from .engines import build_engine
    engine = build_engine(cfg, mc, device, rank, world, ds_cfg)
    out, ckpt_root = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"
    start_step = open_out_dir_and_resume(engine, cfg, out, ckpt_root, rank, log)
    metrics = MetricsLog(out / "metrics.jsonl", is0, resume_step=start_step)
    n_params = describe(log, cfg, mc, engine, manifest, sampler, world)
    if is0:
        (out / "config.json").write_text(json.dumps(C.to_dict(cfg), indent=1))

    tables, mem = gather_memory(engine, world)   # at start: model and state, no grads
    metrics.write({"kind": "memory", "step": start_step, "memory": mem})
    log(memory_table(tables, f"sage_dist.memory breakdown at step {start_step}"))

    def eval_and_log(step: int) -> float:
        DI.set_phase(step, "the evaluation (its all-reduce of the validation loss)")
        loss = evaluate(engine, val, cfg, rank, world)
        metrics.write({"kind": "eval", "step": step, "val_loss": loss, "val_ppl": ppl(loss)})
        log(f"step {step:5d} | val_loss {loss:.4f} | val_ppl {ppl(loss):.2f}")
        return loss

    first_val = eval_and_log(0) if start_step == 0 else None
    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (is0 and cfg.progress),
               dynamic_ncols=True, file=sys.stderr, desc="train",
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    tokens_per_step = cfg.global_batch * cfg.seq_len
    last_val, train_time, window, nonfinite = first_val, 0.0, [], []
    from .engines import fault_nan_spec
    nan_at = fault_nan_spec(rank)
    for step in range(start_step + 1, cfg.steps + 1):
        if step == kill_at:
            fault_kill(out, rank, step, kill_sig)
        t0 = time.perf_counter()
        loss, lr, grad_norm, skipped = train_step(engine, sampler, cfg, step, rank, world,
                                                  nan_at)
        dt = time.perf_counter() - t0
        train_time += dt
        window.append(loss)
        rec = {"kind": "train", "step": step, "loss": loss, "ppl": ppl(loss), "lr": lr,
               "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / dt}
        if skipped is not None:
            nonfinite.append({"step": step, **skipped})
            rec["nonfinite"] = skipped
            log(f"warning: step {step}: non-finite gradient; " + (
                "the engine skipped the whole step on every rank" if skipped["step_skipped"]
                else f"{skipped['params_skipped']} parameter(s) skipped (state untouched)"))
        if step % cfg.log_every == 0 or step == cfg.steps:
            DI.set_phase(step, "the all-gather of the memory breakdowns")
            rec["memory"] = gather_memory(engine, world)[1]
            log(f"step {step:5d} | train_loss {sum(window) / len(window):.4f} | lr {lr:.3e} | "
                f"grad_norm {grad_norm:.3f} | {tokens_per_step / dt:,.0f} tok/s | peak RSS "
                f"{', '.join(format(m['peak_rss'] / 2 ** 20, '.0f') for m in rec['memory'])} MiB")
            window = []
        metrics.write(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", refresh=False)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            last_val = eval_and_log(step)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            DI.set_phase(step, "the checkpoint save")
            log(f"checkpoint: {CK.save_checkpoint(engine, cfg, step, rank, world, ckpt_root)}")
    bar.close()
    DI.set_phase(cfg.steps, "the end of the run (final evaluation, parameter hash)")
    if last_val is None:  # resumed from the last step's checkpoint: nothing left to train
        last_val = evaluate(engine, val, cfg, rank, world)

    final, tables, mem = write_final(engine, cfg, out, rank, world, last_val, n_params,
                                     nonfinite)
    result = dict(final, seconds=time.perf_counter() - start, memory=mem,
                  step0_val_loss=first_val, train_seconds=train_time)
    if is0:
        metrics.write({"kind": "final", "step": cfg.steps, "val_loss": last_val,
                       "val_ppl": final["final_val_ppl"], "memory": mem, "world_size": world,
                       "seconds": result["seconds"]})
        log(memory_table(tables, "sage_dist.memory breakdown (after the last step)"))
        if cfg.plot:
            png = plot_losses(out / "metrics.jsonl", out / "loss.png",
                              f"{cfg.recipe} / {engine.name} / {world} rank(s)")
            log(f"plot: {png}")
        log(f"final: step {cfg.steps} val_loss {last_val:.4f} val_ppl {ppl(last_val):.2f} "
            f"({world} ranks, {engine.name}) in {result['seconds']:.1f}s; metrics: "
            f"{out / 'metrics.jsonl'}")
    barrier()
    return result


def main(argv: list[str] | None = None) -> int:
    """0 on success, 2 on bad input (before any training), 1 if training diverged."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        run(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except (FloatingPointError, CollectiveError, CK.CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        destroy()
    return 0
