"""Tensor parallelism (and FSDP2 / HSDP over it): sharded steps equal the one-process oracle,
per step, on TP, FSDP x TP and HSDP x TP meshes, with dims no TP degree divides."""
import pytest

from dist_harness import run
import tp_cases as cases

RECIPES = ["sage-hybrid", "sage", "sinkgd-hybrid", "scale", "lion"]
STEPS = 8


@pytest.fixture(scope="module")
def tp_results():
    out = {}
    for name, shape in cases.MESHES.items():
        world = 1
        for s in shape:
            world *= s
        out[name] = run(cases.exactness, world, shape, RECIPES, STEPS)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mesh", list(cases.MESHES))
@pytest.mark.parametrize("recipe", RECIPES)
def test_tp_step_equals_oracle_every_step(tp_results, mesh, recipe):
    res = tp_results[mesh][0][recipe]
    print(f"{mesh} {recipe}: max rel {res['rel']:.2e}, sign flips {res['flips']} of "
          f"{res['numel']}, comm {res['comm']}")
    assert res["rel"] <= 1e-6
    assert res["flips"] <= 1e-5 * res["numel"]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", list(cases.MESHES))
@pytest.mark.parametrize("recipe", RECIPES)
def test_tp_communicated_floats_equal_the_count_from_shapes(tp_results, mesh, recipe):
    for rank_res in tp_results[mesh]:
        assert rank_res[recipe]["comm_ok"], rank_res[recipe]
        assert rank_res[recipe]["expected"] > 0


@pytest.mark.slow
def test_meshes_produce_the_placements_the_layout_must_handle(tp_results):
    seen = " ".join(p for mesh in tp_results.values() for p in mesh[0]["sage-hybrid"]["placements"])
    for placement in ("Shard(dim=1)", "_StridedShard(dim=0", "('dp',)(Shard(dim=0),)",
                      "Replicate()"):
        assert placement in seen, seen


@pytest.mark.slow
@pytest.mark.parametrize("case,exc,message", [
    ("shard2", "NotImplementedError", "sharding on dim 2 is not supported"),
    ("strided_alone", "NotImplementedError", "_StridedShard"),
    ("two_roots", "ValueError", "different device meshes"),
])
def test_unsupported_placements_fail_at_construction(case, exc, message):
    res = run(cases.bad_placements, 2, case, expect_error=True)
    for r in res:
        assert r.get("type") == exc, r
        assert message in r["message"], r["message"]
        if exc == "NotImplementedError":
            assert "parameter" in r["message"] and "placements" in r["message"]
