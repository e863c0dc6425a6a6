"""Memory accounting: the estimator (shapes only) against the measurement (real tensors).

The distributed checks build the tiny and 60M configs at world size 2 on CPU under DeepSpeed
ZeRO-1, 2, 3 and FSDP2 (plus uneven shards, optimizer offload and bf16 on the tiny config),
measure every rank between the second backward and the second step, and compare with
sage_dist.memory.estimate_ranks for the same rank: optimizer-state bytes must be EQUAL
(elementwise, replicated and per rule); parameters, gradients and master weights within 1 %.
"""
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from dist_harness import run
import memory_cases as cases
from sage_dist import memory as M
from sage_dist import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
OFFLOAD = {"offload_optimizer": {"device": "cpu"}}
ENGINES = [("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3), ("fsdp2", 0)]


def _name(engine, stage):
    return f"zero{stage}" if engine == "deepspeed" else engine


# (label, model, config overrides, engine, stage, recipe, zero_extra, bf16)
CASES = (
    [(f"{m}-{_name(e, s)}-sage-hybrid", m, (), e, s, "sage-hybrid", None, False)
     for m in ("tiny", "60m") for e, s in ENGINES]
    + [(f"tiny-{_name(e, s)}-scale", "tiny", (), e, s, "scale", None, False) for e, s in ENGINES]
    + [(f"tiny-{_name(e, s)}-adamw", "tiny", (), e, s, "adamw", None, False)
       for e, s in ENGINES[2:]]
    + [(f"tiny-vocab2047-{_name(e, s)}-sage-hybrid", "tiny", (("vocab_size", 2047),), e, s,
        "sage-hybrid", None, False) for e, s in (ENGINES[1], ENGINES[3])]
    + [(f"tiny-zero{s}-offload-sage-hybrid", "tiny", (), "deepspeed", s, "sage-hybrid",
        OFFLOAD, False) for s in (2, 3)]
    + [(f"tiny-zero{s}-bf16-sage-hybrid", "tiny", (), "deepspeed", s, "sage-hybrid", None, True)
       for s in (1, 3)]
)
ACCEPTANCE = [c[0] for c in CASES[:8]]


@pytest.fixture(scope="module")
def measured():
    return run(cases.measure_cases, WORLD, CASES)


def _estimates(case):
    label, name, overrides, engine, stage, recipe, zero_extra, bf16 = case
    cfg = cases.model_config(name, **dict(overrides))
    return M.estimate_ranks(cfg, WORLD, engine, stage, recipe, bf16=bf16,
                            offload=zero_extra is not None)


def _rel(a, b):
    return abs(a - b) / b if b else float(a != b)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_estimate_equals_measurement(measured, case):
    label = case[0]
    for rank, (est, got) in enumerate(zip(_estimates(case), (r[label] for r in measured))):
        errs = {c: _rel(got[c] if c != "parameters" else got[c]["total"],
                        est[c] if c != "parameters" else est[c]["total"])
                for c in ("parameters", "gradients", "master_weights")}
        print(f"{label} rank {rank}: optimizer state measured {got['optimizer_state']['total']:,}"
              f" B, estimated {est['optimizer_state']['total']:,} B; parameters "
              f"{got['parameters']['total']:,} B (rel err {errs['parameters']:.1e}), gradients "
              f"{got['gradients']:,} B ({errs['gradients']:.1e}), master weights "
              f"{got['master_weights']:,} B ({errs['master_weights']:.1e}) "
              f"[{got.get('wrapper', 'FSDP2')}]")
        # Optimizer state: equal, byte for byte, per kind and per rule; before and after step.
        assert got["optimizer_state"] == est["optimizer_state"]
        assert got["after_step"]["optimizer_state"] == est["optimizer_state"]
        if "state_bytes" in got:   # the optimizer's own count agrees
            assert got["state_bytes"] == {k: got["optimizer_state"][k]
                                          for k in ("elementwise", "replicated", "total")}
        assert got["optimizer_state"]["total"] > 0
        # Parameters (by dtype), gradients, master weights: within 1 %.
        assert set(got["parameters"]["by_dtype"]) == set(est["parameters"]["by_dtype"])
        for c, e in errs.items():
            assert e <= 0.01, f"{label} rank {rank}: {c} off by {e:.2%}"
        assert got["peak"]["peak_rss"] > 0


def test_acceptance_cases_present():
    assert {(c[1], c[3], c[4]) for c in CASES if c[0] in ACCEPTANCE} == \
        {(m, e, s) for m in ("tiny", "60m") for e, s in ENGINES}


@pytest.mark.slow
def test_gather_table_on_rank0(measured):
    table = measured[0]["_table"]
    assert measured[1]["_table"] is None
    assert [r["rank"] for r in table] == list(range(WORLD))
    text = M.format_table(table)
    print(text)
    assert "parameters" in text and "state elem" in text and len(text.splitlines()) == 3 + WORLD
    flat = M.flatten(table[0])
    assert flat["memory/optimizer_state/total"] == table[0]["optimizer_state"]["total"]
    assert flat["memory/total"] == table[0]["total"]


# -- one process --------------------------------------------------------------------------
@pytest.mark.parametrize("recipe, state_dtype", [
    ("sage-hybrid", "float32"), ("sage", "float32"), ("sinkgd-hybrid", "float32"),
    ("scale", "float32"), ("lion", "float32"), ("adamw", "float32"),
    ("sage-hybrid", "bfloat16"), ("lion", "bfloat16")])
def test_local_measure_equals_estimate(recipe, state_dtype):
    import sage_dist
    cfg = cases.model_config("tiny")
    model = cases.build_model(cfg)
    opt = sage_dist.build_optimizer(model, recipe, state_dtype=state_dtype)
    x = cases.batch(0, 0, cfg.vocab_size)
    model(x, labels=x).loss.backward()
    got = M.measure(model, opt)
    est = M.estimate(cfg, 1, "local", recipe=recipe, state_dtype=state_dtype)
    for key in ("parameters", "gradients", "master_weights", "optimizer_state", "total"):
        assert got[key] == est[key], key
    assert {k: got["optimizer_state"][k] for k in ("elementwise", "replicated", "total")} \
        == opt.state_bytes()


def test_torch_optimizer_measured_generically():
    cfg = cases.model_config("tiny")
    model = cases.build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = cases.batch(0, 0, cfg.vocab_size)
    model(x, labels=x).loss.backward()
    opt.step()
    got = M.measure(model, opt)
    n = sum(p.numel() for p in model.parameters())
    assert got["optimizer_state"]["elementwise"] == 2 * 4 * n
    assert got["optimizer_state"]["by_rule"]["AdamW"]["replicated"] == \
        sum(1 for _ in model.parameters()) * opt.state[next(model.parameters())]["step"].element_size()


def test_estimate_consistent_with_routing_table():
    """FSDP2 at a world size that shards unevenly: summed over ranks, elementwise state is the
    routing table's elementwise floats; every rank holds all replicated floats and steps."""
    from sage_dist.optim.recipes import describe
    from sage_dist.optim.registry import get_rule
    from sage_dist.shard.fragment import matrix_shape
    cfg = cases.model_config("tiny", vocab_size=2047)
    world = 3
    recs = M.estimate_ranks(cfg, world, "fsdp2", recipe="sage-hybrid")
    model = models.meta_model(cfg)
    table = describe(model, "sage-hybrid")
    elem = rep = steps = 0
    for row in table.rows:
        spec = get_rule(row.rule).state_spec(row.shape, *matrix_shape(row.shape))
        e, r = spec.floats(int(torch.tensor(row.shape).prod()))
        elem, rep, steps = elem + e, rep + r, steps + int(spec.step)
    assert elem + rep == table.total_state_floats
    assert sum(r["optimizer_state"]["elementwise"] for r in recs) == 4 * elem
    assert all(r["optimizer_state"]["replicated"] == 4 * (rep + steps) for r in recs)
    assert len({r["optimizer_state"]["elementwise"] for r in recs}) > 1   # uneven shards


# The SAGE paper's reference point (docs/ALGORITHMS.md §7): a 1.3B Llama with a 128,256-token
# vocabulary and tied embeddings (d = 2048), fp32 state: SAGE-hybrid ~0.98 GiB, AdamW ~9.8 GiB.
# The paper's exact layer layout is not published with the figures; this is Llama-3.2-1B's
# layout (16 layers, FFN 8192) with full multi-head attention: 1,336,477,696 parameters.
REF_1_3B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=32,
                tie_word_embeddings=True, max_position_embeddings=2048)


def test_published_reference_1_3b():
    sage = M.estimate(REF_1_3B, 1, "local", recipe="sage-hybrid")["optimizer_state"]["total"]
    adam = M.estimate(REF_1_3B, 1, "local", recipe="adamw")["optimizer_state"]["total"]
    n = M.model_shapes(REF_1_3B, "adamw").total_params
    print(f"1.3B reference ({n:,} parameters): SAGE-hybrid {sage / M.GIB:.3f} GiB, "
          f"AdamW {adam / M.GIB:.3f} GiB of optimizer state")
    assert 1.25e9 <= n <= 1.35e9
    assert abs(sage / M.GIB - 0.98) <= 0.05 * 0.98
    assert abs(adam / M.GIB - 9.8) <= 0.05 * 9.8


def test_deepspeed_own_estimate_is_deepspeeds():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    shapes = M.model_shapes(os.path.join(ROOT, "configs/models/llama_7b.json"), "adamw")
    assert shapes.total_params == 6_738_415_616
    z2 = M.deepspeed_adamw_estimate(shapes, 64, "deepspeed", 2, False)
    assert (z2["cpu"], z2["gpu"]) == estimate_zero2_model_states_mem_needs(
        shapes.total_params, 8, 8, cpu_offload=False)
    z3 = M.deepspeed_adamw_estimate(shapes, 8, "fsdp2", 0, False)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        shapes.total_params, shapes.largest_layer_params, 8, 1, cpu_offload=False,
        cpu_offload_params=False, zero_init=True)
    assert (z3["cpu"], z3["gpu"]) == (cpu, gpu)


