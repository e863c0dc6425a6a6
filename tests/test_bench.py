"""The step benchmark runs end to end on the tiny model and its byte counts follow the rules'
passes (the figures themselves are machine-dependent and checked by no test)."""
import json

import pytest

from sage_dist import bench


def test_bench_step_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    res = bench.main(["step", "--model", "configs/models/llama_tiny.json", "--steps", "1",
                      "--warmup", "0", "--json", str(out)])
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
    assert "of bw" in capsys.readouterr().out


@pytest.mark.parametrize("rule, words, once", [
    ("sage", 6, 5), ("sinkhorn", 13, 3), ("sinkgd", 13, 3), ("scale_dense", 4, 3),
    ("scale_head", 7, 5), ("lion", 5, 5), ("adamw", 7, 7)])
def test_rule_bytes(rule, words, once):
    group = {"sinkhorn_iters": 5}
    assert bench.rule_bytes(rule, group, 10) == words * 4 * 10
    assert bench.rule_bytes(rule, group, 10, once=True) == once * 4 * 10
