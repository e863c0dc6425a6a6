"""The package baselines of the quality benchmark (sage_dist.baselines): each builds from its
own package, trains, routes as documented, has its state counted, and checkpoints without
loss; the trainer runs them on one process and refuses them where they cannot run."""
import copy
import io
import json

import pytest
import torch

from sage_dist.baselines import (BASELINES, CpuMuon, OptimizerChain, build_baseline,
                                 newton_schulz_fp32)
from sage_dist.memory.measure import optimizer_state_bytes
from sage_dist.optim.recipes import classify
from sage_dist.train.config import ConfigError, TrainConfig, validate
from sage_dist.train.loop import main
from sage_dist.train.metrics import read_metrics
from conftest import tiny_llama


def _step(model, opt, step):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    opt.zero_grad(set_to_none=True)
    loss = model(x, labels=x).loss
    loss.backward()
    opt.step()
    return loss.item()


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_trains_counts_its_state_and_round_trips_a_checkpoint(name):
    model = tiny_llama(hidden=64, inter=96, heads=4, kv=2)
    opt = build_baseline(model, name, 1e-3, model.config)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert sorted(map(id, params)) == sorted(id(p) for p in model.parameters())  # each once
    before = [p.detach().clone() for p in model.parameters()]
    losses = [_step(model, opt, s) for s in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    state = optimizer_state_bytes(opt)
    assert 0 < state["total"] <= 2 * 4 * sum(p.numel() for p in model.parameters()) * 1.05
    # a checkpoint loaded into a fresh optimizer continues exactly
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    twin = copy.deepcopy(model)
    twin_opt = build_baseline(twin, name, 1e-3, twin.config)
    buf.seek(0)
    twin_opt.load_state_dict(torch.load(buf, weights_only=False))
    for s in (3, 4):
        _step(model, opt, s)
        _step(twin, twin_opt, s)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (64, 64)])
def test_muon_newton_schulz_in_fp32_is_torchs_iteration_with_less_rounding(shape):
    """newton_schulz_fp32 against torch's bf16 function (same coefficients and steps) and the
    same iteration in float64: it is the fp64 result to fp32 rounding, and torch's to bf16's."""
    from torch.optim import _muon
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    coeffs, steps, eps = (_muon.DEFAULT_A, _muon.DEFAULT_B, _muon.DEFAULT_C), 5, 1e-7
    ours = newton_schulz_fp32(g, coeffs, steps, eps)
    exact = newton_schulz_fp32(g.double(), coeffs, steps, eps)
    torch_bf16 = _muon._zeropower_via_newtonschulz(g, coeffs, steps, eps).float()
    assert ours.dtype == g.dtype and ours.shape == g.shape
    assert (ours.double() - exact).norm() / exact.norm() < 1e-5
    rel = ((torch_bf16.double() - exact).norm() / exact.norm()).item()
    assert 1e-4 < rel < 5e-2          # torch's rounds in bf16: close, and not bit-equal
    # singular values pushed towards 1 (the point of the iteration; five steps cannot lift
    # the few tiny ones of a random square matrix)
    s = torch.linalg.svdvals(exact)
    assert s.median() > 0.6 and s.max() < 1.3