def test_estimate_rejects_bad_input():
    cfg = cases.model_config("tiny")
    with pytest.raises(ValueError, match="engine"):
        M.estimate(cfg, 2, "fsdp1")
    with pytest.raises(ValueError, match="zero"):
        M.estimate(cfg, 2, "deepspeed", zero=4)
    with pytest.raises(ValueError, match="world"):
        M.estimate(cfg, 0, "fsdp2")
    with pytest.raises(ValueError, match="offload"):
        M.estimate(cfg, 2, "fsdp2", offload=True)
    with pytest.raises(ValueError, match="recipe"):
        M.estimate(cfg, 2, "fsdp2", recipe="adam")


# -- the command ----------------------------------------------------------------------------
def _cli(*args):
    from sage_dist.cli import main
    return main(list(args))


def test_cli_memory_deepspeed(capsys):
    assert _cli("memory", "--model", os.path.join(ROOT, "configs/models/llama_7b.json"),
                "--world", "64", "--engine", "deepspeed", "--zero", "2",
                "--recipe", "sage-hybrid") == 0
    out = capsys.readouterr().out
    print(out)
    head = [l for l in out.splitlines() if l.startswith("per-rank")][0]
    assert "sage-hybrid" in head and "adamw" in head
    for word in ("parameters", "gradients", "master weights", "optimizer state", "total",
                 "estimate_zero2_model_states_mem_needs"):
        assert word in out


