"""Mixed param groups (one rule per parameter) and merge_groups: fewer groups, the same update.

DeepSpeed ZeRO-1/2 keeps, on every rank, the whole gradient of each parameter its partition of
a group touches, so a group of its own for the embedding puts that whole gradient on every
rank. merge_groups joins groups whose shared hyperparameters agree; these tests check that a
merged optimizer steps bit for bit like the per-category one, that the flat state of a mixed
group is packed (stateless members cost nothing) and counted per rule, and the gradient bytes
the estimator gives for it (the DeepSpeed runs are in test_deepspeed.py and test_memory.py).
"""
import copy
import importlib

import pytest
import torch

import sage_dist
from sage_dist.optim.groups import merge_groups
from sage_dist.optim.recipes import VARIANTS, param_groups
from sage_dist.optim.registry import get_rule
from sage_dist.shard import zero
from sage_dist.shard.layout import PendingLayout
from conftest import tiny_llama

RECIPES = ["sage-hybrid", "sage", "sinkgd-hybrid", "scale", "lion", "adamw"]
estimate = importlib.import_module("sage_dist.memory.estimate")


def _layout_of(groups):
    return [(g["name"], g.get("rule") or sorted(set(g["rules"]))) for g in groups]


def test_sage_hybrid_merges_all_matrices_and_keeps_the_vectors_apart():
    groups = merge_groups(param_groups(tiny_llama(), "sage-hybrid"))
    assert _layout_of(groups) == [("embedding+matrix+head", ["sage", "sinkhorn"]),
                                  ("vector", "sage")]
    g = groups[0]
    assert g["param_names"][0] == "model.embed_tokens.weight"
    assert g["param_names"][-1] == "lm_head.weight"
    assert len(g["rules"]) == len(g["params"]) == len(g["param_names"])
    # one dict of hyperparameters: sage's and sinkhorn's keys, equal where both have them
    assert {"betas", "sinkhorn_iters", "lr", "weight_decay"} <= set(g)


def test_groups_with_different_values_stay_apart():
    """sage-lr10 runs the SAGE groups at 10x the lr: the dense matrices cannot join them."""
    groups = merge_groups(param_groups(tiny_llama(), "sage-hybrid.sage-lr10"))
    assert _layout_of(groups) == [("embedding+head", "sage"), ("matrix", "sinkhorn"),
                                  ("vector", "sage")]
    assert groups[0]["lr"] == 10 * groups[1]["lr"]
    one = merge_groups(param_groups(tiny_llama(), "adamw"))
    assert _layout_of(one) == [("embedding+matrix+vector+head", "adamw")]


def _grads(model, step):
    model.zero_grad(set_to_none=True)
    x = torch.randint(0, 1001, (2, 12), generator=torch.Generator().manual_seed(step))
    model(x, labels=x).loss.backward()


@pytest.mark.parametrize("recipe", RECIPES + list(VARIANTS))
def test_merged_optimizer_steps_bit_for_bit_like_the_per_category_one(recipe):
    a, b = tiny_llama(), tiny_llama()
    opt_a = sage_dist.build_optimizer(a, recipe)
    opt_b = sage_dist.build_optimizer(b, recipe, merge=True)
    assert len(opt_b.param_groups) <= len(opt_a.param_groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 0.5 ** s)
    sched_a = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda s: 0.5 ** s)
    for step in range(3):
        for model, opt, sc in ((a, opt_a, sched_a), (b, opt_b, sched)):
            _grads(model, step)
            opt.step()
            sc.step()
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), f"{recipe} step {step}: {n}"
    assert opt_a.state_bytes(by_rule=True) == opt_b.state_bytes(by_rule=True)


