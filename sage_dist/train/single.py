"""Short single-process pretraining of a small Llama on the stdlib corpus.

    python -m sage_dist.train [--model configs/models/llama_tiny.json] [--recipe sage-hybrid]
                              [--steps 400] [--batch 16] [--seq 128] [--lr LR] [--seed 0] ...

A smoke test of an optimizer recipe end to end: random init (seeded), the recipe's optimizer from
`sage_dist.build_optimizer`, warmup + cosine schedule, gradient clipping, and validation loss /
perplexity on a fixed set of held-out windows, so runs with different recipes or seeds compare.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO_ROOT / "configs" / "models" / "llama_tiny.json"
WARMUP_FRACTION = 0.1  # the papers' schedule: 10 % linear warmup, then cosine
MIN_LR_RATIO = 0.1  # cosine ends at 10 % of the peak, as in the Llama recipe
CLIP_NORM = 1.0
LOG_EVERY = 10


class ArgError(ValueError):
    """A bad command-line value; main() prints it and exits with status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sage_dist.train", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="LlamaConfig JSON file")
    p.add_argument("--recipe", default="sage-hybrid", help="sage_dist.build_optimizer recipe")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=None,
                   help="tokenizer vocabulary (default: the model's vocab_size)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    return p


def load_model_config(path: str):
    from transformers import LlamaConfig

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArgError(f"--model: file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ArgError(f"--model: {path} is not valid JSON ({e})") from None
    if data.get("model_type") != "llama":
        raise ArgError(f"--model: {path} has model_type={data.get('model_type')!r}; "
                       f"only 'llama' is supported")
    return LlamaConfig.from_dict(data)


def check_args(args: argparse.Namespace, config) -> None:
    """Fail before any work is done, naming the field, the value and what is allowed."""
    positive = ("steps", "batch", "eval_every", "eval_batches")
    for name in positive + (("threads",) if args.threads is not None else ()):
        if getattr(args, name) < 1:
            raise ArgError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if not 2 <= args.seq <= config.max_position_embeddings:
        raise ArgError(f"--seq={args.seq}: must be in [2, {config.max_position_embeddings}] "
                       f"(the model's max_position_embeddings)")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ArgError(f"--lr={args.lr}: must be a positive number")
    if args.vocab_size > config.vocab_size:
        raise ArgError(f"tokenizer vocab size {args.vocab_size} is larger than the model's "
                       f"vocab_size {config.vocab_size} ({args.model})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ArgError(f"--device={args.device}: CUDA is not available on this machine")


def lr_lambda(total_steps: int):
    """Linear warmup over the first 10 % of steps, then cosine down to MIN_LR_RATIO."""
    warmup = max(1, round(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def sample_batch(tokens: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    """Random (batch, seq) windows; targets are the inputs shifted by one token."""
    starts = torch.randint(0, tokens.numel() - seq, (batch,), generator=gen)
    windows = tokens[starts[:, None] + torch.arange(seq + 1)]
    return windows[:, :-1], windows[:, 1:]


def eval_windows(tokens: torch.Tensor, count: int, seq: int) -> torch.Tensor:
    """Evenly spaced windows over the whole validation stream: no randomness, so every run
    (any seed, any recipe) is scored on the same tokens."""
    starts = torch.linspace(0, tokens.numel() - seq - 1, count).long()
    return tokens[starts[:, None] + torch.arange(seq + 1)]


def lm_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int, device) -> float:
    model.eval()
    total = 0.0
    for chunk in windows.split(batch):
        chunk = chunk.to(device)
        total += lm_loss(model, chunk[:, :-1], chunk[:, 1:]).item() * len(chunk)
    model.train()
    return total / len(windows)


def build_model(config, seed: int, device):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)  # the random init is the only use of the global RNG
    return LlamaForCausalLM(config).to(device)


def build_optimizer(model, recipe: str, lr: float | None):
    from sage_dist import build_optimizer as build

    try:
        return build(model, recipe, lr=lr)
    except (ValueError, KeyError) as e:  # unknown recipe or bad hyperparameter
        raise ArgError(f"cannot build the optimizer (--recipe={recipe}, --lr={lr}): {e}") from None


def load_data(vocab_size: int, seq: int):
    from .tokenizer import load_tokens

    tok, tokens = load_tokens(vocab_size)
    for name, t in tokens.items():
        if t.numel() < seq + 2:
            raise ArgError(f"--seq={seq}: the {name} split has only {t.numel()} tokens")
    return tok, tokens


def log(msg: str) -> None:
    print(msg, flush=True)


def log_eval(step: int, loss: float) -> None:
    log(f"step {step:5d} | val_loss {loss:.4f} | val_ppl {math.exp(min(loss, 80)):.2f}")


def describe_run(args, model, opt, tok, tokens) -> None:
    params = sum(p.numel() for p in model.parameters())
    lrs = sorted({g["lr"] for g in opt.param_groups})
    c = model.config
    log(f"model: {params / 1e6:.2f}M params, {c.num_hidden_layers} layers, hidden "
        f"{c.hidden_size}, vocab {c.vocab_size} ({args.model})")
    log(f"optimizer: recipe {args.recipe}, {type(opt).__name__}, peak lr "
        f"{', '.join(f'{x:.3g}' for x in lrs)}, {len(opt.param_groups)} param groups")
    log(f"data: tokenizer vocab {tok.get_vocab_size()}, train {tokens['train'].numel():,} tokens, "
        f"validation {tokens['validation'].numel():,} tokens; {args.steps} steps x "
        f"{args.batch} x {args.seq} = {args.steps * args.batch * args.seq:,} tokens")


def train_step(model, opt, sched, x, y, step: int) -> tuple[float, float]:
    """One update; returns the loss and the gradient norm before clipping."""
    loss = lm_loss(model, x, y)
    if not torch.isfinite(loss):  # stop early rather than train on for minutes on NaN
        raise FloatingPointError(f"training diverged: loss {loss.item()} at step {step}")
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    return loss.item(), grad_norm.item()


def train_loop(args, model, opt, tokens) -> dict:
    """The optimization itself; returns step-0 and final validation losses."""
    device = torch.device(args.device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps))
    gen = torch.Generator().manual_seed(args.seed)
    val = eval_windows(tokens["validation"], args.eval_batches * args.batch, args.seq)
    first = evaluate(model, val, args.batch, device)
    log_eval(0, first)
    window_loss, window_time, window_tokens = 0.0, 0.0, 0
    last, train_time = first, 0.0
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        x, y = (t.to(device) for t in sample_batch(tokens["train"], args.batch, args.seq, gen))
        loss, grad_norm = train_step(model, opt, sched, x, y, step)
        window_time += time.perf_counter() - t0
        train_time += time.perf_counter() - t0
        window_loss += loss
        window_tokens += x.numel()
        if step % LOG_EVERY == 0 or step == args.steps:
            n = (step - 1) % LOG_EVERY + 1
            log(f"step {step:5d} | train_loss {window_loss / n:.4f} | lr "
                f"{opt.param_groups[0]['lr']:.3e} | grad_norm {grad_norm:.3f} | "
                f"{window_tokens / window_time:,.0f} tok/s")
            window_loss, window_time, window_tokens = 0.0, 0.0, 0
        if step % args.eval_every == 0 or step == args.steps:
            last = evaluate(model, val, args.batch, device)
            log_eval(step, last)
    skipped = getattr(opt, "nonfinite_count", 0)  # sage_dist optimizers skip NaN/Inf grads
    if skipped:
        log(f"warning: the optimizer skipped {skipped} parameter updates with non-finite grads")
    tokens_per_s = args.steps * args.batch * args.seq / train_time
    log(f"trained {args.steps} steps in {train_time:.1f}s ({tokens_per_s:,.0f} tok/s)")
    return {"step0_val_loss": first, "final_val_loss": last, "nonfinite_skipped": skipped,
            "train_tokens_per_s": tokens_per_s}


def run(argv: list[str] | None = None) -> dict:
    """Parse, validate, train; return the losses. Raises ArgError on a bad argument."""
    start = time.perf_counter()
    args = build_parser().parse_args(argv)
    config = load_model_config(args.model)
    if args.vocab_size is None:
        args.vocab_size = config.vocab_size
    check_args(args, config)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = build_model(config, args.seed, torch.device(args.device))
    opt = build_optimizer(model, args.recipe, args.lr)
    tok, tokens = load_data(args.vocab_size, args.seq)
    if tok.get_vocab_size() > config.vocab_size:  # BPE may stop short of, never exceed, the ask
        raise ArgError(f"tokenizer vocab size {tok.get_vocab_size()} is larger than the "
                       f"model's vocab_size {config.vocab_size}")
    describe_run(args, model, opt, tok, tokens)
    result = train_loop(args, model, opt, tokens)
    result.update(steps=args.steps, seconds=time.perf_counter() - start,
                  final_val_ppl=math.exp(min(result["final_val_loss"], 80)))
    log(f"final: step {args.steps} val_loss {result['final_val_loss']:.4f} val_ppl "
        f"{result['final_val_ppl']:.2f} (step-0 val_loss {result['step0_val_loss']:.4f}) "
        f"in {result['seconds']:.1f}s")
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: 0 on success, 2 on a bad argument, 1 if training diverged."""
    try:
        run(argv)
    except ArgError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
