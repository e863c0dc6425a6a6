"""`python -m sage_dist.bench quality`: a sweep of recipes x learning rates x seeds through the
project's own trainer, every run on the same batches and the same number of tokens.

Each run is `python -m sage_dist.train` in its own process, writing to
<out>/runs/<recipe>_lr<lr>_s<seed>/; a run whose final_rank0.json exists is kept and
skipped, so an interrupted sweep resumes where it stopped. `--jobs` runs several at once
(each with `--threads` intra-op threads; the default fits one run per two cores).

A recipe is one of sage_dist's recipes, a variant of sage-hybrid (optim.recipes.VARIANTS, the
ablations) or a package baseline (sage_dist.baselines). `--lrs` is the grid of every recipe;
`--grid RECIPE=LR,LR` gives one recipe its own. One directory is one setup: its tables cover
every finished run in it, so later calls (more seeds at the best lr, more recipes) add to the
same tables. Outputs:

    <out>/quality.md     best learning rate per recipe: validation perplexity (mean over
                         seeds, and each seed), optimizer state bytes, tokens/s; and, when
                         sage-hybrid and sinkgd-hybrid are both there, the share of the gap
                         between them that each recipe closes; then every recipe's
                         perplexity at every lr tried
    <out>/runs.json      every run (also runs.csv)
    <out>/ppl_vs_lr.png, <out>/loss_curves.png, <out>/ppl_vs_state.png
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .baselines import BASELINES
from .optim.recipes import RECIPES, VARIANTS

CHOICES = (*RECIPES, *VARIANTS, *BASELINES)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_parser(sub) -> None:
    p = sub.add_parser("quality", help="validation perplexity of recipes x learning rates "
                                       "through the trainer")
    p.add_argument("--config", default="tiny_single",
                   help="a training config (shipped name or path) giving model, data, batch")
    p.add_argument("--recipes", default="sage-hybrid,sinkgd-hybrid,adamw,lion",
                   help=f"comma-separated, from {', '.join(CHOICES)}")
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2", help="comma-separated peak lrs")
    p.add_argument("--grid", nargs="*", default=[], metavar="RECIPE=LR,LR",
                   help="a recipe's own lrs, replacing --lrs for it")
    p.add_argument("--top", type=int, default=0,
                   help="instead of a grid: the N best of --recipes among the finished runs "
                        "in --out, each at its best lr, with --seeds")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="runs/quality", help="the sweep's directory")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--threads", type=int, default=2, help="intra-op threads per run")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more training-config keys for every run (e.g. seq_len=128)")


def _check(args) -> list[tuple[str, float, int]]:
    recipes = [r for r in args.recipes.split(",") if r]
    bad = [r for r in recipes if r not in CHOICES]
    if bad:
        raise SystemExit(f"--recipes: {bad[0]!r} is not a recipe; allowed: {', '.join(CHOICES)}")
    try:
        lrs, seeds = _floats(args.lrs), [int(s) for s in args.seeds.split(",") if s.strip()]
        grid = {}
        for item in args.grid:
            rec, _, values = item.partition("=")
            if rec not in recipes:
                raise SystemExit(f"--grid {item!r}: {rec!r} is not in --recipes "
                                 f"({', '.join(recipes)})")
            grid[rec] = _floats(values)
    except ValueError as e:
        raise SystemExit(f"--lrs / --grid / --seeds: {e}; allowed are comma-separated numbers")
    if not (recipes and lrs and seeds) or min(lrs) <= 0 or \
            any(not v or min(v) <= 0 for v in grid.values()):
        raise SystemExit("--recipes, --lrs and --grid (positive) and --seeds must each name "
                         "at least one")
    for kv in args.set:
        if "=" not in kv:
            raise SystemExit(f"--set {kv!r}: allowed is KEY=VALUE")
    for key in ("steps", "jobs", "threads"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key}={getattr(args, key)}: must be >= 1")
    if args.top < 0:
        raise SystemExit(f"--top={args.top}: must be >= 0 (0: the grid)")
    if args.top:
        return [(r, lr, s) for r, lr in top_recipes(Path(args.out), recipes, args.top)
                for s in seeds]
    return [(r, lr, s) for r in recipes for lr in grid.get(r, lrs) for s in seeds]


def finished_runs(out: Path) -> list[dict]:
    """Every finished run in a sweep directory."""
    found = []
    for d in sorted((out / "runs").iterdir()) if (out / "runs").is_dir() else []:
        parsed = parse_run_name(d.name)
        if parsed and (d / "final_rank0.json").exists():
            found.append(summarise(d, *parsed))
    return found


def top_recipes(out: Path, recipes: list[str], n: int) -> list[tuple[str, float]]:
    """(recipe, best lr) of the n recipes of `recipes` with the lowest best perplexity."""
    best = best_per_recipe([r for r in finished_runs(out) if r["recipe"] in recipes])
    if not best:
        raise SystemExit(f"--top {n}: no finished run of {', '.join(recipes)} in {out}; run "
                         f"the grid first")
    order = sorted(best, key=lambda rec: mean_ppl(best[rec][1]))[:n]
    return [(rec, best[rec][0]) for rec in order]


def run_name(recipe: str, lr: float, seed: int) -> str:
    return f"{recipe}_lr{lr:g}_s{seed}"


def parse_run_name(name: str) -> tuple[str, float, int] | None:
    """run_name's inverse (recipe names hold no underscore), or None for another folder."""
    parts = name.rsplit("_", 2)
    if len(parts) != 3 or not parts[1].startswith("lr") or not parts[2].startswith("s"):
        return None
    try:
        return parts[0], float(parts[1][2:]), int(parts[2][1:])
    except ValueError:
        return None


