"""FSDP2 / HSDP: sharded steps equal the single-process oracle, per step, for any world size."""
import pytest

from dist_harness import run
import fsdp_cases as cases

RECIPES = ["sage-hybrid", "sage", "sinkgd-hybrid", "scale", "lion"]
MESHES = {"fsdp2": (2,), "fsdp3": (3,), "fsdp4": (4,), "hsdp2x2": (2, 2)}


@pytest.fixture(scope="module")
def exactness_results():
    out = {}
    for name, shape in MESHES.items():
        world = 1
        for s in shape:
            world *= s
        out[name] = run(cases.exactness, world, shape, RECIPES, 10)
    return out


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("recipe", RECIPES)
def test_sharded_step_equals_oracle_every_step(exactness_results, mesh, recipe):
    res = exactness_results[mesh][0][recipe]
    print(f"{mesh} {recipe}: max rel {res['rel']:.2e}, sign flips {res['flips']} of "
          f"{res['numel']}, comm {res['comm']}")
    assert res["rel"] <= 1e-6
    assert res["flips"] <= 1e-5 * res["numel"]


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("recipe", RECIPES)
def test_communicated_floats_equal_the_count_from_shapes(exactness_results, mesh, recipe):
    for rank_res in exactness_results[mesh]:
        assert rank_res[recipe]["comm_ok"], rank_res[recipe]


def test_trajectory_fsdp3_matches_single_process():
    worst = run(cases.trajectory, 3, (3,), "sage-hybrid", 10)[0]
    print(f"10-step trajectory, FSDP2 world 3 vs one process: max rel diff {worst:.2e}")
    assert worst < 1e-3


def test_replicated_state_identical_and_elementwise_state_is_dtensor():
    res = run(cases.replicated_state_identical, 3, (3,))
    for same, kind, shape, local in res:
        assert same and kind == "DTensor" and shape == (1001, 32)
    assert [r[3][0] for r in res] == [334, 334, 333]


@pytest.mark.parametrize("case,exc,message", [
    ("shard1", "NotImplementedError", "sharding on dim 1 is not supported"),
    ("tp", "NotImplementedError", "tensor-parallel"),
    ("two_meshes", "ValueError", "different device meshes"),
])
def test_bad_placements_fail_before_any_collective(case, exc, message):
    res = run(cases.bad_placements, 2, case, expect_error=True)
    for r in res:
        assert r.get("type") == exc, r
        assert message in r["message"] and "parameter" in r["message"] or "meshes" in r["message"]
