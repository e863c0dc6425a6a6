"""The pretraining loop: `python -m sage_dist.train --config configs/train/NAME.yaml [--key value]`.

Order of work: parse and validate the config, the model config, the tokenizer vocabulary and
the DeepSpeed JSON (all before any process group exists, so bad input fails fast with exit
status 2); then join the process group, pack the data on rank 0 (the others wait and reuse it),
build the engine, resume if asked, train. Launch with torchrun (or the DeepSpeed launcher) for
ddp / fsdp2 / deepspeed; engine=single runs in one process.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import config as C
from .config import ConfigError, TrainConfig
from .corpus import atomic_write_bytes
from .metrics import MetricsLog, memory_table, plot_losses, ppl

CKPT_PREFIX = "step_"
DIGEST_MAX_PARAMS = 50_000_000  # final parameter hash (replica check) only for small models


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine down to min_lr_ratio; `step` is 0-based."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.1 * cfg.steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# -- distributed set-up ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: TrainConfig, device: torch.device) -> tuple[int, int]:
    if cfg.engine == "single":
        return 0, 1
    if "RANK" not in os.environ:  # one process without a launcher: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    global GLOO_USED
    GLOO_USED = GLOO_USED or "gloo" in str(dist.get_backend())  # also "cpu:gloo,cuda:nccl"
    return dist.get_rank(), dist.get_world_size()


# Set once this process has run a gloo process group; the command-line entry then ends the
# process without interpreter finalisation (see sage_dist.train.cli.end_process).
GLOO_USED = False


def barrier():
    if dist.is_initialized():
        dist.barrier()


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda': CUDA is not available on this machine")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def on_rank0_then_all(fn, rank: int):
    """Run fn on rank 0 first (it writes caches), then on the others; an error on rank 0 is
    raised on every rank instead of leaving them waiting."""
    err = None
    result = None
    if rank == 0:
        try:
            result = fn()
        except ConfigError as e:
            err = str(e)
    if dist.is_initialized():
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err is not None:
        raise ConfigError(err)
    return result if rank == 0 else fn()


# -- checkpoints -------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(ckpt: Path) -> None:
    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            files[str(p.relative_to(ckpt))] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    atomic_write_bytes(ckpt / "manifest.json", json.dumps({"files": files}, indent=1).encode())


def verify_checkpoint(ckpt: Path, hashes: bool = True) -> None:
    """Raise ValueError unless every file the manifest lists is present and intact."""
    mf = ckpt / "manifest.json"
    if not mf.is_file():
        raise ValueError(f"{ckpt}: no manifest.json (incomplete checkpoint)")
    for rel, info in json.loads(mf.read_text())["files"].items():
        p = ckpt / rel
        if not p.is_file() or p.stat().st_size != info["bytes"]:
            raise ValueError(f"{ckpt}: {rel} is missing or has the wrong size")
        if hashes and _sha256(p) != info["sha256"]:
            raise ValueError(f"{ckpt}: {rel} does not match its sha256")


def checkpoints(root: Path) -> list[Path]:
    found = [p for p in root.glob(f"{CKPT_PREFIX}*") if p.is_dir()
             and p.name[len(CKPT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def latest_checkpoint(root: Path) -> Path | None:
    for ckpt in reversed(checkpoints(root)):
        try:
            verify_checkpoint(ckpt, hashes=False)
            return ckpt
        except ValueError:
            continue
    return None


def save_checkpoint(engine, cfg: TrainConfig, step: int, rank: int, world: int,
                    root: Path) -> Path:
    """Every rank writes into a tmp dir; rank 0 adds trainer.json and the manifest, then
    renames it into place. A kill at any moment leaves earlier checkpoints untouched."""
    final = root / f"{CKPT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{CKPT_PREFIX}{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save(tmp)
    barrier()
    if rank == 0:
        meta = {"step": step, "world_size": world, "engine": cfg.engine,
                "config": C.to_dict(cfg), "time": time.time()}
        atomic_write_bytes(tmp / "trainer.json", json.dumps(meta, indent=1).encode())
        write_manifest(tmp)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in checkpoints(root)[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def resolve_resume(cfg: TrainConfig, root: Path) -> Path | None:
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(root)
    ckpt = Path(cfg.resume)
    try:
        verify_checkpoint(ckpt, hashes=False)
    except ValueError as e:
        raise ConfigError(f"resume={cfg.resume!r}: {e}") from None
    return ckpt


# -- evaluation --------------------------------------------------------------------------------
def evaluate(engine, windows: torch.Tensor, cfg: TrainConfig, rank: int, world: int,
             micro: int) -> float:
    total = torch.zeros(2, dtype=torch.float64)
    g = cfg.global_batch
    for b in range(len(windows) // g):
        for a in range(cfg.grad_accum):
            lo = b * g + (a * world + rank) * micro
            chunk = windows[lo:lo + micro].to(engine.device)
            loss = engine.eval_loss(chunk[:, :-1], chunk[:, 1:])
            total += torch.tensor([loss.item() * len(chunk), len(chunk)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def _mean_across_ranks(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


# -- the run -----------------------------------------------------------------------------------
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
        from .engines import deepspeed_json
        ds_cfg = deepspeed_json(cfg, world)
    return cfg, mc, ds_cfg


def run(argv: list[str]) -> dict:
    start = time.perf_counter()
    cfg, mc, ds_cfg = prepare_checks(argv)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg)
    rank, world = init_distributed(cfg, device)
    is0 = rank == 0

    def log(msg: str) -> None:
        if is0:
            from tqdm import tqdm
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    from . import data as D
    from .engines import all_gather_objects, build_engine

    manifest = on_rank0_then_all(lambda: D.prepare(cfg, mc.vocab_size), rank)
    tokens = D.open_tokens(cfg, manifest)
    if manifest["vocab_size"] > mc.vocab_size:
        raise ConfigError(f"the tokenizer's vocabulary ({manifest['vocab_size']}) is larger "
                          f"than the model's vocab_size {mc.vocab_size}")
    sampler = D.Sampler(tokens["train"], cfg.seq_len, cfg.global_batch, cfg.seed)
    micro = cfg.micro_batch(world)
    val = D.eval_windows(tokens["validation"], cfg.eval_batches * cfg.global_batch, cfg.seq_len)

    engine = build_engine(cfg, mc, device, rank, world, ds_cfg)
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    if is0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob(f".tmp-{CKPT_PREFIX}*"):  # from a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    start_step = 0
    ckpt = resolve_resume(cfg, ckpt_root)
    if ckpt is not None:
        engine.load(ckpt)
        start_step = json.loads((ckpt / "trainer.json").read_text())["step"]
        log(f"resumed from {ckpt} at step {start_step}")
    metrics = MetricsLog(out / "metrics.jsonl", is0, resume_step=start_step)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module().parameters())
    log(f"model: {n_params / 1e6:.2f}M params, {mc.num_hidden_layers} layers, hidden "
        f"{mc.hidden_size}, vocab {mc.vocab_size} ({cfg.model})")
    log(f"{engine.describe()}; world size {world}, device {device.type}, "
        f"{'bf16 mixed' if cfg.bf16 else 'fp32'}")
    log(f"data: {cfg.data}, tokenizer vocab {manifest['vocab_size']}, train "
        f"{manifest['splits']['train']['tokens']:,} tokens ({sampler.steps_per_epoch} steps per "
        f"epoch), validation {manifest['splits']['validation']['tokens']:,} tokens; global batch "
        f"{cfg.global_batch} = {world} ranks x {micro} x {cfg.grad_accum} accumulation, "
        f"seq {cfg.seq_len}")
    if is0:
        (out / "config.json").write_text(json.dumps(C.to_dict(cfg), indent=1))

    mem = all_gather_objects(engine.memory(), world)   # at start: model and state, no grads
    metrics.write({"kind": "memory", "step": start_step, "memory": mem})
    if is0:
        from sage_dist.memory import format_table
        log(format_table([m["breakdown"] for m in mem],
                         title=f"sage_dist.memory breakdown at step {start_step}"))
    first_val = None
    if start_step == 0:
        first_val = evaluate(engine, val, cfg, rank, world, micro)
        metrics.write({"kind": "eval", "step": 0, "val_loss": first_val, "val_ppl": ppl(first_val)})
        log(f"step {0:5d} | val_loss {first_val:.4f} | val_ppl {ppl(first_val):.2f}")
    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (is0 and cfg.progress),
               dynamic_ncols=True, file=sys.stderr, desc="train",
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    tokens_per_step = cfg.global_batch * cfg.seq_len
    last_val, train_time, window = first_val, 0.0, []
    for step in range(start_step + 1, cfg.steps + 1):
        if cfg.kill_at_step == step and rank == cfg.kill_rank:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.perf_counter()
        lr = engine.set_lr(lr_factor(cfg, step - 1))
        loss_sum = 0.0
        for a in range(cfg.grad_accum):
            x, y = sampler.micro_batch(step - 1, a, rank, world, micro)
            loss = engine.micro_step(x.to(device), y.to(device), last=a == cfg.grad_accum - 1)
            loss_sum += loss.item()
        grad_norm = engine.step()
        loss = _mean_across_ranks(loss_sum / cfg.grad_accum)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training diverged: loss {loss} at step {step}")
        dt = time.perf_counter() - t0
        train_time += dt
        window.append(loss)
        rec = {"kind": "train", "step": step, "loss": loss, "ppl": ppl(loss), "lr": lr,
               "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / dt}
        if step % cfg.log_every == 0 or step == cfg.steps:
            mem = all_gather_objects(engine.memory(), world)
            rec["memory"] = mem
            log(f"step {step:5d} | train_loss {sum(window) / len(window):.4f} | lr {lr:.3e} | "
                f"grad_norm {grad_norm:.3f} | {tokens_per_step / dt:,.0f} tok/s | peak RSS "
                f"{', '.join(format(m['peak_rss'] / 2 ** 20, '.0f') for m in mem)} MiB")
            window = []
        metrics.write(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", refresh=False)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            last_val = evaluate(engine, val, cfg, rank, world, micro)
            metrics.write({"kind": "eval", "step": step, "val_loss": last_val,
                           "val_ppl": ppl(last_val)})
            log(f"step {step:5d} | val_loss {last_val:.4f} | val_ppl {ppl(last_val):.2f}")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            path = save_checkpoint(engine, cfg, step, rank, world, ckpt_root)
            log(f"checkpoint: {path}")
    bar.close()
    if last_val is None:  # resumed from the last step's checkpoint: nothing left to train
        last_val = evaluate(engine, val, cfg, rank, world, micro)

    mem = all_gather_objects(engine.memory(), world)
    digest = engine.param_digest() if n_params <= DIGEST_MAX_PARAMS else None
    final = {"rank": rank, "world_size": world, "engine": engine.name, "steps": cfg.steps,
             "param_sha256": digest, "final_val_loss": last_val,
             "final_val_ppl": ppl(last_val) if last_val is not None else None}
    (out / f"final_rank{rank}.json").write_text(json.dumps(final, indent=1))
    result = dict(final, seconds=time.perf_counter() - start, memory=mem,
                  step0_val_loss=first_val, train_seconds=train_time)
    if is0:
        metrics.write({"kind": "final", "step": cfg.steps, "val_loss": last_val,
                       "val_ppl": final["final_val_ppl"], "memory": mem, "world_size": world,
                       "seconds": result["seconds"]})
        log("per-rank memory (bytes held by this rank; optimizer state from "
            "optimizer.state_bytes(), peak RSS from getrusage):")
        log(memory_table(mem))
        from sage_dist.memory import format_table
        log(format_table([m["breakdown"] for m in mem],
                         title="sage_dist.memory breakdown (after the last step)"))
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
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - teardown of a failed group
                pass
    return 0
