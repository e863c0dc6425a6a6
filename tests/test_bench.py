"""The step benchmark runs end to end on the tiny model and its byte counts follow the rules'
passes (the figures themselves are machine-dependent and checked by no test)."""
import json

import pytest

from sage_dist import bench


def test_bench_step_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    res = bench.main(["step", "--model", "configs/models/llama_tiny.json", "--steps", "1",
                      "--warmup", "0", "--json", str(out), "--profile"])
    data = json.loads(out.read_text())
    assert json.loads(json.dumps(res)) == data       # what it returns is what it wrote
    assert data["bandwidth_reference_gbps"] == max(data["bandwidth_gbps"],
                                                   data["bandwidth_after_gbps"])
    rows = data["recipes"]
    assert set(rows) == {"sage-hybrid fused", "sage-hybrid reference", "scale fused",
                         "lion fused", "torch AdamW foreach", "torch AdamW fused"}
    for r in rows.values():
        assert r["seconds"] > 0 and r["bytes"] >= r["bytes_once"] > 0
        assert r["bandwidth_fraction"] == pytest.approx(
            r["bytes"] / r["seconds"] / (data["bandwidth_reference_gbps"] * 1e9))
    assert rows["torch AdamW foreach"]["time_vs_adamw_foreach"] == 1.0
    assert rows["torch AdamW fused"]["time_vs_adamw_fused"] == 1.0
    for r in rows.values():
        assert r["time_vs_adamw_fused"] == pytest.approx(
            r["seconds"] / rows["torch AdamW fused"]["seconds"])
    assert data["sage_hybrid_fused_vs_adamw_fused"] == \
        rows["sage-hybrid fused"]["time_vs_adamw_fused"]
    assert data["cpu_isa"] in (None, "avx512", "avx2", "generic")
    # the fused sage-hybrid step checks its matrices' gradients in its rules' first passes:
    # the engine's separate check is left for the 1-D parameters
    sep = data["separate_check"]
    assert 0 <= sep["elements"] < data["parameters"] // 100 and sep["seconds"] >= 0
    ops_seen = {row["op"] for row in data["profile"]}
    assert "sage_dist::sinkhorn_update_multi_" in ops_seen or not data["extension"]
    printed = capsys.readouterr().out
    assert "of bw" in printed and "vs AdamW fused" in printed


@pytest.mark.parametrize("rule, words, once", [
    ("sage", 6, 5), ("sinkhorn", 8, 3), ("sinkgd", 8, 3), ("scale_dense", 4, 3),
    ("scale_head", 7, 5), ("lion", 5, 5), ("adamw", 7, 7)])
def test_rule_bytes(rule, words, once):
    group = {"sinkhorn_iters": 5}
    assert bench.rule_bytes(rule, group, 10) == words * 4 * 10
    assert bench.rule_bytes(rule, group, 10, once=True) == once * 4 * 10
    if rule in ("sinkhorn", "sinkgd"):  # two statistics passes per iteration (no one-sweep kernel)
        assert bench.rule_bytes(rule, group, 10, one_sweep=False) == (2 * 5 + 3) * 4 * 10
