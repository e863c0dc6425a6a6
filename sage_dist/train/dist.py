"""Process-group helpers of the trainer: join the group (or run as a world of one), pick the
device, and the few collectives the loop needs (barrier, rank-0-first, gather, mean)."""
from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as tdist

from .config import ConfigError, TrainConfig

# Set once this process has run a gloo process group; the command-line entry then ends the
# process without interpreter finalisation (see sage_dist.train.cli.end_process).
GLOO_USED = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: TrainConfig, device: torch.device) -> tuple[int, int]:
    """(rank, world size); engine=single never creates a process group."""
    if cfg.engine == "single":
        return 0, 1
    if "RANK" not in os.environ:  # one process without a launcher: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    global GLOO_USED
    GLOO_USED = GLOO_USED or "gloo" in str(tdist.get_backend())  # also "cpu:gloo,cuda:nccl"
    return tdist.get_rank(), tdist.get_world_size()


def destroy() -> None:
    if tdist.is_initialized():
        try:
            tdist.destroy_process_group()
        except Exception:  # noqa: BLE001 - teardown of a failed group
            pass


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


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
    if tdist.is_initialized():
        box = [err]
        tdist.broadcast_object_list(box, src=0)
        err = box[0]
    if err is not None:
        raise ConfigError(err)
    return result if rank == 0 else fn()


def all_gather_objects(obj, world: int) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if world == 1 or not tdist.is_initialized():
        return [obj]
    out = [None] * world
    tdist.all_gather_object(out, obj)
    return out


def mean_across_ranks(value: float) -> float:
    if not tdist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    tdist.all_reduce(t)
    return t.item() / tdist.get_world_size()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if tdist.is_initialized():
        tdist.all_reduce(t)
    return t
