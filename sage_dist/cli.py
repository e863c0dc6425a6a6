"""The `sage-dist` command."""
from __future__ import annotations

import argparse
import sys


def _load_model(path: str):
    """A randomly initialised Hugging Face Llama from a LlamaConfig JSON, on the meta device
    (routing needs only module types and shapes, so no memory is spent)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_json_file(path)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def main(argv=None) -> int:
    from .optim.recipes import RECIPES, describe

    ap = argparse.ArgumentParser(prog="sage-dist")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("describe", help="print the routing table of a model under a recipe")
    d.add_argument("--model", required=True, help="a LlamaConfig JSON, e.g. "
                   "configs/models/llama_tiny.json")
    d.add_argument("--recipe", default="sage-hybrid", choices=list(RECIPES))
    d.add_argument("--head", default="sage", choices=["sage", "auto", "sinkhorn"])
    args = ap.parse_args(argv)
    if args.cmd == "describe":
        print(describe(_load_model(args.model), args.recipe, head=args.head))
    return 0


if __name__ == "__main__":
    sys.exit(main())
