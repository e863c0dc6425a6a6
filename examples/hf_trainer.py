"""Pretrain a Llama with the Hugging Face Trainer and a sage_dist optimizer.

    # DDP (or one process with plain `python`): the factory builds the optimizer
    torchrun --nproc_per_node 2 examples/hf_trainer.py
    # DeepSpeed ZeRO-2, the JSON naming the recipe ("optimizer": {"type": "sage-hybrid"})
    torchrun --nproc_per_node 2 examples/hf_trainer.py --deepspeed configs/deepspeed/zero2.json
    # DeepSpeed ZeRO-3 with a JSON without an optimizer section: the factory, attached to ZeRO
    torchrun --nproc_per_node 2 examples/hf_trainer.py --deepspeed my_zero3_no_optimizer.json
    # FSDP2 through Accelerate
    torchrun --nproc_per_node 2 examples/hf_trainer.py --fsdp2
    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/hf_trainer.py

On a CPU machine set DS_ACCELERATOR=cpu for DeepSpeed. The model is a shipped config
(configs/models/, default llama_tiny); the text is --text FILE, or by default the corpus
collected from the standard library's docstrings (nothing is downloaded). The sage_dist parts
are the three marked lines; the rest is an ordinary Trainer script.
"""
from __future__ import annotations

import argparse
import json
import os

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama_tiny", help="a shipped model config or a path")
    p.add_argument("--text", help="a UTF-8 text file to train on (default: the embedded corpus)")
    p.add_argument("--recipe", default="sage-hybrid")
    p.add_argument("--lr", type=float, default=None, help="default: the recipe's")
    p.add_argument("--deepspeed", help="a DeepSpeed JSON (with or without an optimizer section)")
    p.add_argument("--fsdp2", action="store_true", help="FSDP2 through Accelerate")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    p.add_argument("--output-dir", default="runs/hf_trainer")
    p.add_argument("--save-steps", type=int, default=0, help="0: no checkpoints")
    p.add_argument("--resume", help="a checkpoint directory of an earlier run")
    return p.parse_args(argv)


def token_blocks(args, vocab_size: int) -> torch.Tensor:
    """[n, seq] token blocks of the text, encoded with the project's byte-level BPE."""
    from sage_dist.train.corpus import load_splits
    from sage_dist.train.tokenizer import load_tokenizer

    splits = load_splits()
    tok = load_tokenizer(vocab_size, splits)
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            docs = [f.read()]
    else:
        docs = splits["train"]
    ids = [i for d in docs for i in tok.encode(d).ids]
    n = len(ids) // args.seq
    if n == 0:
        raise SystemExit(f"{args.text}: fewer than {args.seq} tokens")
    return torch.tensor(ids[:n * args.seq]).view(n, args.seq)


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def deepspeed_json(args, kw: dict):
    """The DeepSpeed JSON as a dict, with TrainingArguments taken from what it sets (the
    Trainer refuses values that disagree) and the scheduler's step counts left to the Trainer."""
    from sage_dist.deepspeed import our_recipe
    from sage_dist.models import find_config

    with open(find_config(args.deepspeed, "deepspeed")) as f:
        cfg = json.load(f)
    params = cfg.get("optimizer", {}).get("params", {})
    named = our_recipe(cfg.get("optimizer", {}).get("type", ""))
    if named:
        args.recipe = named
    for key, arg in (("lr", "learning_rate"), ("weight_decay", "weight_decay"),
                     ("eps", "adam_epsilon")):
        if params.get(key, "auto") != "auto":
            kw[arg] = params[key]
    if isinstance(params.get("betas"), list):
        kw["adam_beta1"], kw["adam_beta2"] = params["betas"]
    for key, arg in (("train_micro_batch_size_per_gpu", "per_device_train_batch_size"),
                     ("gradient_accumulation_steps", "gradient_accumulation_steps"),
                     ("gradient_clipping", "max_grad_norm")):
        if cfg.get(key, "auto") != "auto":
            kw[arg] = cfg[key]
    for key in ("total_num_steps", "warmup_num_steps"):
        if key in cfg.get("scheduler", {}).get("params", {}):
            cfg["scheduler"]["params"][key] = "auto"
    return cfg


def main(argv=None):
    args = parse_args(argv)
    from transformers import Trainer, TrainingArguments

    import sage_dist.deepspeed
    import sage_dist.hf
    from sage_dist.models import build_model
    from sage_dist.optim.recipes import get_recipe

    cpu = not torch.cuda.is_available()
    if cpu:
        sage_dist.hf.accelerate_on_cpu()   # Accelerate runs FSDP/DeepSpeed on CPU as on GPUs
    sage_dist.deepspeed.register()          # [sage_dist] a JSON naming our recipe builds it
    kw = dict(output_dir=args.output_dir, max_steps=args.steps,
              per_device_train_batch_size=args.batch, lr_scheduler_type="cosine",
              warmup_steps=max(1, args.steps // 10), logging_steps=max(1, args.steps // 10),
              save_strategy="steps" if args.save_steps else "no",
              save_steps=args.save_steps or 500, report_to="none", seed=0,
              use_cpu=cpu and not args.deepspeed, dataloader_num_workers=0)
    if args.deepspeed:
        kw["deepspeed"] = deepspeed_json(args, kw)
    if args.fsdp2 or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        kw.update(fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": True,
                                          "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    lr = args.lr or kw.get("learning_rate") or get_recipe(args.recipe).defaults["lr"]
    kw["learning_rate"] = lr
    training_args = TrainingArguments(**kw)

    model = build_model(args.model, seed=0)
    data = Blocks(token_blocks(args, model.config.vocab_size))
    factory = sage_dist.hf.optimizer(args.recipe, lr=lr)   # [sage_dist] used unless the JSON
    trainer = Trainer(model=model, args=training_args,     # names the optimizer itself
                      train_dataset=data, optimizer_cls_and_kwargs=factory)  # [sage_dist]
    result = trainer.train(resume_from_checkpoint=args.resume)
    opt = sage_dist.hf.routed_optimizer(trainer)
    if training_args.process_index == 0:
        print(f"{args.recipe} on {opt.layout.name} layout: train loss {result.training_loss:.3f}"
              f", optimizer state {opt.state_bytes()['total']:,} bytes on rank 0, "
              f"last step all-reduced {opt.comm_stats()}")


if __name__ == "__main__":
    main()
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    if torch.distributed.is_initialized():  # after gloo, skip interpreter finalisation
        os._exit(0)                          # (see sage_dist/train/cli.py, end_process)
