"""GPU optimizer-step benchmark on a Llama config's real shapes (default: the 1B Llama).

    python -m sage_dist.bench_gpu [--model llama_1b] [--steps 10] [--warmup 3]
                                  [--recipes sage-hybrid,scale,lion] [--json bench_gpu.json]

The parameters and their gradients are allocated directly on the device from the config's
shapes (fp32, random values: no forward pass, no copy of the model on the CPU). For each of
our recipes and for torch's fused AdamW it times `optimizer.step()` (the median over --steps
after --warmup, the device synchronised around each step) and relates the bytes the step
moves (`sage_dist.bench.step_bytes`: the algorithm's count, and each tensor once) to the
bandwidth of a device-to-device copy measured in the same run (best of 20, before and after
the steps; the fractions use the higher, as `sage_dist.bench` does with its triad). It also
reports the engine's finiteness check alone, each recipe's peak memory above the parameters
and gradients, and the host synchronisations one step makes (CUDA sync debug mode).

When the device's free memory cannot hold the model, its gradients and AdamW's state, the
benchmark keeps fewer decoder layers (reported as `layers`, beside `layers_in_config`).
`--device cpu` runs the same code on the CPU (the CPU tests do, with a tiny config).
tests/gpu/check.sh runs this module as its last step.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings

import torch

RECIPES = ("sage-hybrid", "scale", "lion")
ADAMW = "torch AdamW fused"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds fn() takes, the device synchronised before and after (CUDA events on a GPU)."""
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 20) -> float:
    """Bytes per second of dst.copy_(src) between two fp32 buffers of `nbytes` on the device,
    counting the read and the write (2 x nbytes per copy); best of `repeats`."""
    n = max(1, nbytes // 4)
    src = torch.empty(n, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    best = min(timed(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * 4 * n / best


def layer_numel(cfg) -> tuple[int, int]:
    """(parameters outside the decoder layers, parameters of one decoder layer) of a config."""
    from .models import meta_model

    one = cfg.__class__.from_dict(cfg.to_dict())
    one.num_hidden_layers = 1
    model = meta_model(one)
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    return total - per_layer, per_layer


def fit_layers(cfg, free_bytes: int | None, bytes_per_param: int = 16,
               reserve: int = 2 << 30) -> int:
    """The most decoder layers (at most the config's) whose parameters, gradients and AdamW
    state (`bytes_per_param`, 16 for fp32) fit in `free_bytes` less `reserve`."""
    layers = cfg.num_hidden_layers
    if free_bytes is None:
        return layers
    fixed, per_layer = layer_numel(cfg)
    room = (free_bytes - reserve) // bytes_per_param - fixed
    if room < per_layer:
        raise SystemExit(f"sage_dist.bench_gpu: {free_bytes / 2**30:.1f} GiB free on the device "
                         f"cannot hold even one decoder layer of this config "
                         f"({(fixed + per_layer) * bytes_per_param / 2**30:.1f} GiB)")
    return int(min(layers, room // per_layer))


def build_model(config, device: torch.device, layers: int | None = None, seed: int = 0):
    """The config's causal LM with its parameters and gradients allocated on `device`
    (N(0, 0.02) parameters, N(0, 1e-3) gradients), built from meta tensors."""
    from .models import load_llama_config, meta_model

    cfg = load_llama_config(config)
    if layers is not None and layers != cfg.num_hidden_layers:
        cfg = cfg.__class__.from_dict({**cfg.to_dict(), "num_hidden_layers": layers})
    model = meta_model(cfg).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
            p.grad = torch.empty_like(p).normal_(0.0, 1e-3, generator=gen)
    return model


def count_syncs(fn, device: torch.device) -> int | None:
    """Host synchronisations fn() makes, as CUDA's sync debug mode reports them (None off a
    GPU: a CPU has nothing to synchronise with)."""
    if device.type != "cuda":
        return None
    _sync(device)
    old = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(old)
    return sum("synchroniz" in str(w.message) for w in caught)


def time_steps(opt, device: torch.device, warmup: int, steps: int) -> tuple[float, list[float]]:
    """Median seconds of opt.step() and every timing (the gradients stay in place)."""
    for _ in range(warmup):
        opt.step()
    times = [timed(opt.step, device) for _ in range(steps)]
    return statistics.median(times), times


def finiteness_check_seconds(model, device: torch.device, repeats: int = 3) -> float:
    """The engine's per-fragment finiteness flags over every gradient, and their one read,
    as a step runs them (optimizer._nonfinite_flag, optimizer._read_flags)."""
    from .optim.optimizer import _nonfinite_flag, _read_flags

    grads = [p.grad for p in model.parameters()]

    def check():
        _read_flags([_nonfinite_flag(g) for g in grads])

    check()
    return statistics.median(timed(check, device) for _ in range(repeats))


def make_optimizer(name: str, model):
    from . import build_optimizer

    if name == ADAMW:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    return build_optimizer(model, name)


def summarize(results: dict, bw_before: float, bw_after: float) -> dict:
    """Adds the derived figures to each recipe's {'seconds', 'bytes', 'bytes_once'}: GB/s,
    the fractions of the higher copy bandwidth, and the time relative to fused AdamW."""
    bw = max(bw_before, bw_after)
    base = results.get(ADAMW, {}).get("seconds")
    for r in results.values():
        s = r["seconds"]
        r["ms"] = s * 1e3
        r["gbps"] = r["bytes"] / s / 1e9
        r["bandwidth_fraction"] = r["bytes"] / s / bw
        r["bandwidth_fraction_once"] = r["bytes_once"] / s / bw
        r["time_vs_adamw_fused"] = s / base if base else None
    return results


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=props.total_memory / 2**30, sm_count=props.multi_processor_count)
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def run(args) -> dict:
    from . import ops
    from .bench import step_bytes
    from .models import config_name, load_llama_config

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sage_dist.bench_gpu: --device cuda, but torch sees no GPU "
                         "(use --device cpu to try the benchmark on the CPU)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cfg = load_llama_config(args.model)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    copy_bytes = int(args.copy_mb * 2**20)
    if free is not None:
        free -= 2 * copy_bytes
    layers = args.layers or fit_layers(cfg, free)
    model = build_model(cfg, device, layers)
    n_params = sum(p.numel() for p in model.parameters())
    bw_before = copy_bandwidth(device, copy_bytes)
    check = finiteness_check_seconds(model, device)
    results = {}
    for name in list(args.recipes) + [ADAMW]:
        base_mem = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        opt = make_optimizer(name, model)  # the state counts in the peak (AdamW's is lazy)
        seconds, times = time_steps(opt, device, args.warmup, args.steps)
        peak = (torch.cuda.max_memory_allocated(device) - base_mem
                if device.type == "cuda" else None)
        syncs = count_syncs(opt.step, device)
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        results[name] = dict(seconds=seconds, times=times, bytes=step_bytes(opt),
                             bytes_once=step_bytes(opt, once=True), syncs_per_step=syncs,
                             state_and_temporaries_peak_bytes=peak, params_finite=finite)
        del opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bw_after = copy_bandwidth(device, copy_bytes)
    summarize(results, bw_before, bw_after)
    out = dict(model=config_name(args.model), layers=layers,
               layers_in_config=cfg.num_hidden_layers, parameters=n_params,
               **device_info(device), extension=ops.HAS_EXTENSION,
               cuda_kernels=ops.has_cuda_kernels(), steps=args.steps, warmup=args.warmup,
               copy_bytes=copy_bytes, copy_gbps_before=bw_before / 1e9,
               copy_gbps_after=bw_after / 1e9, copy_gbps=max(bw_before, bw_after) / 1e9,
               finiteness_check_ms=check * 1e3, recipes=results)
    report(out)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
        print(f"wrote {args.json}")
    return out


def report(out: dict) -> None:
    print(f"model {out['model']}: {out['parameters'] / 1e6:.1f}M fp32 parameters "
          f"({out['layers']} of {out['layers_in_config']} layers) on {out['name']} "
          f"({out['device']}), torch {out['torch']}, CUDA kernels "
          f"{'built' if out['cuda_kernels'] else 'NOT built'}")
    print(f"device-to-device copy: {out['copy_gbps_before']:.1f} GB/s before, "
          f"{out['copy_gbps_after']:.1f} GB/s after the steps; 'of bw' is against the higher")
    print(f"{'recipe':<20}{'step ms':>9}{'MB moved':>10}{'GB/s':>9}{'of bw':>7}{'MB once':>9}"
          f"{'of bw':>7}{'vs AdamW fused':>16}{'syncs':>7}")
    for name, r in out["recipes"].items():
        rel = r["time_vs_adamw_fused"]
        syncs = "-" if r["syncs_per_step"] is None else str(r["syncs_per_step"])
        print(f"{name:<20}{r['ms']:>9.2f}{r['bytes'] / 1e6:>10.0f}{r['gbps']:>9.1f}"
              f"{r['bandwidth_fraction']:>7.0%}{r['bytes_once'] / 1e6:>9.0f}"
              f"{r['bandwidth_fraction_once']:>7.0%}"
              f"{(f'{rel:.2f}x' if rel else '-'):>16}{syncs:>7}")
    print(f"the engine's finiteness check (flags of every gradient, one read) takes "
          f"{out['finiteness_check_ms']:.2f} ms of each of our steps")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sage_dist.bench_gpu",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama_1b", help="a Llama config (path or name)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers to keep (default: the config's, fewer if the "
                             "device cannot hold them)")
    parser.add_argument("--copy-mb", type=float, default=1024.0,
                        help="size of each buffer of the bandwidth copy, MiB")
    parser.add_argument("--json", default="bench_gpu.json", help="where to write the results")
    args = parser.parse_args(argv)
    args.recipes = tuple(r for r in args.recipes.split(",") if r)
    bad = [r for r in args.recipes if r not in RECIPES]
    if bad:
        parser.error(f"--recipes: {bad[0]!r} is not one of {', '.join(RECIPES)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be >= 1")
    if not (args.copy_mb > 0 and math.isfinite(args.copy_mb)):
        parser.error("--copy-mb must be > 0")
    return args


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
