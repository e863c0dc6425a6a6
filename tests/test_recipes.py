"""Routing (docs/ALGORITHMS.md §6), describe(), and every bad input build_optimizer must refuse."""
import pytest
import torch
from torch import nn

import sage_dist
from sage_dist.optim.recipes import RECIPES, route
from conftest import tiny_llama

EXPECTED = {  # recipe -> (embedding, head, matrix, vector)
    "sage-hybrid": ("sage", "sage", "sinkhorn", "sage"),
    "sage": ("sage", "sage", "sage", "sage"),
    "sinkgd-hybrid": ("adamw", "adamw", "sinkgd", "adamw"),
    "scale": ("scale_embedding", "scale_head", "scale_dense", "scale_adamw"),
    "lion": ("lion",) * 4,
    "adamw": ("adamw",) * 4,
}


def _kind(name):
    if "embed_tokens" in name:
        return 0
    if name.startswith("lm_head"):
        return 1
    return 2 if name.endswith("proj.weight") else 3


@pytest.mark.parametrize("recipe", list(EXPECTED))
def test_routing_table_of_hf_llama(recipe):
    model = tiny_llama()
    table = sage_dist.describe(model, recipe)
    names = [n for n, _ in model.named_parameters()]
    assert [r.name for r in table.rows] == names
    for r in table.rows:
        assert r.rule == EXPECTED[recipe][_kind(r.name)], r
    assert table.rows[0].shape == (1001, 32)


def test_recipe_defaults_follow_the_spec():
    model = tiny_llama()
    want_lr = {"sage-hybrid": 2e-3, "sage": 2e-3, "sinkgd-hybrid": 2e-2, "scale": 1e-3,
               "lion": 1e-4, "adamw": 1e-3}
    for recipe, lr in want_lr.items():
        opt = sage_dist.build_optimizer(model, recipe)
        assert {g["lr"] for g in opt.param_groups} == {lr}, recipe
    opt = sage_dist.build_optimizer(model, "sage-hybrid")
    by = {g["name"]: g for g in opt.param_groups}
    assert by["matrix"]["sinkhorn_iters"] == 5 and by["matrix"]["sinkhorn_scale"] == 10.0
    assert by["embedding"]["betas"] == (0.9, 0.99) and by["embedding"]["weight_decay"] == 0.01
    opt = sage_dist.build_optimizer(model, "sinkgd-hybrid")
    by = {g["name"]: g for g in opt.param_groups}
    assert by["embedding"]["betas"] == (0.9, 0.999) and by["embedding"]["weight_decay"] == 0.0
    assert by["matrix"]["linear_lr_scale"] == 0.05
    opt = sage_dist.build_optimizer(model, "scale", lr=2e-4, adam_lr=1e-3)
    by = {g["name"]: g for g in opt.param_groups}
    assert by["vector"]["adam_lr"] == 1e-3 and by["vector"]["peak_lr"] == 2e-4
    assert by["head"]["momentum"] == 0.9


def test_tied_head_is_routed_once_as_embedding():
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for recipe in EXPECTED:
        table = sage_dist.describe(model, recipe)
        hits = [r for r in table.rows if r.shape == (1001, 32)]
        assert len(hits) == 1 and hits[0].category == "embedding"
        opt = sage_dist.build_optimizer(model, recipe)
        params = [p for g in opt.param_groups for p in g["params"]]
        assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))


def test_untied_head_choice_under_sage_hybrid():
    model = tiny_llama()
    rule = lambda **kw: [r.rule for r in sage_dist.describe(model, **kw).rows
                         if r.name == "lm_head.weight"][0]
    assert rule() == "sage"
    assert rule(head="sinkhorn") == "sinkhorn"
    assert rule(head="auto") == "sinkhorn"       # 1001 rows: not a tall vocabulary head
    big = tiny_llama(vocab=60_000, hidden=16, inter=16, layers=1)
    assert [r.rule for r in sage_dist.describe(big, head="auto").rows
            if r.name == "lm_head.weight"] == ["sage"]


def test_non_hf_model_and_frozen_params():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(50, 8)
            self.body = nn.Linear(8, 8)
            self.output = nn.Linear(8, 50, bias=False)
            self.frozen = nn.Linear(8, 8)
            self.frozen.requires_grad_(False)
    table = sage_dist.describe(Net(), "scale")
    assert {r.name: r.rule for r in table.rows} == {
        "tok.weight": "scale_embedding", "body.weight": "scale_dense",
        "body.bias": "scale_adamw", "output.weight": "scale_head"}


