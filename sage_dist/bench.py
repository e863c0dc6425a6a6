"""Optimizer-step benchmark against the machine's measured memory bandwidth.

    python -m sage_dist.bench step --model configs/models/llama_60m.json [--steps 10] [--json out.json]

One process, the real parameters of a Llama config (fp32, random gradients). For each recipe
it times optimizer.step() and prints: the bytes the step must move according to its algorithm
(see `rule_bytes`), the achieved GB/s (those bytes / step time), the fraction of the
bandwidth measured in the same run by a STREAM-style triad with the same threads (the better
of a measurement before and one after the steps), and the
step time relative to torch's AdamW (foreach). Every figure comes from this one run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from . import build_optimizer, ops

F32 = 4  # bytes per fp32 element

# Bytes per parameter element that each rule must move in one step (fp32 parameter, gradient
# and state), given the phases its math needs: a statistic is one read of what it sums, and
# the update reads what it needs and writes what it changes, once each. The engine's own
# per-parameter finiteness check (one more read of g) is not counted here.
#   SAGE: |g| column sums (g) + update (p, m, g in; p, m out)                 = 6 reads/writes
#   Sinkhorn/SinkGD, L iterations: 2L statistics passes over g + (p, g in; p out) = 2L + 3
#   SCALE dense / embedding: one statistics pass + (p, g in; p out)           = 4
#   SCALE head: momentum (m, g in; m out) + statistics (m) + (p, m in; p out)  = 7
#   Lion: p, m, g in; p, m out = 5.  AdamW: p, m1, m2, g in; p, m1, m2 out = 7.
#
# `once=True` counts instead each tensor the step touches once (read once, written once if
# it changes): the least DRAM traffic any implementation needs. Statistics passes that find
# g still in cache (a whole-matrix Sinkhorn runs its 2L passes back to back) move less than
# the algorithmic count, so the "of bw" figure on that count can exceed what DRAM delivered;
# the "once" figure can only by the triad's own shortfall.
#   SAGE: p, m, g in; p, m out = 5.  Sinkhorn, SinkGD, SCALE dense/embedding: p, g in; p out
#   = 3.  SCALE head: p, m, g in; p, m out = 5.  Lion 5.  AdamW 7.
ALGORITHM_WORDS = {"sage": 6, "scale_dense": 4, "scale_embedding": 4, "scale_head": 7,
                   "lion": 5, "adamw": 7, "scale_adamw": 7}
ONCE_WORDS = {"sage": 5, "sinkhorn": 3, "sinkgd": 3, "scale_dense": 3, "scale_embedding": 3,
              "scale_head": 5, "lion": 5, "adamw": 7, "scale_adamw": 7}


def rule_bytes(rule: str, group: dict, numel: int, once: bool = False) -> int:
    if once:
        words = ONCE_WORDS[rule]
    elif rule in ("sinkhorn", "sinkgd"):
        words = 2 * group["sinkhorn_iters"] + 3
    else:
        words = ALGORITHM_WORDS[rule]
    return words * F32 * numel


def step_bytes(opt, once: bool = False) -> int:
    if not isinstance(opt, torch.optim.Optimizer) or "rule" not in opt.param_groups[0]:
        return sum(7 * F32 * p.numel() for g in opt.param_groups for p in g["params"])
    return sum(rule_bytes(g["rule"], g, p.numel(), once)
               for g in opt.param_groups for p in g["params"])


def measure_bandwidth(n: int = 1 << 25, repeats: int = 10) -> float:
    """STREAM triad a = b + s*c in fp32 with torch's threads; 12 bytes per element (no
    write-allocate counted, as STREAM). Best of `repeats`, in bytes per second."""
    a, b, c = (torch.empty(n) for _ in range(3))
    b.uniform_()
    c.uniform_()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        best = min(best, time.perf_counter() - t0)
    return 12 * n / best


def build_model(config_path: str):
    from .models import build_model as build

    model = build(config_path, seed=0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def time_steps(opt, warmup: int, steps: int) -> float:
    """Median seconds of opt.step() (gradients stay in place between steps)."""
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def engine_check_seconds(model, repeats: int = 3) -> float:
    """Seconds of the engine's per-parameter finiteness check over all gradients (one
    torch.aminmax pass per gradient, as optimizer.py runs it before the first phase)."""
    from .optim.optimizer import _nonfinite_flag

    grads = [p.grad for p in model.parameters()]
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for g in grads:
            _nonfinite_flag(g)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def cases(model):
    params = [p for p in model.parameters() if p.requires_grad]
    yield "sage-hybrid fused", lambda: build_optimizer(model, "sage-hybrid"), True
    yield "sage-hybrid reference", lambda: build_optimizer(model, "sage-hybrid"), False
    yield "scale fused", lambda: build_optimizer(model, "scale"), True
    yield "lion fused", lambda: build_optimizer(model, "lion"), True
    yield "torch AdamW foreach", lambda: torch.optim.AdamW(params, lr=1e-3, foreach=True), True
    yield "torch AdamW fused", lambda: torch.optim.AdamW(params, lr=1e-3, fused=True), True


def run_step(args) -> dict:
    model = build_model(args.model)
    n_params = sum(p.numel() for p in model.parameters())
    threads = torch.get_num_threads()
    bw = measure_bandwidth()
    results = {}
    for name, make, fused in cases(model):
        with ops.force_reference(not fused):
            opt = make()
            ours = not name.startswith("torch")
            seconds = time_steps(opt, args.warmup, args.steps)
            nbytes, once = step_bytes(opt), step_bytes(opt, once=True)
        del opt
        results[name] = dict(seconds=seconds, bytes=nbytes, gbps=nbytes / seconds / 1e9,
                             bytes_once=once)
    check = engine_check_seconds(model)
    bw_after = measure_bandwidth()  # the machine is shared: bracket the run
    # The fractions use the better of the two triads: what the machine showed it can stream
    # in this run (the conservative choice when the two differ).
    bw_ref = max(bw, bw_after)
    base = results["torch AdamW foreach"]["seconds"]
    for name, r in results.items():
        r["time_vs_adamw_foreach"] = r["seconds"] / base
        r["bandwidth_fraction"] = r["bytes"] / r["seconds"] / bw_ref
        r["bandwidth_fraction_once"] = r["bytes_once"] / r["seconds"] / bw_ref
    fused_vs_ref = (results["sage-hybrid reference"]["seconds"]
                    / results["sage-hybrid fused"]["seconds"])
    out = dict(model=args.model, parameters=n_params, threads=threads,
               extension=ops.HAS_EXTENSION, bandwidth_gbps=bw / 1e9,
               bandwidth_after_gbps=bw_after / 1e9, bandwidth_reference_gbps=bw_ref / 1e9,
               steps=args.steps, warmup=args.warmup,
               engine_check_seconds=check, recipes=results,
               sage_hybrid_fused_speedup_vs_reference=fused_vs_ref)
    print(f"model {args.model}: {n_params / 1e6:.1f}M fp32 parameters, {threads} threads, "
          f"extension {'built' if ops.HAS_EXTENSION else 'NOT built'}")
    print(f"measured bandwidth (triad): {bw / 1e9:.2f} GB/s before, {bw_after / 1e9:.2f} GB/s "
          f"after the steps; 'of bw' is against the higher, {bw_ref / 1e9:.2f} GB/s")
    print("MB moved: what the algorithm reads and writes (every statistics pass counted); "
          "MB once: each tensor read once and written once if changed (the least DRAM traffic)")
    print(f"{'recipe':<24}{'step ms':>9}{'MB moved':>10}{'GB/s':>8}{'of bw':>8}"
          f"{'MB once':>9}{'of bw':>7}{'vs AdamW foreach':>18}")
    for name, r in results.items():
        line = (f"{name:<24}{r['seconds'] * 1e3:>9.1f}{r['bytes'] / 1e6:>10.0f}"
                f"{r['gbps']:>8.2f}{r['bandwidth_fraction']:>8.0%}"
                f"{r['bytes_once'] / 1e6:>9.0f}{r['bandwidth_fraction_once']:>7.0%}"
                f"{r['time_vs_adamw_foreach']:>17.2f}x")
        print(line)
    print(f"the engine's finiteness check (one torch.aminmax pass per gradient) takes "
          f"{check * 1e3:.1f} ms of every step of our recipes")
    print(f"sage-hybrid fused is {fused_vs_ref:.2f}x faster than its pure-PyTorch reference")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
        print(f"wrote {args.json}")
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m sage_dist.bench")
    sub = parser.add_subparsers(dest="cmd", required=True)
    step = sub.add_parser("step", help="time one optimizer step of each recipe")
    step.add_argument("--model", required=True, help="a Hugging Face LlamaConfig JSON")
    step.add_argument("--steps", type=int, default=10)
    step.add_argument("--warmup", type=int, default=2)
    step.add_argument("--json", default="bench_step.json", help="where to write the results")
    args = parser.parse_args(argv)
    if args.cmd == "step":
        return run_step(args)


if __name__ == "__main__":
    main()
