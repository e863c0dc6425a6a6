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
# The process-group timeout when dist_timeout_s is none: a CPU (gloo) run whose peer died or
# hangs inside a collective fails after this long instead of torch's 30 minutes.
DEFAULT_GLOO_TIMEOUT_S = 300.0
TIMEOUT_S: float | None = None  # the timeout the group was created with


# Where the loop is (step, what it is doing), for the message of a failed collective.
PHASE = {"step": 0, "what": "setup", "rank": 0}


def set_phase(step: int, what: str, rank: int | None = None) -> None:
    PHASE["step"], PHASE["what"] = step, what
    if rank is not None:
        PHASE["rank"] = rank


class CollectiveError(RuntimeError):
    """A collective failed or timed out (a peer died or hangs); names the step and the phase."""


def timeout_s(cfg: TrainConfig, device: torch.device) -> float | None:
    """The process-group timeout: dist_timeout_s, else 300 s on CPU, else torch's default."""
    if cfg.dist_timeout_s is not None:
        return float(cfg.dist_timeout_s)
    return DEFAULT_GLOO_TIMEOUT_S if device.type != "cuda" else None


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
    global TIMEOUT_S
    if not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        TIMEOUT_S = timeout_s(cfg, device)
        kw = {} if TIMEOUT_S is None else {"timeout": datetime.timedelta(seconds=TIMEOUT_S)}
        if kw and backend == "gloo":
            # Groups created later without a timeout (DeepSpeed's data-parallel group, device
            # meshes) take torch's module default (30 min for gloo): give them ours too.
            import torch.distributed.distributed_c10d as c10d
            if isinstance(getattr(c10d, "default_pg_timeout", None), datetime.timedelta):
                c10d.default_pg_timeout = kw["timeout"]
        store = elastic_store(kw.get("timeout", datetime.timedelta(minutes=30)))
        if store is not None:
            kw.update(store=store, rank=int(os.environ["RANK"]),
                      world_size=int(os.environ["WORLD_SIZE"]))
        tdist.init_process_group(backend, **kw)
    global GLOO_USED
    GLOO_USED = GLOO_USED or "gloo" in str(tdist.get_backend())  # also "cpu:gloo,cuda:nccl"
    return tdist.get_rank(), tdist.get_world_size()


def elastic_store(timeout: datetime.timedelta):
    """Under torchrun, the agent's store with a prefix per restart of the group; None otherwise.

    The workers of every attempt share the agent's TCPStore, and gloo's connectFullMesh of a
    restarted group read the dead attempt's addresses from it ("Gloo connectFullMesh failed
    ... Connection refused") and the group never formed. A key prefix per attempt
    (TORCHELASTIC_RESTART_COUNT) keeps each attempt's rendezvous apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                           int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return tdist.PrefixStore(f"sage_dist/attempt_{attempt}/", store)


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


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (itself without a process group)."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


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