def test_overrides_route_by_pattern_with_hyperparameters():
    model = tiny_llama()
    opt = sage_dist.build_optimizer(model, "sage-hybrid", overrides={
        r"layers\.0\..*proj": {"rule": "adamw", "lr": 5e-4}, r"^model\.norm\.weight$": "lion"})
    by = {g["name"]: g for g in opt.param_groups}
    g0 = by[r"override:layers\.0\..*proj"]
    assert g0["rule"] == "adamw" and g0["lr"] == 5e-4 and len(g0["params"]) == 7
    assert by[r"override:^model\.norm\.weight$"]["rule"] == "lion"
    assert by[r"override:^model\.norm\.weight$"]["param_names"] == ["model.norm.weight"]


def test_describe_counts_state_floats_per_spec_section_7():
    model = tiny_llama()
    t = sage_dist.describe(model, "sage-hybrid")
    row = {r.name: r for r in t.rows}
    assert row["model.embed_tokens.weight"].state_floats == 1001 * 32 + 32
    assert row["model.norm.weight"].state_floats == 2 * 32
    assert row["model.layers.0.mlp.up_proj.weight"].state_floats == 0
    n = sum(p.numel() for p in model.parameters())
    assert sage_dist.describe(model, "adamw").total_state_floats == 2 * n
    assert sage_dist.describe(model, "lion").total_state_floats == n
    s = str(t)
    assert "model.embed_tokens.weight" in s and "1001x32" in s and "sinkhorn" in s
    sc = {r.name: r.state_floats for r in sage_dist.describe(model, "scale").rows}
    assert sc["lm_head.weight"] == 1001 * 32 and sc["model.embed_tokens.weight"] == 0
    assert sc["model.norm.weight"] == 64


def test_recipe_names_are_case_and_separator_insensitive():
    model = tiny_llama()
    assert sage_dist.build_optimizer(model, "SAGE_Hybrid").recipe == "sage-hybrid"


