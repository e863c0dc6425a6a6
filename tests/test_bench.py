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


@pytest.mark.parametrize("argv,message", [
    (["--engine", "zero4"], "--engine 'zero4' is invalid: allowed are fsdp2, zero1, zero2, zero3"),
    (["--world", "0"], "--world 0 is invalid: allowed is >= 1"),
    (["--warmup", "-1"], "--warmup -1 is invalid"),
])
def test_bench_sharded_refuses_bad_arguments_before_starting(argv, message):
    with pytest.raises(SystemExit) as e:
        bench.main(["sharded", "--model", "llama_tiny", *argv])
    assert message in str(e.value)


@pytest.mark.slow
def test_bench_sharded_runs_fsdp2_and_zero2_and_writes_json(tmp_path, capsys):
    out = tmp_path / "sharded.json"
    res = bench.main(["sharded", "--model", "llama_tiny", "--engine", "fsdp2", "zero2",
                      "--steps", "1", "--warmup", "0", "--seq", "16", "--per-category",
                      "--json", str(out)])
    data = json.loads(out.read_text())
    assert json.loads(json.dumps(res)) == data
    assert set(data["engines"]) == {"fsdp2", "zero2"}
    fsdp, zero = data["engines"]["fsdp2"], data["engines"]["zero2"]
    assert set(fsdp["results"]) == {"sage-hybrid", "torch AdamW foreach", "torch AdamW fused"}
    assert set(zero["results"]) == {"sage-hybrid", "sage-hybrid per-category groups",
                                    "DeepSpeed AdamW (FusedAdam)"}
    assert fsdp["baseline"] == "torch AdamW fused"
    assert zero["baseline"] == "DeepSpeed AdamW (FusedAdam)"
    # Gradient bytes per rank, measured: what the estimator gives for each grouping, and the
    # merged groups (the default) hold less than one group per category.
    from sage_dist.memory import estimate_ranks
    for name, merge in (("sage-hybrid", None), ("sage-hybrid per-category groups", False)):
        est = [r["gradients"] for r in estimate_ranks("llama_tiny", 2, "deepspeed", 2,
                                                      "sage-hybrid", merge=merge)]
        got = zero["results"][name]["gradient_bytes_per_rank"]
        assert all(abs(g - e) <= 0.01 * e for g, e in zip(got, est)), (name, got, est)
    merged = zero["results"]["sage-hybrid"]["gradient_bytes_per_rank"]
    assert max(merged) < max(zero["results"]["sage-hybrid per-category groups"]
                             ["gradient_bytes_per_rank"])
    assert max(merged) <= 1.01 * data["even_split_gradient_bytes"]
    for e in (fsdp, zero):
        base = e["results"][e["baseline"]]
        ours = e["results"]["sage-hybrid"]
        assert e["step_ratio"] == pytest.approx(ours["step_seconds"] / base["step_seconds"])
        for r in e["results"].values():
            assert 0 < r["step_seconds"] < r["train_step_seconds"]
            assert r["tokens_per_second"] == pytest.approx(2 * 2 * 16 / r["train_step_seconds"])
    assert "tokens/s vs AdamW" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--recipes", "adam"], "'adam' is not a recipe"),
    (["--lrs", "fast"], "--lrs / --grid / --seeds"),
    (["--lrs", "-1"], "positive"),
    (["--steps", "0"], "--steps=0"),
    (["--set", "seq_len"], "KEY=VALUE"),
    (["--recipes", "adamw", "--grid", "muon=1e-3"], "'muon' is not in --recipes"),
    (["--recipes", "muon", "--grid", "muon=x"], "--lrs / --grid / --seeds"),
    (["--recipes", "muon", "--grid", "muon=0"], "positive"),
    (["--recipes", "muon", "--top", "3"], "--top 3: no finished run of muon"),
    (["--top", "-1"], "--top=-1"),
])
def test_bench_quality_refuses_bad_arguments_before_any_run(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["quality", "--out", str(tmp_path / "q"), *argv])
    assert message in str(e.value)
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_bench_quality_unit_sweep_writes_everything_and_resumes(tmp_path, capsys, monkeypatch):
    """2 recipes x 2 lrs x 20 steps of the tiny Llama through the trainer; a second call keeps
    every finished run and reproduces the table."""
    monkeypatch.setenv("SAGE_DIST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "q"
    argv = ["quality", "--recipes", "sage-hybrid,adamw", "--lrs", "1e-3,3e-3", "--steps", "20",
            "--out", str(out), "--jobs", "1", "--threads", "1",
            "--set", "seq_len=32", "eval_every=10", "eval_batches=1"]
    res = bench.main(argv)
    runs = json.loads((out / "runs.json").read_text())
    assert len(runs) == 4 and not any(r["failed"] for r in runs)
    assert {r["recipe"] for r in runs} == {"sage-hybrid", "adamw"}
    for r in runs:
        assert r["val_ppl"] > 1 and r["state_bytes"] > 0 and len(r["loss_curve"]) == 20
    # SAGE's state is smaller than AdamW's two moments
    state = {r["recipe"]: r["state_bytes"] for r in runs}
    assert state["sage-hybrid"] < state["adamw"] / 2
    table = (out / "quality.md").read_text()
    assert "| sage-hybrid |" in table and "| adamw |" in table
    for png in ("ppl_vs_lr.png", "loss_curves.png", "ppl_vs_state.png"):
        assert (out / png).stat().st_size > 1000
    assert len((out / "runs.csv").read_text().splitlines()) == 5
    capsys.readouterr()
    again = bench.main(argv)
    assert capsys.readouterr().out.count("kept from an earlier sweep") == 4
    assert (out / "quality.md").read_text() == table and again["best"] == res["best"]
    # a second seed for the best recipe at its best lr, added to the same directory's tables
    capsys.readouterr()
    top = bench.main([*argv[:1], "--recipes", "sage-hybrid,adamw", "--top", "1", "--seeds",
                      "0,1", *argv[5:]])
    assert capsys.readouterr().out.count("done in") == 1
    best_rec = min(res["best"], key=lambda rec: next(
        r["val_ppl"] for r in runs if r["recipe"] == rec and r["lr"] == res["best"][rec]))
    seeds = [r for r in top["runs"] if r["recipe"] == best_rec and
             r["lr"] == res["best"][best_rec]]
    assert sorted(r["seed"] for r in seeds) == [0, 1] and len(top["runs"]) == 5


def test_bench_quality_tables_from_run_summaries(tmp_path):
    """The table over runs (no training): best lr by the mean over seeds, the lrs tried, and
    the share of the sage-hybrid -> sinkgd-hybrid gap each recipe closes; names parse back."""
    from types import SimpleNamespace

    from sage_dist import bench_quality as Q

    def run(recipe, lr, seed, ppl):
        return dict(run=Q.run_name(recipe, lr, seed), recipe=recipe, lr=lr, seed=seed,
                    failed=False, val_ppl=ppl, state_bytes=2**20, tokens_per_s=100.0)
    runs = [run("sage-hybrid", 1e-3, 0, 90.0), run("sage-hybrid", 1e-3, 1, 94.0),
            run("sage-hybrid", 3e-3, 0, 91.0),          # one lucky seed does not win
            run("sinkgd-hybrid", 1e-2, 0, 72.0),
            run("sage-hybrid.sage-lr10", 1e-3, 0, 77.0), run("muon", 3e-3, 0, 100.0)]
    best = Q.best_per_recipe(runs)
    assert best["sage-hybrid"][0] == 3e-3 and best["muon"][0] == 3e-3
    runs[2]["val_ppl"] = 93.0
    assert Q.best_per_recipe(runs)["sage-hybrid"][0] == 1e-3          # mean 92 < 93
    args = SimpleNamespace(config="tiny_single", steps=10, out=str(tmp_path))
    text = Q.write_table(runs, tmp_path / "q.md", args)
    best_table, grid_table = text.split("\n\n")[1:3]
    rows = {line.split("|")[1].strip(): line for line in best_table.splitlines()
            if line.startswith("| ") and "recipe" not in line}
    assert rows["sage-hybrid"].rstrip().endswith("| 0 % |")
    assert rows["sinkgd-hybrid"].rstrip().endswith("| 100 % |")
    assert rows["sage-hybrid.sage-lr10"].rstrip().endswith("| 75 % |")   # (92-77)/(92-72)
    assert rows["muon"].rstrip().endswith("| -40 % |")
    assert "| 0.001, 0.003 |" in rows["sage-hybrid"] and "| 90.00, 94.00 |" in rows["sage-hybrid"]
    grid = grid_table.splitlines()
    assert grid[0] == "| recipe | lr 0.001 | lr 0.003 | lr 0.01 |"
    assert "| sage-hybrid | **92.0** | 93.0 |  |" in grid
    assert "| muon |  | **100.0** |  |" in grid
    for r in runs:
        assert Q.parse_run_name(r["run"]) == (r["recipe"], r["lr"], r["seed"])
    assert Q.parse_run_name("notes") is None and Q.parse_run_name("a_lrx_s0") is None


def test_the_documented_sweep_names_only_known_recipes():
    """launch/quality_sweep.sh runs for two hours: a misspelt recipe in it should fail here,
    not after an hour."""
    import re
    from pathlib import Path
    from sage_dist.bench_quality import CHOICES

    text = (Path(__file__).parents[1] / "launch" / "quality_sweep.sh").read_text()
    lists = re.findall(r'^[A-Z_]+="([^"$]+)"$', text, flags=re.M)
    names = {n for lst in lists if not lst.startswith("--") and " " not in lst
             for n in lst.split(",")}
    names |= set(re.findall(r"([a-z][a-z0-9.-]*)=[0-9.e,-]+", text))
    assert {"sage-hybrid", "muon", "sage-hybrid.sage-lr10"} <= names
    assert not names - set(CHOICES), names - set(CHOICES)
