"""Run a function on N real processes over gloo (CPU) and collect what each rank returns.

One spawn per configuration; the worker runs many cases inside it, so the suite stays fast.
"""
from __future__ import annotations

import datetime
import os
import pickle
import socket
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        result = {"ok": fn(rank, world, *args)}
    except BaseException as e:  # report, do not hang the others: abort the group
        result = {"error": f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}",
                  "type": type(e).__name__, "message": str(e)}
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    try:
        if "error" not in result:
            dist.barrier()
    finally:
        dist.destroy_process_group()
    # Skip interpreter finalisation: gloo's worker threads may still be releasing the last
    # work objects, and a thread that needs the GIL then aborts the process (the reason is
    # written out at sage_dist.train.cli.end_process). The result file is closed above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(fn, world: int, *args, expect_error: bool = False, timeout: float = 900):
    """fn(rank, world, *args) on `world` processes; returns the list of per-rank results.

    Every rank writes its result before process-group teardown and must then exit with code 0;
    a rank that never reported, or died in teardown, fails the run with its exit code. With
    expect_error=True, returns the per-rank results (error dicts) instead of raising.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_entry, args=(world, free_port(), out_dir, fn, args),
                                 nprocs=world, join=False, start_method="spawn")
        for proc in ctx.processes:
            proc.join(timeout)
        codes = []
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
                proc.join()
            codes.append(proc.exitcode)
        results = []
        for r in range(world):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                raise AssertionError(f"rank {r} reported nothing (exit code {codes[r]}; "
                                     f"all exit codes {codes})")
            with open(path, "rb") as f:
                results.append(pickle.load(f))
    errors = [r for r in results if "error" in r]
    if not errors and any(c != 0 for c in codes):
        raise AssertionError(f"every rank reported, but the exit codes are {codes}")
    if expect_error:
        return results
    if errors:
        raise AssertionError("\n".join(e["error"] for e in errors))
    return [r["ok"] for r in results]