def test_cli_memory_fsdp2_bf16_offload_rows(capsys):
    model = os.path.join(ROOT, "configs/models/llama_1b.json")
    assert _cli("memory", "--model", model, "--world", "8", "--engine", "fsdp2",
                "--recipe", "sage-hybrid,scale", "--bf16") == 0
    out = capsys.readouterr().out
    assert "scale" in out and "estimate_zero3_model_states_mem_needs" in out
    assert _cli("memory", "--model", model, "--world", "8", "--zero", "3", "--offload",
                "--format", "row") == 0
    row = capsys.readouterr().out.strip()
    print(row)
    assert row.startswith("| llama_1b | 8 | DeepSpeed ZeRO-3 |") and row.count("|") == 9
    assert "(GPU " in row


def test_cli_memory_fit(capsys):
    from sage_dist.optim.recipes import RECIPES
    assert _cli("memory", "--world", "8", "--engine", "deepspeed", "--zero", "3", "--bf16",
                "--fit", "3") == 0
    out = capsys.readouterr().out
    print(out)
    lines = out.splitlines()[1:]
    assert [l.split()[0] for l in lines] == list(RECIPES)
    fits = M.fit(3, 8, "deepspeed", 3, bf16=True)
    metas = {name: models.meta_model(name) for name in models.shipped("models")}
    for recipe, best in fits.items():
        assert best is not None and best["device_total"] <= 3 * M.GIB
        for name, meta in metas.items():   # nothing bigger fits
            shapes = M.model_shapes(meta, recipe, name=name)
            if shapes.total_params > best["params"]:
                est = M.estimate(shapes, 8, "deepspeed", 3, recipe, True)
                assert est["device_total"] > 3 * M.GIB
    # sage-hybrid fits a model at least as large as AdamW does
    assert fits["sage-hybrid"]["params"] >= fits["adamw"]["params"]


def test_cli_memory_plot(tmp_path, capsys):
    png = tmp_path / "mem.png"
    assert _cli("memory", "--model", os.path.join(ROOT, "configs/models/llama_tiny.json"),
                "--world", "2", "--zero", "2", "--plot", str(png)) == 0
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_memory_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        _cli("memory", "--world", "8")                         # no --model, no --fit
    with pytest.raises(SystemExit):
        _cli("memory", "--model", "x.json", "--world", "8", "--recipe", "adma")
    with pytest.raises(SystemExit):
        _cli("memory", "--model", "x.json", "--world", "8", "--engine", "fsdp2", "--offload")
    err = capsys.readouterr().err
    assert "adma" in err and "offload" in err


def test_cli_describe_still_works(capsys):
    assert _cli("describe", "--model", os.path.join(ROOT, "configs/models/llama_tiny.json"),
                "--recipe", "scale") == 0
    assert "scale_dense" in capsys.readouterr().out


def test_cli_entry_point_runs():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "sage_dist.cli", "memory", "--model",
                          os.path.join(ROOT, "configs/models/llama_tiny.json"), "--world", "2",
                          "--engine", "ddp", "--unit", "MiB"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "DeepSpeed's own estimate: none" in out.stdout