def test_merged_state_dict_round_trip_continues_identically():
    model = tiny_llama()
    opt = sage_dist.build_optimizer(model, "sage-hybrid", merge=True)
    _grads(model, 0)
    opt.step()
    twin = copy.deepcopy(model)
    opt2 = sage_dist.build_optimizer(twin, "sage-hybrid", merge=True)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m, o in ((model, opt), (twin, opt2)):
        _grads(m, 1)
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_merge_is_asked_for_and_refused_when_not_a_bool():
    model = tiny_llama()
    for merge, names in ((True, ["embedding+matrix+head", "vector"]),
                         (None, ["embedding", "matrix", "vector", "head"]),
                         (False, ["embedding", "matrix", "vector", "head"])):
        opt = sage_dist.build_optimizer(model, "sage-hybrid", layout=PendingLayout(),
                                        merge=merge)
        assert [g["name"] for g in opt.param_groups] == names
    with pytest.raises(ValueError, match=r"merge='yes' is invalid: allowed are True, False"):
        sage_dist.build_optimizer(model, "sage-hybrid", merge="yes")


def test_merge_pays_where_the_most_loaded_rank_holds_less():
    """merge_pays weighs the two groupings by the estimator's most loaded rank: merged where
    the embedding's and head's whole gradients on every rank cost more than their optimizer
    state gathered on a few ranks, not where the state weighs more (sinkgd-hybrid at 7B on 8
    GPUs in bf16), never under ZeRO-3."""
    from sage_dist.memory import merge_pays

    def most(model, world, recipe, bf16, merge):
        shapes = estimate.model_shapes(model, recipe)
        return max(r["device_total"] for r in estimate.estimate_ranks(
            shapes, world, "deepspeed", 2, recipe, bf16, merge=merge))

    for model, world, recipe, bf16, pays in (("llama_7b", 64, "sage-hybrid", True, True),
                                             ("llama_60m", 2, "sage-hybrid", False, True),
                                             ("llama_7b", 8, "sinkgd-hybrid", True, False)):
        assert merge_pays(model, world, 2, recipe, bf16) is pays
        assert (most(model, world, recipe, bf16, True) <
                most(model, world, recipe, bf16, False)) is pays
        # the estimator's default follows the same choice
        default = estimate.estimate_ranks(estimate.model_shapes(model, recipe), world,
                                          "deepspeed", 2, recipe, bf16)
        assert max(r["device_total"] for r in default) == most(model, world, recipe, bf16, pays)
    assert merge_pays("llama_7b", 64, 3, "sage-hybrid", True) is False
    with pytest.raises(ValueError, match="world=0 is invalid"):
        merge_pays("llama_tiny", 0)


def test_mixed_groups_refused_by_name():
    model = tiny_llama()
    w, v = model.model.layers[0].mlp.up_proj.weight, model.model.norm.weight
    opt = sage_dist.optim.RoutedOptimizer
    cases = [
        (dict(params=[w, v], rules=["sage"]), r"param_groups\[0\]\.rules=\['sage'\] is "
                                              r"invalid: allowed is a list of rule names, one "
                                              r"per parameter \(2\)"),
        (dict(params=[w], rules=["sage"], rule="sage"), r"and no 'rule' key"),
        (dict(params=[w, v], rules=["sage", "nope"]), r"param_groups\[0\]\.rules\[1\]"),
        (dict(params=[w, v], rules=["sinkhorn", "sage"], momentum=0.9),
         r"momentum is not a hyperparameter of rule 'sinkhorn', 'sage'"),
        (dict(params=[w, v], rules=["sage", "sinkhorn"]),
         r"params\[1\] \(param_groups\.params\[1\]|needs a >=2-D parameter"),
    ]
    for group, match in cases:
        with pytest.raises(ValueError, match=match):
            opt([group])


