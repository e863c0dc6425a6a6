"""Atomic, verifiable checkpoints: `<out_dir>/checkpoints/step_<N>/`.

Every rank writes its engine's payload into `.tmp-step_<N>/`; rank 0 adds `trainer.json` (the
step, world size, engine and config) and `manifest.json` (size and sha256 of every file), then
renames the directory into place and prunes to `keep_checkpoints`. A process killed at any
moment leaves the earlier checkpoints untouched; a directory without a complete manifest is
never resumed from.
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
from .dist import barrier

CKPT_PREFIX = "step_"


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


def remove_stale(root: Path) -> None:
    """Drop the tmp directories of a run killed mid-save (call on rank 0, before any save)."""
    for stale in root.glob(f".tmp-{CKPT_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


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
    """The checkpoint `resume` names: none, the newest complete one (auto), or a directory."""
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


def resume(engine, cfg: TrainConfig, root: Path) -> tuple[int, Path | None]:
    """Load the checkpoint `resume` names into the engine: (its step, its path), else (0, None)."""
    ckpt = resolve_resume(cfg, root)
    if ckpt is None:
        return 0, None
    engine.load(ckpt)
    return json.loads((ckpt / "trainer.json").read_text())["step"], ckpt
