"""Sharded optimizer-step benchmark: `python -m sage_dist.bench sharded`.

    python -m sage_dist.bench sharded --model llama_60m --world 2 --engine fsdp2 zero1 zero2 zero3

For each engine, `world` gloo processes on this machine (one thread each) train a Llama config
on random tokens with sage-hybrid and with AdamW on the same engine, taking turns step by
step: torch's AdamW (foreach and fused) on FSDP2's DTensors; DeepSpeed's own AdamW under ZeRO
(its FusedAdam, or with `--ds-adam torch` DeepSpeed's `torch_adam` choice, torch.optim.AdamW).
Per training step it times the optimizer step as the engine runs it (FSDP2: `opt.step()`;
ZeRO: `engine.step()`, which also reduces, clips and re-gathers) and the whole step (forward,
backward, step), the slowest rank's time counting. The step's clock starts at a barrier after the backward:
otherwise a step whose first collective waits for a rank still in its backward (ours
all-reduces statistics; AdamW's step has no collective) would be charged that rank's lag,
which with AdamW lands in the next forward instead. It prints the medians, the ratios to
AdamW, and the training tokens/s of each; `--json` writes them. Every figure comes from one
run.

It also measures (sage_dist.memory.measure) each rank's gradient bytes between the first
backward and the first step, beside an even split of all gradients over the ranks. Under
ZeRO, `--per-category` adds sage-hybrid built with one param group per category
(`merge: false`), as it was before sage_dist.deepspeed merged the groups: DeepSpeed ZeRO-1/2
then keeps the embedding's and the head's whole gradients on every rank.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

ENGINES = ("fsdp2", "zero1", "zero2", "zero3")


PER_CATEGORY = "sage-hybrid per-category groups"


def _cases(engine: str, ds_adam: str, per_category: bool = False) -> list[tuple[str, dict]]:
    if engine == "fsdp2":
        return [("sage-hybrid", {}), ("torch AdamW foreach", {"foreach": True}),
                ("torch AdamW fused", {"fused": True})]
    adam = {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}
    if ds_adam == "torch":
        adam["params"]["torch_adam"] = True
    name = "DeepSpeed AdamW" + (" (torch_adam)" if ds_adam == "torch" else " (FusedAdam)")
    extra = [(PER_CATEGORY, {"type": "sage-hybrid", "params": {"merge": False}})] \
        if per_category else []
    return [("sage-hybrid", {"type": "sage-hybrid", "params": {}}), *extra, (name, adam)]


def _gradient_bytes(model, opt) -> list[int]:
    """Every rank's gradient bytes as sage_dist.memory measures them (no collective there)."""
    import torch
    import torch.distributed as dist

    from .memory import measure
    mine = torch.tensor([measure(model, opt)["gradients"]], dtype=torch.int64)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [int(t.item()) for t in every]


def _tokens(step: int, rank: int, batch: int, seq: int, vocab: int):
    import torch
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def _slowest(seconds: float) -> float:
    import torch
    import torch.distributed as dist
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _fsdp2(model_name, spec, world):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from .fsdp import shard_llama
    from .models import build_model
    from .optim.recipes import build_optimizer

    model = shard_llama(build_model(model_name, seed=0), init_device_mesh("cpu", (world,)))
    if spec:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, **spec)
    else:
        opt = build_optimizer(model, "sage-hybrid")

    grads = []

    def train_step(x):
        model(input_ids=x, labels=x).loss.backward()
        if not grads:
            grads.extend(_gradient_bytes(model, opt))
        dist.barrier()   # the step's clock starts when every rank has its gradients (below)
        t0 = time.perf_counter()
        opt.step()
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        return t1 - t0
    return model, train_step, grads


def _zero(model_name, spec, stage, batch):
    import torch.distributed as dist

    from . import deepspeed as sdds
    from .models import build_model

    cfg = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
           "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
           "optimizer": spec, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    engine, opt, *_ = sdds.initialize(model=build_model(model_name, seed=0), config=cfg)
    grads = []

    def train_step(x):
        engine.backward(engine(input_ids=x, labels=x).loss)
        if not grads:
            grads.extend(_gradient_bytes(engine, opt))
        dist.barrier()
        t0 = time.perf_counter()
        engine.step()
        return time.perf_counter() - t0
    return engine.module, train_step, grads


