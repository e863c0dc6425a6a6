"""Formatting of records (text tables, the CLI's report, markdown rows), and what is built on
the estimator: the largest config that fits a budget, and a per-component plot."""
from __future__ import annotations

import glob
import json
import os

from .. import models
from .estimate import deepspeed_adamw_estimate, estimate, model_shapes
from .measure import GIB, MIB


def fmt_bytes(n: float, unit: str = "auto") -> str:
    if unit == "auto":
        unit = "GiB" if abs(n) >= GIB else "MiB"
    scale = {"GiB": GIB, "MiB": MIB, "B": 1}[unit]
    return f"{n / scale:,.2f} {unit}" if unit != "B" else f"{int(n):,} B"


def format_table(records: list, unit: str = "auto", title: str | None = None) -> str:
    """One row per rank: parameters, gradients, master weights, optimizer state (elementwise +
    replicated), their total, and the measured peak."""
    records = [r for r in records if r is not None]
    head = ["rank", "parameters", "gradients", "master", "state elem", "state repl",
            "total", "peak"]
    rows = []
    for r in records:
        pk = r.get("peak", {})
        peak = pk.get("cuda_peak_reserved", pk.get("peak_rss"))
        peak_s = ("—" if peak is None else fmt_bytes(peak, unit)
                  + (" (cuda reserved)" if "cuda_peak_reserved" in pk else " (rss)"))
        rows.append([str(r.get("rank", "?")), fmt_bytes(r["parameters"]["total"], unit),
                     fmt_bytes(r["gradients"], unit), fmt_bytes(r["master_weights"], unit),
                     fmt_bytes(r["optimizer_state"]["elementwise"], unit),
                     fmt_bytes(r["optimizer_state"]["replicated"], unit),
                     fmt_bytes(r["total"], unit), peak_s])
    w = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    line = lambda x: "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(x))
    out = []
    if title is None and records:
        r0 = records[0]
        dtypes = ", ".join(f"{k} {fmt_bytes(v, unit)}" for k, v in r0["parameters"]["by_dtype"].items())
        rules = ", ".join(f"{k} {fmt_bytes(v['elementwise'] + v['replicated'], unit)}"
                          for k, v in r0["optimizer_state"]["by_rule"].items())
        title = (f"memory per rank ({r0.get('engine', '?')}, world {r0.get('world', len(records))});"
                 f" rank {r0.get('rank')}: parameters by dtype: {dtypes or '—'}; "
                 f"state by rule: {rules or '—'}")
    if title:
        out.append(title)
    out += [line(head), line(["-" * n for n in w]), *map(line, rows)]
    return "\n".join(out)


def _model_configs(configs_dir: str | None) -> list[tuple[str, str]]:
    """(name, path) of every model config: the shipped ones, or every *.json in configs_dir."""
    if configs_dir is None:
        return [(n, str(models.find_config(n, "models"))) for n in models.shipped("models")]
    paths = sorted(glob.glob(os.path.join(configs_dir, "*.json")))
    if not paths:
        raise ValueError(f"no model configs (*.json) in {configs_dir!r}")
    return [(os.path.splitext(os.path.basename(p))[0], p) for p in paths]


def fit(gib: float, world: int, engine: str = "deepspeed", zero: int = 2, recipes=None,
        bf16: bool = False, offload: bool = False, configs_dir: str | None = None,
        head: str = "sage") -> dict:
    """For each recipe, the largest model config (by parameter count; the shipped configs, or
    those in configs_dir) whose per-rank model states (device part, on the most loaded rank)
    fit in `gib` GiB: {recipe: {'model', 'params', 'device_total'} or None}."""
    from ..optim.recipes import RECIPES
    recipes = list(recipes or RECIPES)
    budget = gib * GIB
    out = {r: None for r in recipes}
    for name, path in _model_configs(configs_dir):
        m = models.meta_model(path)
        for recipe in recipes:
            shapes = model_shapes(m, recipe, head, name=name)
            est = estimate(shapes, world, engine, zero, recipe, bf16, offload)
            best = out[recipe]
            if est["device_total"] <= budget and (best is None or shapes.total_params > best["params"]):
                out[recipe] = {"model": name, "params": shapes.total_params,
                               "device_total": est["device_total"]}
    return out


def setup_label(world, engine, zero, bf16, offload) -> str:
    eng = f"DeepSpeed ZeRO-{zero}" if engine == "deepspeed" else {"fsdp2": "FSDP2",
                                                                    "ddp": "DDP"}.get(engine, engine)
    extras = ["bf16" if bf16 else "fp32"] + (["optimizer offload"] if offload else [])
    return f"{eng}, world {world}, {', '.join(extras)}"


