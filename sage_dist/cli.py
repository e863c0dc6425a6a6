"""The `sage-dist` command."""
from __future__ import annotations

import argparse
import math
import sys


def _memory_parser(sub, recipes, shipped) -> None:
    m = sub.add_parser(
        "memory", help="per-rank memory (parameters, gradients, master weights, optimizer "
        "state) of a model config under an engine, from its shapes",
        description="Per-rank bytes of parameters, gradients, fp32 master weights and "
        "optimizer state, estimated from the model config's shapes with DeepSpeed's and "
        "FSDP2's partitioning modelled exactly (docs/MEMORY.md), beside AdamW under the same "
        "setup and DeepSpeed's own AdamW estimate.")
    m.add_argument("--model", help=f"a LlamaConfig JSON path or a shipped model config "
                   f"({', '.join(shipped)}), e.g. llama_7b (required except with --fit)")
    m.add_argument("--world", type=int, required=True, help="data-parallel world size")
    m.add_argument("--engine", default="deepspeed", choices=["deepspeed", "fsdp2", "ddp"])
    m.add_argument("--zero", type=int, default=2, choices=[1, 2, 3],
                   help="DeepSpeed ZeRO stage (with --engine deepspeed)")
    m.add_argument("--recipe", default=None,
                   help=f"a recipe or a comma-separated list ({', '.join(recipes)}); default "
                   f"sage-hybrid, or every recipe with --fit and --plot")
    m.add_argument("--bf16", action="store_true", help="DeepSpeed bf16: 16-bit parameters and "
                   "gradients, fp32 master weights (FSDP2 via shard_llama keeps fp32 shards)")
    m.add_argument("--offload", action="store_true",
                   help="DeepSpeed offload_optimizer to CPU (master, state, fp32 gradients)")
    m.add_argument("--head", default="sage", choices=["sage", "auto", "sinkhorn"],
                   help="routing of an untied output head under sage-hybrid")
    m.add_argument("--rank", type=int, default=None,
                   help="the rank to report (default: the most loaded one)")
    m.add_argument("--gpus-per-node", type=int, default=8,
                   help="for DeepSpeed's own estimate (its CPU figures depend on it)")
    m.add_argument("--fit", type=float, metavar="GIB", default=None,
                   help="name, for each recipe, the largest model config in --configs whose "
                   "per-rank memory on the GPU fits GIB GiB")
    m.add_argument("--configs", default=None,
                   help="directory of model configs (*.json) for --fit (default: the shipped "
                   "ones)")
    m.add_argument("--plot", metavar="PNG", default=None,
                   help="write a PNG of per-rank memory by component, one bar per recipe")
    m.add_argument("--format", default="text", choices=["text", "json", "row"],
                   help="'row': one markdown table row (as in docs/MEMORY.md)")
    m.add_argument("--unit", default="GiB", choices=["GiB", "MiB"])


def _quiet_deepspeed_import() -> None:
    """Import DeepSpeed with its import-time log lines (it logs to stdout) sent to stderr, so
    that this command's stdout holds only its tables."""
    import contextlib
    with contextlib.redirect_stdout(sys.stderr):
        try:
            import deepspeed  # noqa: F401
        except ImportError:      # the estimator does not need it; DeepSpeed's own figure does
            pass


def _memory(args, ap) -> int:
    from . import memory
    from .optim.recipes import RECIPES, get_recipe

    try:
        recipes = ([get_recipe(r).name for r in args.recipe.split(",") if r.strip()]
                   if args.recipe else None)
    except ValueError as e:
        ap.error(str(e))
    if args.world < 1:
        ap.error(f"--world {args.world}: allowed is an integer >= 1")
    if args.offload and args.engine != "deepspeed":
        ap.error("--offload models DeepSpeed's offload_optimizer: use --engine deepspeed")
    if args.fit is not None and not (math.isfinite(args.fit) and args.fit > 0):
        ap.error(f"--fit {args.fit:g}: allowed is a number of GiB > 0")
    if args.fit is None and not args.model:
        ap.error("--model is required (except with --fit)")
    if args.rank is not None and not 0 <= args.rank < args.world:
        ap.error(f"--rank {args.rank}: allowed is 0..{args.world - 1}")
    if args.model:
        args.model = _model_config(args.model, ap)
    setup = dict(world=args.world, engine=args.engine, zero=args.zero, bf16=args.bf16,
                 offload=args.offload)
    _quiet_deepspeed_import()
    label = memory.setup_label(args.world, args.engine, args.zero, args.bf16, args.offload)
    if args.fit is not None:
        try:
            res = memory.fit(args.fit, recipes=recipes or list(RECIPES),
                             configs_dir=args.configs, head=args.head, **setup)
        except ValueError as e:   # an empty --configs directory, a config that is not Llama
            ap.error(f"--fit: {e}")
        print(memory.to_json(res) if args.format == "json" else
              memory.format_fit(res, args.fit, label))
    if args.model:
        if args.plot:
            out = memory.plot(args.plot, args.model, recipes=recipes or list(RECIPES),
                              head=args.head, **setup)
            print(f"wrote {out}")
        if args.fit is None or args.format != "json":
            rep = memory.report(args.model, recipes=recipes or ["sage-hybrid"], head=args.head,
                                rank=args.rank, gpus_per_node=args.gpus_per_node, **setup)
            if args.format == "json":
                print(memory.to_json(rep))
            elif args.format == "row":
                print(memory.format_row(rep, args.unit))
            else:
                print(memory.format_report(rep, args.unit))
    return 0


def _model_config(name_or_path: str, ap) -> str:
    """The model config file meant by --model (a path or a shipped name), checked to be a
    Llama config; a usage error otherwise."""
    from . import models
    try:
        path = models.find_config(name_or_path, "models")
        models.load_llama_config(path)
    except (FileNotFoundError, ValueError) as e:
        ap.error(f"--model: {e}")
    return str(path)


def main(argv=None) -> int:
    from . import models
    from .optim.recipes import RECIPES, VARIANTS, describe

    ap = argparse.ArgumentParser(prog="sage-dist")
    sub = ap.add_subparsers(dest="cmd", required=True)
    shipped = models.shipped("models")
    d = sub.add_parser("describe", help="print the routing table of a model under a recipe")
    d.add_argument("--model", required=True, help="a LlamaConfig JSON path or a shipped "
                   f"model config ({', '.join(shipped)}), e.g. llama_tiny")
    d.add_argument("--recipe", default="sage-hybrid", choices=[*RECIPES, *VARIANTS])
    d.add_argument("--head", default="sage", choices=["sage", "auto", "sinkhorn"])
    _memory_parser(sub, list(RECIPES), shipped)
    args = ap.parse_args(argv)
    if args.cmd == "describe":
        model = models.meta_model(_model_config(args.model, ap))
        print(describe(model, args.recipe, head=args.head))
    elif args.cmd == "memory":
        return _memory(args, ap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