def test_cpu_muon_steps_like_torchs_muon_and_puts_torchs_function_back():
    from torch.optim import _muon
    original = _muon._zeropower_via_newtonschulz
    a = tiny_llama(hidden=64, inter=96)
    b = copy.deepcopy(a)
    mats = lambda m: [p for _, p, cat in classify(m) if cat == "matrix"]
    kw = dict(lr=1e-2, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")
    ours, theirs = CpuMuon(mats(a), **kw), torch.optim.Muon(mats(b), **kw)
    for s in range(3):
        _step(a, ours, s)
        _step(b, theirs, s)
        assert _muon._zeropower_via_newtonschulz is original
    for p, q in zip(mats(a), mats(b)):
        assert not torch.equal(p, q)                       # fp32 vs bf16 rounding differs
        assert torch.allclose(p, q, rtol=0, atol=5e-3)     # by less than a tenth of a step


def test_routing_of_muon_and_the_projected_baselines():
    model = tiny_llama(hidden=64, inter=96)
    hidden = {id(p) for _, p, cat in classify(model) if cat == "matrix"}
    muon = build_baseline(model, "muon", 1e-3, model.config)
    assert isinstance(muon, OptimizerChain)
    m, a = muon.optimizers
    assert isinstance(m, torch.optim.Muon) and type(a).__name__ == "AdamW"
    assert {id(p) for g in m.param_groups for p in g["params"]} == hidden
    assert m.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    for name, rank in (("galore", 16), ("apollo", 16), ("apollo-mini", 1)):
        opt = build_baseline(model, name, 1e-3, model.config)
        low = [g for g in opt.param_groups if "rank" in g]
        assert len(low) == 1 and low[0]["rank"] == rank
        assert {id(p) for p in low[0]["params"]} == hidden
    # GaLore's projection matrices are optimizer state too, and are counted
    opt = build_baseline(model, "galore", 1e-3, model.config)
    _step(model, opt, 0)
    moments = sum(t.numel() * 4 for st in opt.state.values() for t in st.values()
                  if torch.is_tensor(t))
    assert optimizer_state_bytes(opt)["total"] > moments


def test_weight_decay_override_and_unknown_name():
    model = tiny_llama()
    assert build_baseline(model, "torch-adamw", 1e-3, model.config,
                          weight_decay=0.0).param_groups[0]["weight_decay"] == 0.0
    assert build_baseline(model, "lion-pytorch", 1e-4,
                          model.config).param_groups[0]["weight_decay"] == 1.0
    with pytest.raises(ValueError, match="recipe='adam' is not a baseline: allowed are"):
        build_baseline(model, "adam", 1e-3, model.config)


@pytest.mark.parametrize("change, words", [
    (dict(engine="fsdp2"), ["recipe='muon' is a package baseline", "single or ddp",
                            "engine='fsdp2'"]),
    (dict(engine="deepspeed", deepspeed_config="zero2"), ["engine='deepspeed'"]),
    (dict(state_dtype="bfloat16"), ["state_dtype='bfloat16'", "allowed: float32"]),
    (dict(nonfinite="raise"), ["nonfinite='raise'", "allowed: skip"]),
    (dict(recipe="muonn"), ["recipe='muonn'", "package baseline: torch-adamw, muon"]),
])
def test_trainer_refuses_a_baseline_where_it_cannot_run(change, words):
    cfg = TrainConfig(**{"recipe": "muon", **change})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.slow
def test_trainer_runs_a_baseline_and_resumes_it_exactly(tmp_path, monkeypatch):
    """muon (two torch optimizers as one) through the trainer: 4 steps straight, and 2 steps
    then a resume from the step-2 checkpoint, end on the same validation loss."""
    monkeypatch.setenv("SAGE_DIST_CACHE", str(tmp_path / "cache"))
    common = ["--recipe", "muon", "--lr", "3e-3", "--steps", "4", "--seq_len", "32",
              "--eval_every", "4", "--eval_batches", "1", "--plot", "false",
              "--progress", "false", "--checkpoint_every", "2", "--keep_checkpoints", "2"]
    assert main([*common, "--out_dir", str(tmp_path / "a")]) == 0
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000002"
    assert ckpt.is_dir()
    assert main([*common, "--out_dir", str(tmp_path / "b"), "--resume", str(ckpt)]) == 0
    final = [next(r for r in read_metrics(tmp_path / d / "metrics.jsonl")
                  if r["kind"] == "final") for d in "ab"]
    assert final[0]["val_loss"] == final[1]["val_loss"]
    assert final[0]["memory"][0]["optimizer_state/total"] > 0
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["recipe"] == "muon"