def plot(path: str, model, world: int, engine: str = "deepspeed", zero: int = 2, recipes=None,
         bf16: bool = False, offload: bool = False, head: str = "sage", title=None) -> str:
    """A PNG: per-rank memory by component (stacked bars), one bar per recipe."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..optim.recipes import RECIPES
    recipes = list(dict.fromkeys([*(recipes or RECIPES), "adamw"]))
    name = models.config_name(model)
    m = models.meta_model(model)
    recs = [estimate(model_shapes(m, r, head, name=name), world, engine, zero, r, bf16, offload)
            for r in recipes]
    parts = [("parameters", lambda r: r["parameters"]["total"]),
             ("gradients", lambda r: r["gradients"]),
             ("master weights", lambda r: r["master_weights"]),
             ("optimizer state (elementwise)", lambda r: r["optimizer_state"]["elementwise"]),
             ("optimizer state (replicated)", lambda r: r["optimizer_state"]["replicated"])]
    fig, ax = plt.subplots(figsize=(2.2 + 1.25 * len(recipes), 5.2))
    bottom = [0.0] * len(recipes)
    for label, get in parts:
        vals = [get(r) / GIB for r in recs]
        ax.bar(recipes, vals, bottom=bottom, label=label, width=0.6)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, b in enumerate(bottom):
        ax.text(i, b, f"{b:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, max(bottom) * 1.1 if max(bottom) > 0 else 1)
    ax.set_ylabel("GiB per rank (most loaded rank)")
    ax.set_title(title or f"{name}: {setup_label(world, engine, zero, bf16, offload)}", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(model, world: int, engine: str = "deepspeed", zero: int = 2, recipes=("sage-hybrid",),
           bf16: bool = False, offload: bool = False, head: str = "sage", rank=None,
           gpus_per_node: int = 8, unit: str = "GiB") -> dict:
    """What the CLI prints: per-rank components for each recipe, AdamW beside them, and
    DeepSpeed's own AdamW estimate."""
    recipes = list(dict.fromkeys([*recipes, "adamw"]))
    name = models.config_name(model)
    m = models.meta_model(model)
    shapes = {r: model_shapes(m, r, head, name=name) for r in recipes}
    recs = {r: estimate(shapes[r], world, engine, zero, r, bf16, offload, rank=rank)
            for r in recipes}
    ds = deepspeed_adamw_estimate(shapes["adamw"], world, engine, zero, offload, gpus_per_node)
    return {"model": name, "params": shapes["adamw"].total_params,
            "setup": setup_label(world, engine, zero, bf16, offload), "recipes": recs,
            "deepspeed_adamw": ds}


def format_report(rep: dict, unit: str = "GiB") -> str:
    recs = rep["recipes"]
    names = list(recs)
    r0 = recs[names[0]]
    f = lambda n: fmt_bytes(n, unit).replace(f" {unit}", "")
    rows = [("parameters (" + ", ".join(r0["parameters"]["by_dtype"]) + ")",
             [r["parameters"]["total"] for r in recs.values()]),
            ("gradients", [r["gradients"] for r in recs.values()]),
            ("master weights (fp32)", [r["master_weights"] for r in recs.values()]),
            ("optimizer state", [r["optimizer_state"]["total"] for r in recs.values()]),
            ("  elementwise", [r["optimizer_state"]["elementwise"] for r in recs.values()]),
            ("  replicated", [r["optimizer_state"]["replicated"] for r in recs.values()]),
            ("total", [r["total"] for r in recs.values()])]
    if any(r["host_total"] for r in recs.values()):
        rows += [("  on the GPU", [r["device_total"] for r in recs.values()]),
                 ("  on the host (offload)", [r["host_total"] for r in recs.values()])]
    head = [f"per-rank {unit} (rank {r0['rank']})"] + names
    body = [[label] + [f(v) for v in vals] for label, vals in rows]
    w = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda x: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(x))
    out = [f"{rep['model']} ({rep['params']:,} parameters): {rep['setup']}",
           line(head), line(["-" * n for n in w]), *map(line, body)]
    tr = r0.get("transient") or {}
    if tr:
        notes = []
        if "reduce_bucket" in tr:
            notes.append(f"gradient reduce bucket {f(tr['reduce_bucket'])} {unit} "
                         f"(reduce_bucket_size 5e8 elements)")
        if "whole_gradients_end_of_backward" in tr:
            notes.append(f"ZeRO-1 holds every gradient whole until the end of backward: "
                         f"{f(tr['whole_gradients_end_of_backward'])} {unit} at that moment "
                         f"instead of the gradients row")
        out.append("not in the total (transient): " + "; ".join(notes))
    ds = rep["deepspeed_adamw"]
    if ds.get("function"):
        out.append(f"DeepSpeed's own estimate for AdamW ({ds['function']}, 16-bit params/grads, "
                   f"{ds['nodes']} node(s) x {ds['gpus_per_node']} GPUs): "
                   f"{f(ds['gpu'])} {unit} per GPU, {f(ds['cpu'])} {unit} per CPU")
    else:
        out.append("DeepSpeed's own estimate: none for this engine")
    return "\n".join(out)


def format_row(rep: dict, unit: str = "GiB") -> str:
    """One markdown table row: model, world, engine, then parameters and master weights (the
    same for every recipe), then per recipe `gradients / optimizer state / total` of its most
    loaded rank (with the GPU part when offloading; gradients differ between recipes under
    ZeRO-1/2, whose param groups sage_dist.deepspeed merges or not per recipe), then
    DeepSpeed's own AdamW estimate per GPU."""
    recs = rep["recipes"]
    r0 = next(iter(recs.values()))
    f = lambda n: f"{n / (GIB if unit == 'GiB' else MIB):,.2f}"
    cells = [rep["model"], str(r0["world"]), rep["setup"].split(",")[0],
             f(r0["parameters"]["total"]), f(r0["master_weights"])]
    cells += [f"{f(r['gradients'])} / {f(r['optimizer_state']['total'])} / **{f(r['total'])}**"
              + (f" (GPU {f(r['device_total'])})" if r["host_total"] else "")
              for r in recs.values()]
    ds = rep["deepspeed_adamw"]
    cells.append(f(ds["gpu"]) if ds.get("gpu") is not None else "—")
    return "| " + " | ".join(cells) + " |"


def format_fit(result: dict, gib: float, label: str) -> str:
    w = max(len(r) for r in result)
    out = [f"largest model config that fits {gib:g} GiB per rank ({label}):"]
    for recipe, best in result.items():
        out.append(f"  {recipe.ljust(w)}  " + (
            "none fits" if best is None else
            f"{best['model']} ({best['params'] / 1e6:,.0f}M parameters, "
            f"{best['device_total'] / GIB:.2f} GiB)"))
    return "\n".join(out)


def to_json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str)
