"""Bad input, table-driven, over the public entry points: `build_optimizer`, the rule classes,
the training config's keys, the DeepSpeed JSON reconciliation and `sage-dist memory`.

Each case must raise before any work or collective, with a message naming the field, the value
and what is allowed (the words listed per case).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def mat():
    return [torch.nn.Parameter(torch.randn(3, 4))]


def ids(table):
    return [c[0] for c in table]


# -- build_optimizer ---------------------------------------------------------------------------
def _build(**kw):
    from sage_dist import build_optimizer
    return build_optimizer(kw.pop("m", None) or model(), kw.pop("recipe", "sage-hybrid"), **kw)


BUILD = [
    ("lr-str", dict(lr="big"), ["lr='big'", "allowed", "finite number"]),
    ("lr-nan", dict(lr=NAN), ["lr=nan", "allowed"]),
    ("lr-negative", dict(lr=-1.0), ["lr=-1.0", ">= 0"]),
    ("wd-negative", dict(weight_decay=-0.1), ["weight_decay=-0.1", ">= 0"]),
    ("wd-inf", dict(weight_decay=INF), ["weight_decay=inf", "finite"]),
    ("recipe-unknown", dict(recipe="sagee"), ["recipe='sagee'", "allowed are", "sage-hybrid"]),
    ("recipe-int", dict(recipe=3), ["recipe=3", "allowed are"]),
    ("empty-model", dict(m=torch.nn.Module()), ["no trainable parameters"]),
    ("frozen-only", dict(m=model().requires_grad_(False)), ["no trainable parameters"]),
    ("nonfinite", dict(nonfinite="ignore"), ["nonfinite='ignore'", "'skip', 'raise'"]),
    ("state-dtype", dict(state_dtype="float16"), ["state_dtype='float16'", "'bfloat16'"]),
    ("stochastic-rounding", dict(stochastic_rounding="yes"),
     ["stochastic_rounding='yes'", "True or False"]),
    ("rounding-seed", dict(rounding_seed=-1), ["rounding_seed=-1", "2**63"]),
    ("head", dict(head="xx"), ["head='xx'", "allowed"]),
    ("model-not-module", dict(m=[torch.zeros(3, requires_grad=True)]),
                 ["model", "nn.Module"]),
]


@pytest.mark.parametrize("case,kw,words", BUILD, ids=ids(BUILD))
def test_build_optimizer_bad_input(case, kw, words):
    with pytest.raises(ValueError) as e:
        _build(**kw)
    assert all(w in str(e.value) for w in words), str(e.value)


# -- the rule classes --------------------------------------------------------------------------
def _classes():
    from sage_dist.optim import classes as K
    return K


SHARED = torch.nn.Parameter(torch.randn(3, 4))
RULES = [
    ("sage-lr", lambda K: K.SAGE(mat(), lr=-1), ["lr=-1", ">= 0"]),
    ("sage-betas", lambda K: K.SAGE(mat(), betas=(1.5, 0.9)), ["betas[0]=1.5", "[0, 1)"]),
    ("sage-betas-type", lambda K: K.SAGE(mat(), betas=0.9), ["betas=0.9", "pair"]),
    ("sage-eps-zero", lambda K: K.SAGE(mat(), eps=0.0), ["eps=0.0", "> 0"]),
    ("sage-eps-nan", lambda K: K.SAGE(mat(), eps=NAN), ["eps=nan", "finite"]),
    ("sage-momentum-first", lambda K: K.SAGE(mat(), momentum_first="yes"),
     ["momentum_first='yes'", "True or False"]),
    ("sage-nonfinite", lambda K: K.SAGE(mat(), nonfinite="warn"), ["nonfinite='warn'", "skip"]),
    ("sage-empty", lambda K: K.SAGE([]), ["empty parameter list"]),
    ("sinkhorn-iters", lambda K: K.Sinkhorn(mat(), sinkhorn_iters=0),
     ["sinkhorn_iters=0", "integer >= 1"]),
    ("sinkhorn-iters-float", lambda K: K.Sinkhorn(mat(), sinkhorn_iters=2.5),
     ["sinkhorn_iters=2.5", "integer"]),
    ("sinkhorn-1d", lambda K: K.Sinkhorn([torch.nn.Parameter(torch.randn(3))]),
     ["shape (3,)", ">=2-D"]),
    ("sinkhorn-scale", lambda K: K.Sinkhorn(mat(), sinkhorn_scale=-1.0),
     ["sinkhorn_scale=-1.0", "> 0"]),
    ("sinkgd-linear-lr-scale", lambda K: K.SinkGD(mat(), linear_lr_scale=-1.0),
     ["linear_lr_scale=-1.0", "> 0"]),
    ("scale-dense-floor", lambda K: K.ScaleDense(mat(), floor=-1.0), ["floor=-1.0", "> 0"]),
    ("lion-betas", lambda K: K.Lion(mat(), betas=(0.9, 1.001)), ["betas[1]=1.001", "[0, 1)"]),
    ("lion-wd-nan", lambda K: K.Lion(mat(), weight_decay=NAN), ["weight_decay=nan", "finite"]),
    ("adamw-betas", lambda K: K.AdamW(mat(), betas=(0.9, 1.001)), ["betas[1]=1.001", "[0, 1)"]),
    ("adamw-wd-nan", lambda K: K.AdamW(mat(), weight_decay=NAN), ["weight_decay=nan"]),
    ("sage-frozen-only",
                 lambda K: K.SAGE([torch.nn.Parameter(torch.randn(3), requires_grad=False)]),
                 ["no trainable parameters"]),
    ("sage-shared-param",
                 lambda K: K.SAGE([{"params": [SHARED]}, {"params": [SHARED]}]),
                 ["param_groups[1]", "param_groups[0]"]),
]


@pytest.mark.parametrize("case,make,words", RULES, ids=ids(RULES))
def test_rule_classes_bad_input(case, make, words):
    with pytest.raises(ValueError) as e:
        make(_classes())
    assert all(w in str(e.value) for w in words), str(e.value)


# -- the training config ---------------------------------------------------------------------
CONFIG = [
    ("steps-zero", ["--steps", "0"], ["steps=0", ">= 1"]),
    ("steps-str", ["--steps", "many"], ["steps='many'", "expected int"]),
    ("steps-float", ["--steps", "2.5"], ["steps='2.5'", "expected int"]),
    ("global-batch-negative", ["--global_batch", "-4"], ["global_batch=-4", ">= 1"]),
    ("grad-accum-zero", ["--grad_accum", "0"], ["grad_accum=0", ">= 1"]),
    ("seq-len-one", ["--seq_len", "1"], ["seq_len=1", ">= 2"]),
    ("seq-len-too-long", ["--seq_len", "100000"], ["seq_len=100000", "max_position_embeddings"]),
    ("lr-nan", ["--lr", "nan"], ["lr=nan", "positive"]),
    ("lr-negative", ["--lr", "-1e-3"], ["lr=-0.001", "positive"]),
    ("weight-decay-negative", ["--weight_decay", "-1"], ["weight_decay=-1.0", ">= 0"]),
    ("warmup-out-of-range", ["--warmup_steps", "999", "--steps", "10"],
     ["warmup_steps=999", "[0, steps=10]"]),
    ("min-lr-ratio", ["--min_lr_ratio", "2"], ["min_lr_ratio=2.0", "[0, 1]"]),
    ("grad-clip-negative", ["--grad_clip", "-1"], ["grad_clip=-1.0", ">= 0"]),
    ("eval-every-zero", ["--eval_every", "0"], ["eval_every=0", ">= 1"]),
    ("keep-checkpoints-zero", ["--keep_checkpoints", "0"], ["keep_checkpoints=0", ">= 1"]),
    ("checkpoint-every-negative", ["--checkpoint_every", "-5"], ["checkpoint_every=-5", ">= 0"]),
    ("engine", ["--engine", "horovod"], ["engine='horovod'", "deepspeed, fsdp2, ddp, single"]),
    ("device", ["--device", "tpu"], ["device='tpu'", "auto, cpu, cuda"]),
    ("state-dtype", ["--state_dtype", "fp8"], ["state_dtype='fp8'", "float32, bfloat16"]),
    ("nonfinite", ["--nonfinite", "ignore"], ["nonfinite='ignore'", "skip, raise"]),
    ("dist-timeout-zero", ["--dist_timeout_s", "0"], ["dist_timeout_s=0.0", "positive"]),
    ("dist-timeout-nan", ["--dist_timeout_s", "nan"], ["dist_timeout_s=nan", "positive"]),
    ("threads-zero", ["--threads", "0"], ["threads=0", ">= 1"]),
    ("bf16-word", ["--bf16", "maybe"], ["bf16='maybe'", "expected bool"]),
    ("vocab-size-small", ["--vocab_size", "10"], ["vocab_size=10", ">= 258"]),
    ("recipe", ["--recipe", "adam"], ["recipe='adam'", "allowed"]),
    ("resume-missing", ["--resume", "/no/such/ckpt"], ["resume='/no/such/ckpt'", "auto"]),
    ("model-missing", ["--model", "no_such_model"], ["model='no_such_model'", "shipped"]),
    ("data-missing", ["--data", "/no/such/corpus"], ["data='/no/such/corpus'", "not found"]),
    ("tokenizer-missing", ["--tokenizer", "/no/such/tok"], ["tokenizer='/no/such/tok'"]),
    ("unknown-key", ["--stepz", "3"], ["'stepz'", "allowed keys"]),
    ("deepspeed-without-json", ["--engine", "deepspeed"], ["deepspeed_config", "JSON"]),
    ("tp-zero", ["--engine", "fsdp2", "--tp", "0"], ["tp=0", ">= 1"]),
    ("tp-without-fsdp2", ["--engine", "ddp", "--tp", "2"], ["tp=2", "engine=fsdp2", "'ddp'"]),
    ("tp-splits-heads", ["--engine", "fsdp2", "--tp", "8"],
     ["tp=8", "num_attention_heads=4", "whole heads"]),
    ("missing-value", ["--steps"], ["--steps", "missing value"]),
    ("bare-argument", ["steps", "3"], ["'steps'", "--key value"]),
]


@pytest.mark.parametrize("case,argv,words", CONFIG, ids=[c[0] for c in CONFIG])
def test_train_config_bad_input(case, argv, words):
    from sage_dist.train import config as C

    with pytest.raises(C.ConfigError) as e:
        cfg = C.load_config(["--config", "tiny_single", *argv])
        C.model_config(cfg)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_train_config_world_checks():
    from sage_dist.train import config as C

    cfg = C.load_config(["--config", "tiny_single", "--engine", "ddp"])
    with pytest.raises(C.ConfigError, match=r"global_batch=16 .* world size 3"):
        C.validate_world(cfg, 3)
    with pytest.raises(C.ConfigError, match=r"engine='single' with WORLD_SIZE=2"):
        C.validate_world(C.load_config(["--config", "tiny_single"]), 2)
    tp = C.load_config(["--config", "tiny_fsdp2", "--tp", "2"])
    with pytest.raises(C.ConfigError, match=r"tp=2 does not divide WORLD_SIZE=3"):
        C.validate_world(tp, 3)
    with pytest.raises(C.ConfigError, match=r"global_batch=16 .* data-parallel degree 3"):
        C.validate_world(tp, 6)
    C.validate_world(tp, 4)   # dp 2 x micro 8


# -- the DeepSpeed JSON reconciliation ---------------------------------------------------------
DS_BASE = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}
DS = [
    ("micro-batch", {"train_micro_batch_size_per_gpu": 3},
     ["train_micro_batch_size_per_gpu=3", "allowed: 8"]),
    ("grad-accum", {"gradient_accumulation_steps": 4},
     ["gradient_accumulation_steps=4", "grad_accum", "allowed: 1"]),
    ("train-batch", {"train_batch_size": 64}, ["train_batch_size=64", "allowed: 16"]),
    ("clipping", {"gradient_clipping": 0.5}, ["gradient_clipping=0.5", "allowed: 1.0"]),
    ("bf16", {"bf16": {"enabled": True}}, ["bf16.enabled=True", "allowed: false"]),
    ("optimizer", {"optimizer": {"type": "Adam"}}, ["optimizer.type='Adam'", "recipe="]),
]


@pytest.mark.parametrize("case,fields,words", DS, ids=[c[0] for c in DS])
def test_deepspeed_json_bad_input(case, fields, words, tmp_path):
    from sage_dist.train import config as C
    from sage_dist.train.deepspeed_engine import deepspeed_json

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**DS_BASE, **fields}))
    cfg = C.load_config(["--config", "tiny_zero2", "--deepspeed_config", str(path)])
    with pytest.raises(C.ConfigError) as e:
        deepspeed_json(cfg, 2)
    assert all(w in str(e.value) for w in words) and "ds.json" in str(e.value), str(e.value)


def test_deepspeed_json_not_json(tmp_path):
    from sage_dist.train import config as C
    from sage_dist.train.deepspeed_engine import deepspeed_json

    path = tmp_path / "broken.json"
    path.write_text("{zero: 2")
    cfg = C.load_config(["--config", "tiny_zero2", "--deepspeed_config", str(path)])
    with pytest.raises(C.ConfigError, match="broken.json.* not valid JSON"):
        deepspeed_json(cfg, 2)


# -- sage-dist memory --------------------------------------------------------------------------
MEMORY = [
    ("world-zero", ["--world", "0", "--model", "llama_tiny"], ["--world 0", "integer >= 1"]),
    ("world-negative", ["--world", "-2", "--model", "llama_tiny"], ["--world -2", ">= 1"]),
    ("world-str", ["--world", "x", "--model", "llama_tiny"], ["--world", "invalid int", "'x'"]),
    ("model-missing", ["--world", "2", "--model", "nope"], ["--model", "'nope'", "shipped"]),
    ("engine", ["--world", "2", "--model", "llama_tiny", "--engine", "tp"],
     ["--engine", "'tp'", "choose from"]),
    ("zero-stage", ["--world", "2", "--model", "llama_tiny", "--zero", "4"],
     ["--zero", "4", "choose from"]),
    ("fit-negative", ["--world", "2", "--fit", "-1"], ["--fit", "-1"]),
]


@pytest.mark.slow
def test_sage_dist_memory_bad_arguments():
    """All cases in one process (argparse and the checks run before any model is built)."""
    code = ("import json, sys, contextlib, io\n"
            "from sage_dist.cli import main\n"
            "out = []\n"
            "for argv in json.loads(sys.argv[1]):\n"
            "    err = io.StringIO()\n"
            "    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n"
            "            rc = main(['memory', *argv])\n"
            "        except SystemExit as e:\n"
            "            rc = e.code\n"
            "    out.append([rc, err.getvalue()])\n"
            "print(json.dumps(out))\n")
    cases = list(MEMORY)
    p = subprocess.run([sys.executable, "-c", code, json.dumps([c[1] for c in cases])],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    for (name, argv, words), (rc, err) in zip(cases, results):
        assert rc == 2 and all(w in err for w in words), (name, rc, err[-500:])


def test_table_size():
    n = len(BUILD) + len(RULES) + len(CONFIG) + len(DS) + 1 + len(MEMORY) + 2
    print(f"bad-input cases: {n}")
    assert n >= 70