# ----------------------------------------------------------------------- a mixed flat's state
def _mixed_flat_layout():
    """A ZeroLayout over one flat of 20 elements holding, on this rank, part of a SAGE matrix,
    a whole Sinkhorn matrix and the start of another SAGE matrix (no DeepSpeed needed)."""
    flat = torch.zeros(20)
    members = [zero.Member("emb", (4, 3), 7, 12, 0, "sage"),
               zero.Member("w", (2, 5), 0, 10, 5, "sinkhorn"),
               zero.Member("head", (3, 4), 0, 5, 15, "sage")]
    layout = zero.ZeroLayout.__new__(zero.ZeroLayout)
    layout.entries_by_id = {id(flat): zero.FlatEntry(flat, 0, members)}
    layout.world, layout.stage3 = 1, False
    return layout, flat


def test_mixed_flat_packs_elementwise_state_and_counts_it_per_rule():
    layout, flat = _mixed_flat_layout()
    group = {"params": [flat], "rules": ["sage", "sinkhorn", "sage"]}
    rules = [get_rule(r) for r in layout.member_rules(flat, group)]
    assert [r.name for r in rules] == ["sage", "sinkhorn", "sage"]
    st = layout.new_state(flat, rules)
    # m: the SAGE members' held elements only (5 + 5), not the flat's 20
    assert st["m"].shape == (10,) and st["S"].shape == (3 + 4,) and st["step"].shape == (2,)
    views = [layout.member_state(flat, i, st, rules) for i in range(3)]
    assert views[1] == {}                              # Sinkhorn keeps nothing
    views[0]["m"].fill_(1.0)
    views[2]["m"].fill_(2.0)
    views[2]["S"].fill_(3.0)
    views[2]["step"].fill_(4.0)
    assert st["m"].tolist() == [1.0] * 5 + [2.0] * 5
    assert st["S"].tolist() == [0.0] * 3 + [3.0] * 4
    assert st["step"].tolist() == [0.0, 4.0]
    assert layout.state_owners(flat, rules) == {"m": {"sage": 10}, "S": {"sage": 7},
                                                "step": {"sage": 2}}
    full = layout.gather(flat, st["m"], "m", rules)
    assert full[1] is None
    assert full[0].reshape(-1).tolist() == [0.0] * 7 + [1.0] * 5
    assert full[2].reshape(-1).tolist() == [2.0] * 5 + [0.0] * 7
    # a mixed group of one rule's members is the uniform layout: flat-shaped state
    uniform = layout.new_state(flat, get_rule("lion"))
    assert uniform["m"].shape == flat.shape


def test_mixed_flat_without_member_rules_is_refused():
    layout, flat = _mixed_flat_layout()
    for m in layout.entries_by_id[id(flat)].members:
        m.rule = None
    with pytest.raises(RuntimeError, match="routes its parameters to several rules"):
        layout.member_rules(flat, {"params": [flat], "rules": ["sage", "sinkhorn", "sage"]})


# ------------------------------------------------------------- the gradient bytes they save
def _grads_per_rank(model, world, bf16, merge, recipe="sage-hybrid", stage=2):
    shapes = estimate.model_shapes(model, recipe)
    return [r["gradients"] for r in estimate.estimate_ranks(shapes, world, "deepspeed", stage,
                                                            recipe, bf16=bf16, merge=merge)]