def _worker(rank, world, port, out_dir, args):
    import warnings

    import torch
    import torch.distributed as dist

    # torch's notes on DeepSpeed's deprecated collective names, once per call: noise here
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cases = []
    for name, spec in _cases(args["engine"], args["ds_adam"], args.get("per_category", False)):
        if args["engine"] == "fsdp2":
            cases.append((name, *_fsdp2(args["model"], spec, world)))
        else:
            cases.append((name, *_zero(args["model"], spec, int(args["engine"][-1]),
                                       args["batch"])))
    # The optimizers take turns step by step, the first of each round rotating, so the
    # machine's drift over the run (this one is shared) falls on all of them alike.
    steps, whole = ({name: [] for name, *_ in cases} for _ in range(2))
    for i in range(args["warmup"] + args["steps"]):
        for name, model, train_step, _ in cases[i % len(cases):] + cases[:i % len(cases)]:
            x = _tokens(i, rank, args["batch"], args["seq"], model.config.vocab_size)
            dist.barrier()
            t0 = time.perf_counter()
            step_s = train_step(x)
            total_s = time.perf_counter() - t0
            step_s, total_s = _slowest(step_s), _slowest(total_s)
            if i >= args["warmup"]:
                steps[name].append(step_s)
                whole[name].append(total_s)
    tokens = world * args["batch"] * args["seq"]
    results = {name: dict(step_seconds=statistics.median(steps[name]),
                          train_step_seconds=statistics.median(whole[name]),
                          tokens_per_second=tokens / statistics.median(whole[name]),
                          gradient_bytes_per_rank=list(grads))
               for name, _, _, grads in cases}
    if rank == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def run_engine(engine: str, args: dict) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(args["world"], port, out_dir, dict(args, engine=engine)),
                           nprocs=args["world"], start_method="spawn", join=True)
        with open(os.path.join(out_dir, "result.json")) as f:
            return json.load(f)


def check_args(args) -> None:
    """Refuse bad arguments before any process starts."""
    for e in args.engine:
        if e not in ENGINES:
            raise SystemExit(f"--engine {e!r} is invalid: allowed are {', '.join(ENGINES)}")
    for key in ("world", "steps", "batch", "seq"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key} {getattr(args, key)} is invalid: allowed is >= 1")
    if args.warmup < 0:
        raise SystemExit(f"--warmup {args.warmup} is invalid: allowed is >= 0")


def _total_params(model: str) -> int:
    import math

    from .models import meta_model
    return sum(math.prod(p.shape) for p in meta_model(model).parameters())


def run_sharded(args) -> dict:
    from .models import find_config

    check_args(args)
    model = str(find_config(args.model, "models"))
    common = dict(model=model, world=args.world, steps=args.steps, warmup=args.warmup,
                  batch=args.batch, seq=args.seq, ds_adam=args.ds_adam,
                  per_category=args.per_category)
    out = dict(model=args.model, world=args.world, batch_per_rank=args.batch, seq=args.seq,
               steps=args.steps, warmup=args.warmup, threads_per_rank=1, engines={})
    print(f"model {args.model}, world {args.world} (gloo, 1 thread per rank), {args.batch} x "
          f"{args.seq} tokens per rank and step; medians of {args.steps} steps, slowest rank")
    print(f"{'engine':<8}{'optimizer':<30}{'step ms':>9}{'train step ms':>15}{'tokens/s':>10}"
          f"{'step vs AdamW':>15}{'tokens/s vs AdamW':>19}")
    even = -(-_total_params(model) // args.world) * 4   # fp32 gradients, split evenly
    out["even_split_gradient_bytes"] = even
    grads = []
    for engine in args.engine:
        res = run_engine(engine, common)
        ours = res["sage-hybrid"]
        base_name = [n for n in res if n != "sage-hybrid"][-1]  # fused where there are two
        base = res[base_name]
        for name, r in res.items():
            r["step_vs_adamw"] = r["step_seconds"] / base["step_seconds"]
            r["tokens_per_second_vs_adamw"] = r["tokens_per_second"] / base["tokens_per_second"]
            print(f"{engine:<8}{name:<30}{r['step_seconds'] * 1e3:>9.1f}"
                  f"{r['train_step_seconds'] * 1e3:>15.1f}{r['tokens_per_second']:>10.0f}"
                  f"{r['step_vs_adamw']:>14.2f}x{r['tokens_per_second_vs_adamw']:>18.2f}x")
        grads += [(engine, name, r["gradient_bytes_per_rank"]) for name, r in res.items()]
        out["engines"][engine] = dict(results=res, baseline=base_name,
                                      step_ratio=ours["step_vs_adamw"],
                                      tokens_per_second_ratio=ours["tokens_per_second_vs_adamw"])
    print(f"\ngradient MiB per rank between backward and step (even split "
          f"{even / 2 ** 20:.2f} MiB)")
    for engine, name, per_rank in grads:
        print(f"{engine:<8}{name:<34}{' '.join(f'{b / 2 ** 20:8.2f}' for b in per_rank)}"
              f"   most loaded {max(per_rank) / even:.3f}x the even split")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
        print(f"wrote {args.json}")
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("sharded", help="time the optimizer step under FSDP2 and ZeRO against "
                                       "AdamW on the same engine")
    p.add_argument("--model", default="llama_60m", help="a shipped model config or a path")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--engine", nargs="+", default=list(ENGINES), help=", ".join(ENGINES))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=2, help="sequences per rank and step")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--ds-adam", choices=("fused", "torch"), default="fused",
                   help="DeepSpeed's AdamW under ZeRO: its FusedAdam, or torch_adam")
    p.add_argument("--per-category", action="store_true",
                   help="under ZeRO also sage-hybrid in one param group per category (the "
                        "groups before merging; its gradient bytes per rank)")
    p.add_argument("--json", default="bench_sharded.json", help="where to write the results")