BAD = [
    (dict(recipe="sage-hybird"), "recipe='sage-hybird'"),
    (dict(lr=-1.0), "lr=-1.0"),
    (dict(recipe="sage-hybrid.sage-lr10", lr="fast"), "lr='fast'"),
    (dict(betas=(0.9, 1.0)), "betas[1]=1.0"),
    (dict(betas=(-0.1, 0.9)), "betas[0]=-0.1"),
    (dict(eps=0.0), "eps=0.0"),
    (dict(eps=-1e-8), "eps=-1e-08"),
    (dict(sinkhorn_iters=0), "sinkhorn_iters=0"),
    (dict(sinkhorn_iters=2.5), "sinkhorn_iters=2.5"),
    (dict(momentum=0.9), "momentum=0.9 is not a hyperparameter of recipe 'sage-hybrid'"),
    (dict(head="big"), "head='big'"),
    (dict(nonfinite="ignore"), "nonfinite='ignore'"),
    (dict(overrides={"no_such_param": "adamw"}), "'no_such_param' matches no trainable"),
    (dict(overrides={"lm_head": "adam"}), "overrides['lm_head'].rule='adam'"),
    (dict(overrides={"lm_head": {"rule": "adamw", "sinkhorn_iters": 3}}), "sinkhorn_iters"),
    (dict(overrides={"norm": "sinkhorn"}), "needs a >=2-D parameter"),
    (dict(overrides={"(": "adamw"}), "not a valid regex"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_names_field_value_and_allowed(kwargs, message):
    model = tiny_llama()
    kwargs = {"recipe": "sage-hybrid", **kwargs}
    with pytest.raises(ValueError) as e:
        sage_dist.build_optimizer(model, **kwargs)
    assert message in str(e.value)
    assert "allowed" in str(e.value) or "matches no" in str(e.value) or "needs" in str(e.value)


def test_bad_input_in_single_rule_classes():
    p = [nn.Parameter(torch.zeros(3, 4))]
    with pytest.raises(ValueError, match=r"lr=-0.1 is invalid: allowed is a finite number >= 0"):
        sage_dist.optim.SAGE(p, lr=-0.1)
    with pytest.raises(ValueError, match=r"betas\[0\]=1.5"):
        sage_dist.optim.Lion(p, betas=(1.5, 0.9))
    with pytest.raises(ValueError, match=r"sinkhorn_iters=0"):
        sage_dist.optim.Sinkhorn(p, sinkhorn_iters=0)
    with pytest.raises(ValueError, match=r"momentum=1.0"):
        sage_dist.optim.ScaleHead(p, momentum=1.0)
    with pytest.raises(ValueError, match=r"rule='nope' is not a known rule"):
        sage_dist.optim.RoutedOptimizer([{"params": p, "rule": "nope"}])
    with pytest.raises(ValueError, match=r"foo is not a hyperparameter of rule 'sage'"):
        sage_dist.optim.RoutedOptimizer([{"params": p, "rule": "sage", "foo": 1}])
    with pytest.raises(ValueError, match=r"needs a >=2-D parameter"):
        sage_dist.optim.SinkGD([nn.Parameter(torch.zeros(5))])


def test_fsdp1_flat_parameters_are_refused():
    """FSDP1 hands the optimizer flat 1-D views; routing them would normalise every matrix as
    a vector, so build_optimizer refuses before doing anything."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    wrapped = FSDP1.__new__(FSDP1)   # FSDP1 itself needs an accelerator to construct
    nn.Module.__init__(wrapped)
    wrapped.inner = nn.Linear(3, 4)
    with pytest.raises(NotImplementedError, match="FSDP1 .*fully_shard"):
        sage_dist.build_optimizer(nn.Sequential(wrapped), "sage-hybrid")


# -- the variants of sage-hybrid (the ablations of docs/QUALITY.md) ------------------------
def _groups(recipe, **kw):
    return {g["name"]: g for g in sage_dist.build_optimizer(tiny_llama(), recipe, **kw)
            .param_groups}


def test_every_variant_changes_one_thing_of_sage_hybrid():
    from sage_dist.optim.recipes import VARIANTS
    base = _groups("sage-hybrid", lr=1e-3)
    keys = ("rule", "lr", "betas", "weight_decay", "momentum_first", "linear_lr_scale",
            "sinkhorn_scale")
    changed = {}
    for name, rec in VARIANTS.items():
        assert name.startswith("sage-hybrid.") and rec.note
        got = _groups(name, lr=1e-3)
        assert set(got) == set(base)
        changed[name] = {(cat, k): got[cat].get(k) for cat in base for k in keys
                         if got[cat].get(k) != base[cat].get(k)}
    assert changed["sage-hybrid.head-sinkhorn"][("head", "rule")] == "sinkhorn"
    for x in (3.0, 10.0, 0.3):
        c = changed[f"sage-hybrid.sage-lr{x:g}"]
        assert c == {(cat, "lr"): pytest.approx(1e-3 * x) for cat in
                     ("embedding", "head", "vector")}, c
    c = changed["sage-hybrid.dense-sinkgd"]
    assert c[("matrix", "rule")] == "sinkgd" and c[("matrix", "linear_lr_scale")] == 0.05
    c = changed["sage-hybrid.vector-adamw"]
    assert c[("vector", "rule")] == "adamw" and c[("vector", "betas")] == (0.9, 0.999)
    assert c[("vector", "weight_decay")] == 0.0 and {k[0] for k in c} == {"vector"}
    c = changed["sage-hybrid.lion-order"]
    assert c == {("embedding", "momentum_first"): False, ("head", "momentum_first"): False,
                 ("vector", "momentum_first"): False}
    c = changed["sage-hybrid.embed-head-adamw"]
    assert {k[0] for k in c} == {"embedding", "head"}
    assert c[("embedding", "rule")] == c[("head", "rule")] == "adamw"


def test_variants_take_user_hyperparameters_and_are_refused_by_name():
    g = _groups("sage-hybrid.sage-lr10", lr=2e-3, weight_decay=0.1)
    assert g["embedding"]["lr"] == pytest.approx(2e-2) and g["matrix"]["lr"] == 2e-3
    assert {x["weight_decay"] for x in g.values()} == {0.1}
    with pytest.raises(ValueError, match="variant of sage-hybrid: sage-hybrid.head-sinkhorn"):
        sage_dist.build_optimizer(tiny_llama(), "sage-hybrid.nope")
    assert "sage-hybrid" in sage_dist.optim.RECIPES and \
        "sage-hybrid.sage-lr10" not in sage_dist.optim.RECIPES   # the paper's recipes only