def test_merged_groups_hold_what_deepspeeds_own_adamw_holds():
    """Per-rank gradient bytes under ZeRO-1/2: merged sage-hybrid holds, on its most loaded
    rank, what AdamW in one group (DeepSpeed's own AdamW) holds, within 0.01 %, well below
    the per-category groups; at 60M on 2 ranks the even split."""
    for stage in (1, 2):
        for model, world in (("llama_60m", 2), ("llama_60m", 4), ("llama_7b", 64)):
            before = _grads_per_rank(model, world, True, False, stage=stage)
            after = _grads_per_rank(model, world, True, True, stage=stage)
            adamw = _grads_per_rank(model, world, True, True, "adamw", stage=stage)
            assert max(after) <= 1.0001 * max(adamw)
            assert max(after) < max(before) and sum(after) < sum(before)
    shapes = estimate.model_shapes("llama_60m")
    even = -(-shapes.total_params // 2) * 2
    assert max(_grads_per_rank("llama_60m", 2, True, True)) <= 1.0001 * even
    assert max(_grads_per_rank("llama_7b", 64, True, True)) < 0.62 * max(
        _grads_per_rank("llama_7b", 64, True, False))


def test_merge_of_unnamed_user_groups_keeps_parameters_and_rules_aligned():
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5, 3))
    (g,) = merge_groups([dict(params=[a], rule="sage", lr=1e-3),
                         dict(params=[b], rule="sinkhorn", lr=1e-3)])
    assert g["rules"] == ["sage", "sinkhorn"] and "param_names" not in g
    assert [p is q for p, q in zip(g["params"], (a, b))] == [True, True]
    named = merge_groups([dict(params=[a], rule="sage", lr=1e-3, param_names=["a"]),
                          dict(params=[b], rule="sinkhorn", lr=1e-3)])[0]
    assert "param_names" not in named     # half-named: names would not line up
    two = merge_groups([dict(params=[a], rule="sage", lr=1e-3),
                        dict(params=[b], rule="sinkhorn", lr=2e-3)])
    assert [x["rule"] for x in two] == ["sage", "sinkhorn"]


def test_hand_built_mixed_groups_refuse_ambiguous_defaults_and_keep_no_rule_key():
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"param_groups\[0\]\.betas is missing and the group's "
                                         r"rules default to different values"):
        sage_dist.optim.RoutedOptimizer([dict(params=[a, b], rules=["adamw", "lion"])])
    opt = sage_dist.optim.RoutedOptimizer([dict(params=[a, b], rules=["sage", "sinkhorn"])],
                                          {"rule": "sage"})
    assert "rule" not in opt.param_groups[0]           # torch would fill it in from defaults


def test_a_swapped_in_cpu_adam_on_merged_groups_is_refused():
    from sage_dist.deepspeed import _refuse_swapped
    opt = sage_dist.build_optimizer(tiny_llama(), "scale", merge=True)
    assert all("rules" in g for g in opt.param_groups)
    adam = torch.optim.Adam(opt.param_groups)          # what Accelerate builds on our groups
    with pytest.raises(ValueError, match="zero_force_ds_cpu_optimizer"):
        _refuse_swapped(adam)


def test_universal_load_matches_groups_by_whole_names():
    from sage_dist.universal import _saved_group
    saved = [{"name": "embedding", "lr": 1}, {"name": r"override:layers\.\d+\.attn", "lr": 2},
             {"name": r"override:layers\.\d+\.mlp", "lr": 3}, {"name": "matrix", "lr": 4}]
    now = [{"name": "embedding+matrix"}, {"name": r"override:layers\.\d+\.attn"},
           {"name": r"override:layers\.\d+\.mlp"}]
    assert [_saved_group(g, saved, now)["lr"] for g in now] == [1, 2, 3]
    back = [{"name": "embedding"}, {"name": "matrix"}, {"name": "head"}]
    merged = [{"name": "embedding+matrix+head", "lr": 5}]
    assert [_saved_group(g, merged, back)["lr"] for g in back] == [5, 5, 5]
    vector = {"name": "vector"}
    with pytest.raises(ValueError, match="no param group for 'vector'"):
        _saved_group(vector, merged, [vector])


def test_merge_choice_weighs_the_groups_the_hyperparameters_give():
    """With these hyperparameters embed-head-adamw's groups all merge; without them they
    would not: the estimator must weigh the grouping that will be built."""
    model, recipe = tiny_llama(), "sage-hybrid.embed-head-adamw"
    hp = dict(weight_decay=0.0, betas=(0.9, 0.999))
    built = merge_groups(param_groups(model, recipe, **hp))
    shapes = estimate.model_shapes(model, recipe, hyperparameters=hp)
    assert len(shapes.merged) == len(built) == 1
    assert len(estimate.model_shapes(model, recipe).merged) > 1