def _one(args, recipe, lr, seed, log) -> dict:
    out = Path(args.out) / "runs" / run_name(recipe, lr, seed)
    if not (out / "final_rank0.json").exists():
        cmd = [sys.executable, "-m", "sage_dist.train", "--config", args.config,
               "--recipe", recipe, "--lr", repr(lr), "--seed", str(seed),
               "--steps", str(args.steps), "--out_dir", str(out), "--engine", "single",
               "--threads", str(args.threads), "--progress", "false", "--plot", "false",
               "--checkpoint_every", "0", "--resume", "none"]
        for kv in args.set:
            k, v = kv.split("=", 1)
            cmd += [f"--{k}", v]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        if p.returncode != 0:
            log(f"{out.name}: FAILED (exit {p.returncode}): {p.stderr.strip()[-500:]}")
            return {"run": out.name, "recipe": recipe, "lr": lr, "seed": seed, "failed": True}
        log(f"{out.name}: done in {time.perf_counter() - t0:.0f} s")
    else:
        log(f"{out.name}: kept from an earlier sweep")
    return summarise(out, recipe, lr, seed)


def summarise(out: Path, recipe: str, lr: float, seed: int) -> dict:
    """One run's figures from its metrics.jsonl."""
    from .train.metrics import read_metrics

    recs = read_metrics(out / "metrics.jsonl")
    final = next(r for r in recs if r["kind"] == "final")
    train = [r for r in recs if r["kind"] == "train"]
    mem = final["memory"][0]
    tps = [r["tokens_per_s"] for r in train[len(train) // 10:]]   # past the first steps
    return {"run": out.name, "recipe": recipe, "lr": lr, "seed": seed, "failed": False,
            "val_ppl": final["val_ppl"], "val_loss": final["val_loss"],
            "state_bytes": mem["optimizer_state/total"], "tokens_per_s": sum(tps) / len(tps),
            "loss_curve": [(r["step"], r["loss"]) for r in train], "seconds": final["seconds"]}


def mean_ppl(runs: list[dict]) -> float:
    return sum(r["val_ppl"] for r in runs) / len(runs)


def by_recipe_and_lr(runs: list[dict]) -> dict:
    """recipe -> lr -> its finished runs (one per seed)."""
    by: dict = {}
    for r in runs:
        if not r["failed"]:
            by.setdefault(r["recipe"], {}).setdefault(r["lr"], []).append(r)
    return by


def best_per_recipe(runs: list[dict]) -> dict:
    """recipe -> (lr with the lowest mean validation perplexity over seeds, its runs)."""
    return {rec: min(lrs.items(), key=lambda kv: mean_ppl(kv[1]))
            for rec, lrs in by_recipe_and_lr(runs).items()}


def write_table(runs, path: Path, args) -> str:
    best = best_per_recipe(runs)
    order = sorted(best, key=lambda rec: mean_ppl(best[rec][1]))
    gap = None
    if "sage-hybrid" in best and "sinkgd-hybrid" in best:
        ref = mean_ppl(best["sage-hybrid"][1])
        gap = ref - mean_ppl(best["sinkgd-hybrid"][1])
    gap_head = " gap closed |" if gap and gap > 0 else ""
    lrs = {rec: sorted({r["lr"] for r in runs if r["recipe"] == rec}) for rec in best}
    lines = [f"Sweep: `{args.config}`, {args.steps} steps, every finished run in {args.out}",
             "", f"| recipe | best lr | lrs tried | val ppl (mean) | per seed | optimizer state |"
             f" tokens/s |{gap_head}",
             "|---|---:|---|---:|---|---:|---:|" + ("---:|" if gap_head else "")]
    for rec in order:
        lr, rs = best[rec]
        ppl = mean_ppl(rs)
        seeds = ", ".join(f"{x['val_ppl']:.2f}" for x in sorted(rs, key=lambda x: x["seed"]))
        row = (f"| {rec} | {lr:g} | {', '.join(f'{x:g}' for x in lrs[rec])} | {ppl:.2f} | "
               f"{seeds} | {rs[0]['state_bytes'] / 2**20:.2f} MiB | "
               f"{sum(x['tokens_per_s'] for x in rs) / len(rs):,.0f} |")
        if gap_head:   # the share of sage-hybrid's deficit to sinkgd-hybrid this recipe closes
            row += f" {100 * (ref - ppl) / gap:.0f} % |"
        lines.append(row)
    lines += ["", *per_lr_table(runs, order)]
    failed = [r["run"] for r in runs if r["failed"]]
    if failed:
        lines += ["", f"Failed runs: {', '.join(failed)}"]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def per_lr_table(runs, order) -> list[str]:
    """Validation perplexity of every recipe at every lr (the mean over its seeds there; the
    best lr in bold), the grid the best-lr table was chosen from."""
    ok = [r for r in runs if not r["failed"]]
    lrs = sorted({r["lr"] for r in ok})
    lines = ["| recipe | " + " | ".join(f"lr {x:g}" for x in lrs) + " |",
             "|---|" + "---:|" * len(lrs)]
    for rec in order:
        cells = []
        at = {lr: [r for r in ok if r["recipe"] == rec and r["lr"] == lr] for lr in lrs}
        best = min((lr for lr in lrs if at[lr]), key=lambda lr: mean_ppl(at[lr]))
        for lr in lrs:
            cell = f"{mean_ppl(at[lr]):.1f}" if at[lr] else ""
            cells.append(f"**{cell}**" if lr == best else cell)
        lines.append(f"| {rec} | " + " | ".join(cells) + " |")
    return lines


def write_plots(runs, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, best = by_recipe_and_lr(runs), best_per_recipe(runs)
    names = sorted(grid)
    # one look per recipe, the same in every plot: 10 colours x (marker, line) for 20+ recipes
    look = {rec: dict(color=plt.cm.tab10.colors[i % 10], marker="osD^v"[i // 10 % 5],
                      linestyle=("-", "--", ":", "-.")[i // 10 % 4])
            for i, rec in enumerate(names)}

    def finish(ax, path):
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=120)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for rec in names:
        pts = sorted((lr, mean_ppl(rs)) for lr, rs in grid[rec].items())   # mean over seeds
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=rec, **look[rec])
    ax.set(xscale="log", yscale="log", xlabel="peak lr", ylabel="validation perplexity")
    finish(ax, out / "ppl_vs_lr.png")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for rec, (lr, rs) in sorted(best.items()):
        curve = rs[0]["loss_curve"]
        ax.plot([c[0] for c in curve], [c[1] for c in curve], label=f"{rec} (lr {lr:g})",
                **dict(look[rec], marker=None))
    ax.set(xlabel="step", ylabel="training loss")
    finish(ax, out / "loss_curves.png")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for rec, (lr, rs) in sorted(best.items()):
        ax.plot([rs[0]["state_bytes"] / 2**20], [mean_ppl(rs)], label=rec,
                **dict(look[rec], linestyle="none"))
    ax.set(xlabel="optimizer state (MiB)", ylabel="best validation perplexity")
    finish(ax, out / "ppl_vs_state.png")
    plt.close("all")


def run_quality(args) -> dict:
    grid = _check(args)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    done = [0]

    def log(msg):
        done[0] += 1
        print(f"[quality {done[0]}/{len(grid)}] {msg}", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(lambda g: _one(args, *g, log), grid))
    mine = {r["run"] for r in runs}   # and earlier calls' runs in this directory
    runs += [r for r in finished_runs(out) if r["run"] not in mine]
    (out / "runs.json").write_text(json.dumps(runs, indent=1))
    with open(out / "runs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        keys = ["run", "recipe", "lr", "seed", "failed", "val_ppl", "val_loss", "state_bytes",
                "tokens_per_s", "seconds"]
        w.writerow(keys)
        for r in runs:
            w.writerow([r.get(k, "") for k in keys])
    print(write_table(runs, out / "quality.md", args), end="")
    if any(not r["failed"] for r in runs):
        write_plots(runs, out)
    print(f"sweep of {len(grid)} runs in {time.perf_counter() - t0:.0f} s; wrote {out}/quality.md, "
          f"runs.json, runs.csv and the plots")
    return {"runs": runs, "best": {k: v[0] for k, v in best_per_recipe(runs).items()}}
