"""Workers for the memory-accounting tests (run inside spawned gloo processes).

Each worker builds one Hugging Face Llama per case from a config in configs/models/, runs it
under one engine (DeepSpeed ZeRO-1/2/3 or FSDP2) for two steps, and measures this rank's
memory with sage_dist.memory.measure in the steady state: between the second backward and the
second step (gradients resident; ZeRO-3 holds its persistent parameters whole again).
"""
from __future__ import annotations

import copy
import gc
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 8


def model_config(name: str, **overrides):
    from transformers import LlamaConfig
    cfg = LlamaConfig.from_json_file(os.path.join(ROOT, "configs", "models", f"llama_{name}.json"))
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_model(cfg, seed=0):
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(copy.deepcopy(cfg))


def batch(step, rank, vocab):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randint(0, vocab, (1, SEQ), generator=g)


def ds_config(stage, recipe, zero_extra=None, bf16=False):
    if recipe in ("adamw", "lion"):     # ours, not DeepSpeed's built-ins of the same name
        recipe = f"sage_dist.{recipe}"
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False,
            "zero_optimization": {"stage": stage, **(zero_extra or {})},
            "bf16": {"enabled": bf16},
            "optimizer": {"type": recipe, "params": {}}}


def _measure_deepspeed(rank, cfg, stage, recipe, zero_extra, bf16):
    import sage_dist.deepspeed as sdds
    from sage_dist.memory import measure
    engine, opt, _, _ = sdds.initialize(model=build_model(cfg),
                                        config=ds_config(stage, recipe, zero_extra, bf16))
    for step in range(2):
        x = batch(step, rank, cfg.vocab_size)
        engine.backward(engine(x, labels=x).loss)
        if step == 1:
            rec = measure(engine, opt)
            basic = engine.basic_optimizer
            # DeepSpeed ZeRO-1/2 and BF16 keep the flats in param_groups: state_bytes() agrees.
            if any(g["params"] for g in basic.param_groups):
                rec["state_bytes"] = basic.state_bytes()
            rec["wrapper"] = type(opt).__name__
        engine.step()
    rec["after_step"] = measure(engine, opt)
    del engine, opt
    return rec


def _measure_fsdp2(rank, world, cfg, recipe):
    import sage_dist
    from sage_dist.fsdp import shard_llama
    from sage_dist.memory import measure
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    model = shard_llama(build_model(cfg), mesh)
    opt = sage_dist.build_optimizer(model, recipe)
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        x = batch(step, rank, cfg.vocab_size)
        model(x, labels=x).loss.backward()
        if step == 1:
            rec = measure(model, opt)
            rec["state_bytes"] = opt.state_bytes()
        opt.step()
    rec["after_step"] = measure(model, opt)
    del model, opt
    return rec


def measure_cases(rank, world, cases):
    """cases: [(label, model name, config overrides, engine, stage, recipe, zero_extra, bf16)];
    returns {label: this rank's record}, and under '_table' (rank 0) every rank's record of
    the first case gathered with gather_table."""
    from sage_dist.memory import gather_table
    out = {}
    for label, name, overrides, engine, stage, recipe, zero_extra, bf16 in cases:
        cfg = model_config(name, **dict(overrides))
        if engine == "fsdp2":
            out[label] = _measure_fsdp2(rank, world, cfg, recipe)
        else:
            out[label] = _measure_deepspeed(rank, cfg, stage, recipe, zero_extra, bf16)
        gc.collect()
    first = dict(out[cases[0][0]])
    first.pop("after_step")
    out["_table"] = gather_table(first)
    return out

