"""Optimizer-step benchmark against the machine's measured memory bandwidth.

    python -m sage_dist.bench step --model configs/models/llama_60m.json [--steps 10] [--json out.json]
    python -m sage_dist.bench quality --config tiny_single --recipes sage-hybrid,adamw \
        --lrs 1e-3,3e-3 [--seeds 0,1] [--steps 300]     (the sweep: sage_dist/bench_quality.py)

One process, the real parameters of a Llama config (fp32, random gradients). For each recipe
it times optimizer.step() and prints: the bytes the step must move according to its algorithm
(see `rule_bytes`), the achieved GB/s (those bytes / step time), the fraction of the
bandwidth measured in the same run by a STREAM-style triad with the same threads (the better
of a measurement before and one after the steps), and the step time relative to torch's AdamW,
both its foreach and its fused implementation. Every figure comes from this one run.
`--profile` adds where the fused sage-hybrid step spends its time (torch.profiler, per op).
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
#   Sinkhorn/SinkGD, L iterations: one sweep over g per iteration where it gives both the row
#   and the column sums (whole matrices, the CPU kernels), else 2L passes, + (p, g in; p out)
#                                                                            = L + 3 or 2L + 3
#   SCALE dense / embedding: one statistics pass + (p, g in; p out)           = 4
#   SCALE head: momentum (m, g in; m out) + statistics (m) + (p, m in; p out)  = 7
#   Lion: p, m, g in; p, m out = 5.  AdamW: p, m1, m2, g in; p, m1, m2 out = 7.
#
# `once=True` counts instead each tensor the step touches once (read once, written once if
# it changes): the least DRAM traffic any implementation needs. Statistics passes that find
# g still in cache (a whole-matrix Sinkhorn runs its L sweeps back to back) move less than
# the algorithmic count, so the "of bw" figure on that count can exceed what DRAM delivered;
# the "once" figure can only by the triad's own shortfall.
#   SAGE: p, m, g in; p, m out = 5.  Sinkhorn, SinkGD, SCALE dense/embedding: p, g in; p out
#   = 3.  SCALE head: p, m, g in; p, m out = 5.  Lion 5.  AdamW 7.
ALGORITHM_WORDS = {"sage": 6, "scale_dense": 4, "scale_embedding": 4, "scale_head": 7,
                   "lion": 5, "adamw": 7, "scale_adamw": 7}
ONCE_WORDS = {"sage": 5, "sinkhorn": 3, "sinkgd": 3, "scale_dense": 3, "scale_embedding": 3,
              "scale_head": 5, "lion": 5, "adamw": 7, "scale_adamw": 7}


def rule_bytes(rule: str, group: dict, numel: int, once: bool = False,
               one_sweep: bool = True) -> int:
    """Bytes of one step of `rule` on `numel` fp32 elements. Sinkhorn/SinkGD: `one_sweep`
    where the device runs a whole matrix's iterations as one sweep each (the CPU kernels'
    sinkhorn_*_multi_), else two statistics passes per iteration."""
    if once:
        words = ONCE_WORDS[rule]
    elif rule in ("sinkhorn", "sinkgd"):
        words = group["sinkhorn_iters"] * (1 if one_sweep else 2) + 3
    else:
        words = ALGORITHM_WORDS[rule]
    return words * F32 * numel


def step_bytes(opt, once: bool = False) -> int:
    from .shard.layout import group_rule
    if not isinstance(opt, torch.optim.Optimizer) or not all(
            "rule" in g or "rules" in g for g in opt.param_groups):
        return sum(7 * F32 * p.numel() for g in opt.param_groups for p in g["params"])
    return sum(rule_bytes(group_rule(g, i), g, p.numel(), once,
                          one_sweep=ops.has_kernel("sinkhorn_update_multi_", p.device.type))
               for g in opt.param_groups for i, p in enumerate(g["params"]))


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
    """Seconds of the engine's separate finiteness check over all gradients (one torch.aminmax
    pass per gradient, optimizer.py's _nonfinite_flag): what the step would spend on it if no
    rule checked its gradient in its own first pass."""
    return _check_seconds([p.grad for p in model.parameters()], repeats)


def _check_seconds(grads, repeats: int = 3) -> float:
    from .optim.optimizer import _nonfinite_flag

    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for g in grads:
            _nonfinite_flag(g)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def separate_check(opt) -> dict:
    """The gradients that one step of `opt` still checks with the engine's separate aminmax
    pass (those whose rule does not check them in its first pass): count, elements, seconds."""
    from .optim import optimizer as engine

    seen, real = [], engine._nonfinite_flag

    def counting(g):
        seen.append(g)
        return real(g)

    engine._nonfinite_flag = counting
    try:
        opt.step()
    finally:
        engine._nonfinite_flag = real
    return dict(tensors=len(seen), elements=sum(g.numel() for g in seen),
                seconds=_check_seconds(seen) if seen else 0.0)


def profile_step(opt, step_seconds: float, steps: int = 3, top: int = 6) -> list[dict]:
    """Where `opt.step()` spends its time: torch.profiler's self CPU time per op and step, the
    `top` largest, then the other ops together, then the rest of `step_seconds` (the step's
    median time measured without the profiler): the engine's and the rules' Python."""
    from torch.profiler import ProfilerActivity, profile

    opt.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            opt.step()
    events = [e for e in prof.key_averages() if not e.key.startswith("Optimizer.step")]
    events.sort(key=lambda e: -e.self_cpu_time_total)
    rows = [dict(op=e.key, ms=e.self_cpu_time_total / steps / 1e3, calls=e.count / steps)
            for e in events[:top]]
    rest = events[top:]
    rows.append(dict(op=f"{len(rest)} other ops", ms=sum(e.self_cpu_time_total for e in rest)
                     / steps / 1e3, calls=sum(e.count for e in rest) / steps))
    rows.append(dict(op="Python (engine, rules)",
                     ms=step_seconds * 1e3 - sum(r["ms"] for r in rows), calls=None))
    return rows


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
    results, profile, separate = {}, None, None
    for name, make, fused in cases(model):
        with ops.force_reference(not fused):
            opt = make()
            seconds = time_steps(opt, args.warmup, args.steps)
            nbytes, once = step_bytes(opt), step_bytes(opt, once=True)
            if name == "sage-hybrid fused":
                separate = separate_check(opt)
                if args.profile:
                    profile = profile_step(opt, seconds)
        del opt
        results[name] = dict(seconds=seconds, bytes=nbytes, gbps=nbytes / seconds / 1e9,
                             bytes_once=once)
    check = engine_check_seconds(model)
    bw_after = measure_bandwidth()  # the machine is shared: bracket the run
    # The fractions use the better of the two triads: what the machine showed it can stream
    # in this run (the conservative choice when the two differ).
    bw_ref = max(bw, bw_after)
    base = results["torch AdamW foreach"]["seconds"]
    base_fused = results["torch AdamW fused"]["seconds"]
    for name, r in results.items():
        r["time_vs_adamw_foreach"] = r["seconds"] / base
        r["time_vs_adamw_fused"] = r["seconds"] / base_fused
        r["bandwidth_fraction"] = r["bytes"] / r["seconds"] / bw_ref
        r["bandwidth_fraction_once"] = r["bytes_once"] / r["seconds"] / bw_ref
    fused_vs_ref = (results["sage-hybrid reference"]["seconds"]
                    / results["sage-hybrid fused"]["seconds"])
    isa = ops.cpu_isa()
    out = dict(model=args.model, parameters=n_params, threads=threads,
               extension=ops.HAS_EXTENSION, cpu_isa=isa, bandwidth_gbps=bw / 1e9,
               bandwidth_after_gbps=bw_after / 1e9, bandwidth_reference_gbps=bw_ref / 1e9,
               steps=args.steps, warmup=args.warmup,
               engine_check_seconds=check, separate_check=separate, recipes=results,
               sage_hybrid_fused_speedup_vs_reference=fused_vs_ref,
               sage_hybrid_fused_vs_adamw_fused=results["sage-hybrid fused"]["time_vs_adamw_fused"])
    if profile is not None:
        out["profile"] = profile
    print(f"model {args.model}: {n_params / 1e6:.1f}M fp32 parameters, {threads} threads, "
          f"extension {'built' if ops.HAS_EXTENSION else 'NOT built'}"
          + (f", CPU hot loops: {isa}" if isa else ""))
    print(f"measured bandwidth (triad): {bw / 1e9:.2f} GB/s before, {bw_after / 1e9:.2f} GB/s "
          f"after the steps; 'of bw' is against the higher, {bw_ref / 1e9:.2f} GB/s")
    print("MB moved: what the algorithm reads and writes (every statistics pass counted); "
          "MB once: each tensor read once and written once if changed (the least DRAM traffic)")
    print(f"{'recipe':<24}{'step ms':>9}{'MB moved':>10}{'GB/s':>8}{'of bw':>8}"
          f"{'MB once':>9}{'of bw':>7}{'vs AdamW foreach':>18}{'vs AdamW fused':>16}")
    for name, r in results.items():
        line = (f"{name:<24}{r['seconds'] * 1e3:>9.1f}{r['bytes'] / 1e6:>10.0f}"
                f"{r['gbps']:>8.2f}{r['bandwidth_fraction']:>8.0%}"
                f"{r['bytes_once'] / 1e6:>9.0f}{r['bandwidth_fraction_once']:>7.0%}"
                f"{r['time_vs_adamw_foreach']:>17.2f}x{r['time_vs_adamw_fused']:>15.2f}x")
        print(line)
    print(f"the engine's separate finiteness check (one torch.aminmax pass per gradient) would "
          f"take {check * 1e3:.1f} ms for all gradients; the fused sage-hybrid step checks "
          f"{n_params - separate['elements']} of {n_params} elements in its rules' first passes "
          f"and runs it on {separate['tensors']} tensors ({separate['elements']} elements, "
          f"{separate['seconds'] * 1e3:.2f} ms)")
    print(f"sage-hybrid fused is {fused_vs_ref:.2f}x faster than its pure-PyTorch reference and "
          f"takes {out['sage_hybrid_fused_vs_adamw_fused']:.2f}x the time of torch's fused AdamW")
    if profile is not None:
        print("fused sage-hybrid step, per op (torch.profiler, self CPU time per step; the "
              "Python row: the rest of the unprofiled step time):")
        for row in profile:
            calls = f"  ({row['calls']:.0f} calls)" if row["calls"] is not None else ""
            print(f"  {row['op']:<40}{row['ms']:>8.2f} ms{calls}")
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
    step.add_argument("--profile", action="store_true",
                      help="also profile the fused sage-hybrid step per op (torch.profiler)")
    from . import bench_quality, bench_sharded
    bench_sharded.add_parser(sub)
    bench_quality.add_parser(sub)
    args = parser.parse_args(argv)
    if args.cmd == "step":
        return run_step(args)
    if args.cmd == "quality":
        return bench_quality.run_quality(args)
    return bench_sharded.run_sharded(args)


if __name__ == "__main__":
    main()
