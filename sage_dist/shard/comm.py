"""What one optimizer step all-reduces, from global shapes and the cut tensor dims alone.

`param_floats` is the count for one parameter; `tp_plan_cuts` says which dims
sage_dist.fsdp.parallelize_llama cuts on each Llama parameter; `llama_step_floats` adds them
up for a model config on a dp x tp mesh, without building it (meta tensors). The tests hold
the optimizer's measured `comm_stats()` to these counts on real meshes.

    python -m sage_dist.shard.comm --model llama_60m,llama_1b --dp 8 --tp 8
"""
from __future__ import annotations

import argparse
import math

COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
ROWWISE = ("o_proj", "down_proj")


def param_floats(rule: str, shape, cuts, sinkhorn_iters: int = 0) -> int:
    """Floats one step sends for a parameter of global `shape` whose tensor dims `cuts` are
    cut over the summed ranks: its finiteness flag, plus each statistic its rule needs. Column
    sums travel whenever the matrix is cut (SAGE's damper reads every column, even those held
    elsewhere); row sums only when columns are cut (rows are otherwise complete here)."""
    if not cuts:
        return 0
    shape = tuple(shape)
    matrix = len(shape) >= 2
    R = shape[0] if matrix else 1
    C = math.prod(shape[1:]) if matrix else math.prod(shape)
    col = C if matrix else 0
    row = R if matrix and 1 in cuts else 0
    extra = {"sage": col if matrix else 2,
             "sinkhorn": sinkhorn_iters * (row + col), "sinkgd": sinkhorn_iters * (row + col),
             "scale_embedding": col, "scale_dense": row, "scale_head": row}.get(rule, 0)
    return 1 + extra


def tp_plan_cuts(name: str, shape) -> frozenset:
    """Tensor dims of a Llama parameter cut under parallelize_llama on a (dp, tp) mesh: FSDP2
    cuts dim 0 of everything, TP additionally dim 1 of the rowwise weights."""
    leaf = name.rsplit(".", 2)[-2] if "." in name else name
    return frozenset({0, 1}) if leaf in ROWWISE and len(shape) >= 2 else frozenset({0})


def llama_step_floats(model, recipe: str = "sage-hybrid", dp: int = 1, tp: int = 1) -> dict:
    """{floats, params, fraction} for one step of `recipe` on a Llama config (a shipped name,
    path, dict or module) under parallelize_llama on a dp x tp mesh."""
    from .. import models
    from ..optim.recipes import param_groups
    from .fragment import global_shape

    for key, v in (("dp", dp), ("tp", tp)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{key}={v!r}: must be an integer >= 1")
    m = models.meta_model(model)
    params = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    floats = 0
    if dp * tp > 1:
        for g in param_groups(m, recipe):
            for name, p in zip(g["param_names"], g["params"]):
                shape = global_shape(p)
                floats += param_floats(g["rule"], shape, tp_plan_cuts(name, shape),
                                       g.get("sinkhorn_iters", 0))
    return {"floats": floats, "params": params, "fraction": floats / params}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sage_dist.shard.comm", description=(
        "Floats one optimizer step all-reduces under FSDP2 x TP (sage_dist.fsdp."
        "parallelize_llama), counted from the shapes."))
    ap.add_argument("--model", default="llama_60m,llama_1b",
                    help="comma-separated model configs (shipped names or paths)")
    ap.add_argument("--recipe", default="sage-hybrid,sage,sinkgd-hybrid,scale,lion",
                    help="comma-separated recipes")
    ap.add_argument("--dp", type=int, default=8)
    ap.add_argument("--tp", type=int, default=8)
    a = ap.parse_args(argv)
    print(f"| model | recipe | mesh | floats per step | of parameters |")
    print(f"|---|---|---|---:|---:|")
    for model in a.model.split(","):
        for recipe in a.recipe.split(","):
            r = llama_step_floats(model, recipe, a.dp, a.tp)
            print(f"| {model} ({r['params'] / 1e6:.0f}M) | {recipe} | FSDP {a.dp} x TP {a.tp} "
                  f"| {r['floats']:,} | {100 * r['fraction']:.3f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
