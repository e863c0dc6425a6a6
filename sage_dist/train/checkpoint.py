"""Atomic, verifiable checkpoints: `<out_dir>/checkpoints/step_<N>/`.

Every rank writes its engine's payload into `.tmp-step_<N>/`; rank 0 adds `trainer.json` (the
step, world size, engine and config) and `manifest.json` (size and sha256 of every file), then
renames the directory into place and prunes to `keep_checkpoints`. A process killed at any
moment leaves the earlier checkpoints untouched; a directory without a complete manifest is
never resumed from.

Integrity: before a checkpoint is loaded every file its manifest lists is checked for presence,
size and sha256 (on rank 0, which tells the others). `resume: auto` skips a damaged checkpoint
with a warning naming the file and takes the previous one; when none verifies it fails
(ConfigError, exit 2) naming every checkpoint it found and why each was refused. An I/O error
while saving (disk full, permission) on any rank stops every rank with CheckpointWriteError,
naming the step, the rank and the error; the tmp directory is removed and the earlier
checkpoints stay as they were.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from . import config as C
from .config import ConfigError, TrainConfig
from .corpus import atomic_write_bytes
from .dist import all_gather_objects, barrier, broadcast_object

CKPT_PREFIX = "step_"


class CheckpointWriteError(RuntimeError):
    """Saving a checkpoint failed on some rank (disk full, permission); raised on every rank."""


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
    try:
        files = json.loads(mf.read_text())["files"]
        items = list(files.items())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{ckpt}: manifest.json is damaged ({type(e).__name__}: {e})") from None
    for rel, info in items:
        p = ckpt / rel
        if not p.is_file():
            raise ValueError(f"{ckpt}: {rel} is missing")
        if p.stat().st_size != info["bytes"]:
            raise ValueError(f"{ckpt}: {rel} has {p.stat().st_size} bytes, the manifest "
                             f"says {info['bytes']} (truncated or overwritten)")
        if hashes and _sha256(p) != info["sha256"]:
            raise ValueError(f"{ckpt}: {rel} does not match its sha256")


def checkpoints(root: Path) -> list[Path]:
    found = [p for p in root.glob(f"{CKPT_PREFIX}*") if p.is_dir()
             and p.name[len(CKPT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def _warn(msg: str) -> None:
    import sys
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def latest_checkpoint(root: Path, hashes: bool = True, warn=_warn,
                      refused: list | None = None) -> Path | None:
    """The newest checkpoint under `root` that verifies (sizes and, with `hashes`, sha256);
    each newer one that does not is reported through `warn` and appended to `refused`."""
    for ckpt in reversed(checkpoints(root)):
        try:
            verify_checkpoint(ckpt, hashes=hashes)
            return ckpt
        except (ValueError, OSError) as e:  # OSError: an unreadable file or manifest
            if refused is not None:
                refused.append(str(e))
            if warn is not None:
                warn(f"skipping checkpoint {ckpt.name}: {e}")
    return None


def remove_stale(root: Path) -> None:
    """Drop the tmp directories of a run killed mid-save (call on rank 0, before any save)."""
    for stale in root.glob(f".tmp-{CKPT_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _errors(err: str | None, world: int) -> list[str]:
    """Every rank's error message (None: fine), on every rank (a collective)."""
    return [e for e in all_gather_objects(err, world) if e is not None]


def _describe_os_error(e: BaseException) -> str:
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {first[:300]}"


def save_checkpoint(engine, cfg: TrainConfig, step: int, rank: int, world: int,
                    root: Path) -> Path:
    """Every rank writes into a tmp dir; rank 0 adds trainer.json and the manifest, then
    renames it into place. A kill at any moment leaves earlier checkpoints untouched; an I/O
    error on any rank raises CheckpointWriteError on every rank (no rank left waiting)."""
    final = root / f"{CKPT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{CKPT_PREFIX}{step:08d}"
    err = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            err = f"rank 0: {_describe_os_error(e)}"
    errors = _errors(err, world)
    if not errors:
        try:
            engine.save(tmp)
            fault_save_hook(step, rank)  # (after the engine's own collectives, as a late error)
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, or the others wait
            # torch.save reports a full disk as "RuntimeError: [enforce fail at
            # inline_container.cc] unexpected pos ...": say what the filesystem holds too.
            err = f"rank {rank}: {_describe_os_error(e)} ({_disk_note(root)})"
        errors = _errors(err, world)
    if not errors and rank == 0:
        try:
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
        except OSError as e:
            err = f"rank 0: {_describe_os_error(e)} ({_disk_note(root)})"
    if not errors:
        err = broadcast_object(err)  # rank 0's error, if any, on every rank
        errors = [] if err is None else [err]
    if errors:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back
        barrier()
        kept = [p.name for p in checkpoints(root)] if rank == 0 else []
        raise CheckpointWriteError(
            f"saving the checkpoint of step {step} into {tmp} failed: {'; '.join(errors)}. "
            f"The run stopped; the earlier checkpoints are untouched"
            f"{' (' + ', '.join(kept) + ')' if kept else ''}: free space or fix permissions "
            f"under {root}, then rerun with --resume auto")
    barrier()
    return final


def _disk_note(root: Path) -> str:
    """The free space of root's filesystem, in words ("full" below 1 MiB)."""
    try:
        u = shutil.disk_usage(root)
    except OSError as e:
        return f"free space of {root} unknown: {e}"
    full = "the filesystem is full: " if u.free < 2 ** 20 else ""
    return f"{full}{u.free / 2 ** 20:.1f} MiB free of {u.total / 2 ** 20:.0f} MiB under {root}"


FAULT_SAVE_ENV = "SAGE_DIST_FAULT_SAVE_ERROR"


def fault_save_hook(step: int, rank: int) -> None:
    """Test hook (not a config key): SAGE_DIST_FAULT_SAVE_ERROR="STEP:RANK" makes rank RANK
    raise OSError(ENOSPC) when it writes the checkpoint of step STEP, as a full disk would
    (for machines where a size-limited filesystem cannot be mounted)."""
    spec = os.environ.get(FAULT_SAVE_ENV, "").strip()
    if not spec:
        return
    s, _, r = spec.partition(":")
    if int(s) == step and int(r or 0) == rank:
        import errno
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"(injected by {FAULT_SAVE_ENV})")


def resolve_resume(cfg: TrainConfig, root: Path, warn=_warn) -> Path | None:
    """The checkpoint `resume` names: none, the newest one that verifies (auto), or a
    directory (which must verify). Hashes every file it accepts: call on one rank."""
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        refused: list[str] = []
        ckpt = latest_checkpoint(root, hashes=True, warn=warn, refused=refused)
        if ckpt is None and refused:
            raise ConfigError(f"resume='auto': none of the {len(refused)} checkpoint(s) under "
                              f"{root} verifies against its manifest: {'; '.join(refused)}")
        return ckpt
    ckpt = Path(cfg.resume)
    try:
        verify_checkpoint(ckpt, hashes=True)
    except (ValueError, OSError) as e:
        raise ConfigError(f"resume={cfg.resume!r}: {e}") from None
    return ckpt


def resume(engine, cfg: TrainConfig, root: Path, rank: int = 0) -> tuple[int, Path | None]:
    """Load the checkpoint `resume` names into the engine: (its step, its path), else (0, None).
    Rank 0 picks and verifies it, then tells the others (an error is raised on every rank)."""
    choice: tuple[str | None, str | None] = (None, None)
    if rank == 0:
        try:
            ckpt = resolve_resume(cfg, root)
            choice = (None if ckpt is None else str(ckpt), None)
        except ConfigError as e:
            choice = (None, str(e))
    path, err = broadcast_object(choice)
    if err is not None:
        raise ConfigError(err)
    if path is None:
        return 0, None
    ckpt = Path(path)
    engine.load(ckpt)
    return json.loads((ckpt / "trainer.json").read_text())["step"], ckpt
