"""GPU readiness, checked where no GPU is: what the CUDA path decides on the host.

- the CUDA kernels' launch shapes and index arithmetic (csrc/include/sage_dist/launch.h),
  compiled with g++ into tests/gpu/launch_shapes.cpp: grid limits, block sizes, coverage of
  every element exactly once, 64-bit geometry, the statistics' accumulation order on the
  large shapes (within 1e-6, where the previous order was not);
- the CUDA architectures setup.py builds for (choose_cuda_archs, with made-up inputs, and the
  build log's line);
- the engine reads its finiteness flags from the device once per step (counted with a mock);
- ZeroLayout.gather allocates and all-reduces on the values' device (a mock group);
- the sources: no per-element `/` or `%` left in the CUDA kernels, every in-place CUDA op
  checks aliasing, the multi-tensor apply refuses graph capture;
- tests/gpu/check.sh's argument handling and dry run, its JSON writer (tests/gpu/summary.py)
  and the GPU benchmark (sage_dist.bench_gpu) run on the CPU.

The GPU halves of these checks are in tests/gpu/ (skipped without a GPU).
"""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_DIR = os.path.join(ROOT, "tests", "gpu")
CHECK = os.path.join(GPU_DIR, "check.sh")
sys.path.insert(0, GPU_DIR)
import summary  # noqa: E402  (tests/gpu/summary.py)


# ----------------------------------------------------------------------------- launch shapes
def _parse(out: str) -> dict:
    vals = {}
    for tok in out.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            vals[k] = float(v) if re.fullmatch(r"[-+0-9.e]+", v) and not v.isdigit() else \
                int(v) if v.lstrip("-").isdigit() else v
    return vals


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if not cxx:
        pytest.skip("needs a C++ compiler (g++)")
    exe = str(tmp_path_factory.mktemp("launch") / "launch_shapes")
    build = subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra",
                            "-I", os.path.join(ROOT, "csrc", "include"),
                            os.path.join(GPU_DIR, "launch_shapes.cpp"), "-o", exe],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr

    def run(*args):
        r = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return _parse(r.stdout)
    return run


def test_launch_shapes_selftest(shapes):
    """Hundreds of fragments (every C from 1 to 50000, empty, whole, mid-row, one element),
    geometry beyond memory (C > 2^31, 6.4e9 rows, start > 2^40): limits, coverage, cursor."""
    assert shapes("selftest")["cases"] > 200


@pytest.mark.parametrize("rows", [1, 16, 128])
def test_short_fragments_launch_enough_blocks(shapes, rows):
    """Column sums of a ZeRO-sized fragment (<= 128 rows of 2048): a block per 32 columns
    (61 to 128 blocks here), where the previous kernel launched ceil(2048 / 256) = 8."""
    s = shapes("column", rows * 2048 - 100, 2048, 50)
    assert s["blocks"] >= 60 and s["block_x"] == 32 and s["fits"] == 1
    assert s["block_x"] * s["block_y"] <= 256


def test_column_sum_shapes(shapes):
    s = shapes("column", 0, 2048, 4096)
    assert s["rows"] == 0  # nothing to launch
    s = shapes("column", 1 << 20, (1 << 31) + 11, (1 << 40) + 3)  # C > 2^31, one row
    assert s["cols"] == 1 << 20 and s["fits"] == 1 and s["col_tiles"] == (1 << 20) // 32
    s = shapes("column", 100, 1 << 40, (1 << 40) - 50)  # crosses a row boundary, n < C
    assert s["cols"] == 100 and s["col_begin"] == (1 << 40) - 50 and s["fits"] == 1
    s = shapes("column", 3 << 31, 1, 5)  # one column, 6.4e9 rows
    assert s["bands"] <= 65535 and s["block_x"] == 1 and s["block_y"] == 256
    s = shapes("column", 4096 * 50000, 50000, 0)  # wide: no second pass
    assert s["bands"] == 1


def test_row_sum_shapes(shapes):
    s = shapes("row", 1000, 8, 0, 1056)  # short rows: 256 rows per block, not 1
    assert s["threads_per_row"] == 1 and s["rows_per_block"] == 256 and s["blocks"] == 1
    s = shapes("row", 4096 * 50000, 50000, 0, 1056)  # long rows: a block per row
    assert s["threads_per_row"] == 256 and s["blocks"] == 1056
    s = shapes("row", 3 << 31, 1, 0, 1056)  # more rows than grid.x holds: grid-stride
    assert s["rows"] == 3 << 31 and 1 <= s["blocks"] <= 1056
    s = shapes("row", 0, 5, 7, 1056)
    assert s["rows"] == 0


def test_elementwise_and_chunks(shapes):
    assert shapes("elementwise", 0, 132)["blocks"] == 0
    assert shapes("elementwise", 1, 132)["blocks"] == 1
    assert shapes("elementwise", 1 << 45, 132)["blocks"] == 8 * 132
    assert shapes("chunks", 0)["chunks"] == 0
    assert shapes("chunks", (1 << 31) + 1)["chunks"] == (1 << 31) // 16384 + 1


@pytest.mark.parametrize("C, start", [(1, 0), (3, 2), (50000, (1 << 31) + 17),
                                      ((1 << 31) + 11, (1 << 40) + 3), (1 << 40, 5)])
def test_cursor_replaces_division(shapes, C, start):
    assert shapes("cursor", 10**6, C, start, 256 * 1056)["checked"] > 0
    assert shapes("cursor", 10**6, C, start, 256)["checked"] > 0


def test_alias_sweep(shapes):
    shapes("alias")


@pytest.mark.parametrize("R, C, start, n, kind", [
    (128, 4096, 0, 128 * 4096, "cols"),
    (128, 4096, 0, 128 * 4096, "random"),
    (4096, 50000, 1234567, 128 * 50000 + 777, "rows"),
    (4096, 50000, 1234567, 128 * 50000 + 777, "cols"),
], ids=["128x4096-cols", "128x4096-random", "4096x50000-rows", "4096x50000-cols"])
def test_statistics_order_within_1e6(shapes, R, C, start, n, kind):
    """The kernels' accumulation order (simulated on the host, term by term) on the issue's
    large shapes: within 1e-6 relative of exact sums; on the hard data the previous order (128
    rows per column, or a row's every 256th element, in fp32) was not."""
    e = shapes("precision", R, C, start, n, kind)
    assert max(e["colsum_abs"], e["sq_cols"], e["sq_rows"]) < 3e-7, e
    if kind == "cols":
        assert max(e["old_colsum_abs"], e["old_sq_cols"]) > 1e-6, e
    if kind == "rows":
        assert e["old_sq_rows"] > 1e-6, e


# ----------------------------------------------------------------------------- CUDA sources
def _cuda_sources():
    d = os.path.join(ROOT, "csrc", "cuda")
    return {f: open(os.path.join(d, f)).read() for f in sorted(os.listdir(d)) if f.endswith(".cu")}


def test_no_per_element_division_in_cuda_kernels():
    """Row and column come from launch::Pos cursors (two divisions per thread), not from a
    64-bit `/` and `%` per element."""
    for name, src in _cuda_sources().items():
        code = re.sub(r"//[^\n]*", "", src)
        assert not re.search(r"[%/]\s*(C\b|rec\[4\])", code), name


def test_in_place_cuda_ops_check_aliasing():
    for name, src in _cuda_sources().items():
        for op, fn in re.findall(r'm\.impl\("(\w+)", &(\w+)\)', src):
            if not op.endswith("_"):
                continue  # out-of-place: writes only tensors it allocates
            body = src[src.index(f"void {fn}("):]
            body = body[:body.index("\n}\n")]
            assert "alias.check();" in body, (name, op)
    mt = open(os.path.join(ROOT, "csrc", "include", "sage_dist", "multi_tensor.cuh")).read()
    apply = mt[mt.index("void apply("):]
    assert apply.index("check_not_capturing") < apply.index("pinned_memory")


# ----------------------------------------------------------------------------- arch list
def _setup_functions():
    """choose_cuda_archs and what it needs, taken out of setup.py without running it."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    keep = [n for n in tree.body
            if (isinstance(n, ast.FunctionDef) and n.name == "choose_cuda_archs")
            or (isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "FALLBACK_CUDA_ARCHS"
                                                  for t in n.targets))]
    ns = {"os": os}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), ns)
    return ns


TORCH_214 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
NVCC_13 = ["compute_75", "compute_80", "compute_86", "compute_87", "compute_88", "compute_89",
           "compute_90", "compute_100", "compute_110", "compute_103", "compute_120",
           "compute_121"]


def test_arch_list_follows_torch():
    choose = _setup_functions()["choose_cuda_archs"]
    archs, why = choose({}, TORCH_214, [], NVCC_13)
    assert archs == "7.5;8.0;8.6;9.0;10.0;12.0+PTX"  # sm_75 (T4, RTX 20xx) included
    assert "torch" in why and "visible GPUs: none" in why
    archs, _ = choose({}, ["sm_90a", "compute_90"], [], None)
    assert archs == "9.0+PTX"


def test_arch_list_adds_visible_gpus_torch_does_not_run_on():
    choose = _setup_functions()["choose_cuda_archs"]
    archs, why = choose({}, ["sm_80", "sm_90"], [(8, 6), (12, 0)], NVCC_13)
    assert archs == "8.0;9.0;12.0+PTX"  # 8.6 runs sm_80's cubin; 12.0 would JIT from nothing
    assert "12.0 added" in why


def test_arch_list_drops_what_the_toolkit_cannot_build():
    choose = _setup_functions()["choose_cuda_archs"]
    archs, why = choose({}, ["sm_50", "sm_60", "sm_70", "sm_80", "sm_90"], [], NVCC_13)
    assert archs == "8.0;9.0+PTX" and "dropped 5.0, 6.0, 7.0" in why
    with pytest.raises(ValueError, match="no CUDA architecture left"):
        choose({}, ["sm_60"], [], NVCC_13)


def test_arch_list_visible_mode_and_overrides():
    ns = _setup_functions()
    choose = ns["choose_cuda_archs"]
    assert choose({"SAGE_DIST_CUDA_ARCHS": "visible"}, TORCH_214, [(9, 0), (9, 0)],
                  NVCC_13) == ("9.0+PTX", "the visible GPUs (9.0)")
    with pytest.raises(ValueError, match="no GPU is visible"):
        choose({"SAGE_DIST_CUDA_ARCHS": "visible"}, TORCH_214, [], NVCC_13)
    with pytest.raises(ValueError, match="SAGE_DIST_CUDA_ARCHS='all' is invalid"):
        choose({"SAGE_DIST_CUDA_ARCHS": "all"}, TORCH_214, [], NVCC_13)
    assert choose({"TORCH_CUDA_ARCH_LIST": "8.0;8.6+PTX"}, TORCH_214, [(9, 0)], NVCC_13) == \
        ("8.0;8.6+PTX", "TORCH_CUDA_ARCH_LIST")
    archs, why = choose({}, [], [], None)  # an older torch without a GPU reports nothing
    assert archs == ns["FALLBACK_CUDA_ARCHS"] and "reports no architectures" in why


def _toolkit():
    for d in (os.environ.get("CUDA_HOME"), "/usr/local/cuda-13.0", "/usr/local/cuda"):
        if d and os.path.isfile(os.path.join(d, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(d, "include", "cuda_runtime.h")):
            return d
    return None


@pytest.mark.slow  # runs setup.py, check.sh or the benchmark in a subprocess
@pytest.mark.skipif(not torch.version.cuda or _toolkit() is None,
                    reason="needs a CUDA build of torch and a CUDA toolkit")
def test_build_log_names_the_archs(tmp_path):
    """`setup.py --name` runs the extension set-up without compiling: its log names the archs."""
    env = dict(os.environ, CUDA_HOME=_toolkit(), SAGE_DIST_CPU_ARCH="generic")
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    env.pop("SAGE_DIST_CUDA_ARCHS", None)
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if "CUDA archs:" in x)
    assert line.startswith("[sage_dist setup] CUDA archs: ")
    if not torch.cuda.is_available():
        expected = ";".join(f"{int(a[3:-1])}.{a[-1]}" for a in torch.cuda.get_arch_list()
                            if a.startswith("sm_"))
        assert line.split()[4] == expected + "+PTX"
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT,
                       env=dict(env, TORCH_CUDA_ARCH_LIST="8.0"), capture_output=True,
                       text=True, timeout=300)
    assert "CUDA archs: 8.0 (from TORCH_CUDA_ARCH_LIST)" in r.stdout
    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT,
                           env=dict(env, SAGE_DIST_CUDA_ARCHS="visible"), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode != 0 and "no GPU is visible" in r.stderr


# ----------------------------------------------------------------------------- one sync per step
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


def _count_reads(monkeypatch, opt):
    """Records every read of a tensor's values into Python (what synchronises with a GPU),
    each as (method, whether the tensor is an optimizer step counter, device)."""
    counters = {st["step"].untyped_storage().data_ptr() for st in opt.state.values()
                if torch.is_tensor(st.get("step"))}
    reads = []
    for name in READS:
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, _orig=orig, _name=name, **k):
            try:
                counter = self.untyped_storage().data_ptr() in counters
            except (RuntimeError, NotImplementedError):
                counter = False
            reads.append((_name, counter, self.device.type))
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return reads


@pytest.mark.parametrize("recipe", ["sage-hybrid", "scale", "lion", "sinkgd-hybrid"])
@pytest.mark.parametrize("bad", [False, True])
def test_one_read_of_the_finiteness_flags_per_step(monkeypatch, llama, recipe, bad):
    """One host read of the flags per step, however many fragments (it was one .item() per
    fragment: a device synchronisation per parameter on a GPU); the only other reads are of
    the step counters, which live on the CPU."""
    from sage_dist import build_optimizer

    model = llama()
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    if bad:
        params[2].grad.view(-1)[3] = float("nan")
    opt = build_optimizer(model, recipe)
    opt.step()
    reads = _count_reads(monkeypatch, opt)
    opt.step()
    monkeypatch.undo()
    flags = [r for r in reads if not r[1]]
    assert len(params) > 10 and flags == [("tolist", False, "cpu")], reads
    assert all(dev == "cpu" for _, counter, dev in reads if counter)
    assert opt.nonfinite_count == (2 if bad else 0)


def test_read_flags_keeps_order_and_reads_once_per_device(monkeypatch):
    from sage_dist.optim.optimizer import _read_flags

    flags = [torch.tensor([0.0]), torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([1.0])]
    calls = []
    orig = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: (calls.append(self.shape),
                                                              orig(self))[1])
    assert _read_flags(flags) == [0.0, 2.0, 0.0, 1.0]
    assert calls == [torch.Size([4])]
    assert _read_flags([]) == []


def test_nonfinite_raise_is_unchanged(llama):
    from sage_dist import build_optimizer

    model = llama()
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    params[0].grad[0, 0] = float("inf")
    params[-1].grad.view(-1)[0] = float("nan")
    before = [p.detach().clone() for p in params]
    opt = build_optimizer(model, "sage-hybrid", nonfinite="raise")
    with pytest.raises(FloatingPointError, match="non-finite gradient in .*, .*nothing was "
                                                 "updated"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, params))


# ----------------------------------------------------------------------------- ZeRO gather
def test_zero_gather_follows_the_values_device(monkeypatch):
    """ZeroLayout.gather all-reduces tensors on the values' device (NCCL groups need GPU
    tensors): checked with a mock group, on the CPU and on the meta device."""
    from sage_dist.shard import zero
    from sage_dist.shard.stats import StatsReducer

    flat = torch.zeros(10)
    members = [zero.Member("w", (2, 3), 1, 5, 0), zero.Member("b", (4,), 0, 4, 4)]
    layout = zero.ZeroLayout.__new__(zero.ZeroLayout)  # no DeepSpeed engine needed
    layout.entries_by_id = {id(flat): zero.FlatEntry(flat, 0, members)}
    layout.world, layout.stage3 = 2, False
    layout.reducer = StatsReducer(group=object())
    seen = []

    def all_reduce(t, op=None, group=None, async_op=False):
        seen.append((t.device.type, t.dtype, group))
        t.mul_(2)  # the other rank holds the same pieces
    monkeypatch.setattr(zero.dist, "all_reduce", all_reduce)
    for device in ("cpu", "meta"):
        values = torch.arange(10.0, device=device)
        out = layout.gather(flat, values)
        assert [t.device.type for t in out] == [device, device]
        assert [tuple(t.shape) for t in out] == [(2, 3), (4,)]
        assert seen[-1] == (device, torch.float32, layout.reducer.group)
    out = layout.gather(flat, torch.arange(10.0))
    assert out[0].reshape(-1).tolist() == [0, 0, 2, 4, 6, 0]
    assert out[1].tolist() == [8, 10, 12, 14]


# ----------------------------------------------------------------------------- check.sh
def _check(*args, env=None, timeout=120):
    return subprocess.run(["bash", CHECK, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("args, message", [
    ((), "OUT_DIR is required"),
    (("a", "b"), "one OUT_DIR only"),
    (("out", "--frobnicate"), "unknown option --frobnicate"),
    (("out", "--bench-steps"), "--bench-steps needs a value"),
    (("out", "--bench-steps", "x"), "--bench-steps must be a positive integer"),
    (("out", "--bench-steps", "0"), "--bench-steps must be a positive integer"),
])
def test_check_sh_refuses_bad_arguments(tmp_path, args, message):
    args = tuple(str(tmp_path / a) if a in ("a", "b", "out") else a for a in args)
    r = _check(*args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_check_sh_help():
    r = _check("--help")
    assert r.returncode == 0 and "usage: bash tests/gpu/check.sh OUT_DIR" in r.stdout


def test_check_sh_dry_run_writes_the_summary(tmp_path):
    out = tmp_path / "out"
    r = _check(out, "--dry-run", "--bench-steps", "3", "--model", "llama_60m")
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["dry_run"] is True and data["ok"] is False
    assert [s["name"] for s in data["steps"]] == ["env", "build", "kernels", "gpu-tests",
                                                  "cuda-tests", "bench"]
    log = (out / "check.log").read_text()
    assert "--model llama_60m --steps 3" in log and "--junitxml" in log


@pytest.mark.slow  # runs setup.py, check.sh or the benchmark in a subprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="would run the whole check on a GPU")
def test_check_sh_stops_without_a_gpu(tmp_path):
    r = _check(tmp_path, timeout=180)
    assert r.returncode == 3, r.stdout + r.stderr
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["ok"] is False and [s["name"] for s in data["steps"]] == ["env"]
    assert "no GPU is visible to torch" in data["env"]["problems"]
    assert "cannot run the GPU check" in (tmp_path / "check.log").read_text()


# ----------------------------------------------------------------------------- summary.py
JUNIT_TESTS = textwrap.dedent("""
    import pytest
    def test_ok(): pass
    def test_bad(): assert 1 == 2, "one is not two"
    @pytest.mark.skip(reason="no GPU here")
    def test_skipped(): pass
""")


def _junit(tmp_path, name, body):
    src = tmp_path / f"case_{name}.py"
    src.write_text(body)
    xml = tmp_path / "out" / f"pytest-{name}.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(src),
                    f"--junitxml={xml}"], capture_output=True, text=True, timeout=120,
                   cwd=tmp_path)
    return xml


def _fake_run(out, steps):
    out.mkdir(exist_ok=True)
    (out / "steps.tsv").write_text("".join(f"{n}\t{rc}\t{s}\n" for n, rc, s in steps))
    (out / "env.json").write_text(json.dumps({"torch": "2.11.0", "gpus": [{"name": "H200"}],
                                              "problems": []}))
    (out / "build.log").write_text(
        "nvcc ...\n[sage_dist setup] CUDA archs: 9.0+PTX (from the visible GPUs (9.0))\n"
        "[sage_dist setup] building sage_dist._C WITH CUDA kernels: 3 .cu file(s)\n")


def test_summary_of_a_failed_run(tmp_path):
    out = tmp_path / "out"
    _fake_run(out, [("env", 0, 1.5), ("build", 0, 80.25), ("gpu-tests", 1, 30), ("bench", 124,
                                                                                  180)])
    _junit(tmp_path, "gpu", JUNIT_TESTS)
    assert summary.main(["summarize", str(out)]) == 0
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["ok"] is False and data["seconds"] == 291.8
    assert [s["status"] for s in data["steps"]] == ["ok", "ok", "failed", "timed out"]
    t = data["tests"]
    assert (t["tests"], t["passed"], t["failed"], t["skipped"], t["errors"]) == (3, 1, 1, 1, 0)
    assert t["failures"][0]["test"].endswith("test_bad") and "one is not two" in \
        t["failures"][0]["message"]
    assert t["skips"][0]["reason"].endswith("no GPU here")
    assert data["build"]["archs"] == "9.0+PTX" and data["build"]["cuda_sources"] is True
    assert data["bench"] is None and data["env"]["gpus"][0]["name"] == "H200"


@pytest.mark.slow  # runs setup.py, check.sh or the benchmark in a subprocess
def test_summary_of_a_good_run_with_the_cpu_benchmark(tmp_path):
    """The benchmark module run for real (on the CPU, a tiny config), then summarized."""
    out = tmp_path / "out"
    _fake_run(out, [("env", 0, 1), ("build", 0, 80), ("kernels", 0, 2), ("gpu-tests", 0, 30),
                    ("cuda-tests", 0, 20), ("bench", 0, 60)])
    _junit(tmp_path, "gpu", "def test_ok(): pass\n")
    r = subprocess.run([sys.executable, "-m", "sage_dist.bench_gpu", "--device", "cpu",
                        "--model", "llama_tiny", "--steps", "1", "--warmup", "0", "--copy-mb",
                        "4", "--json", str(out / "bench_gpu.json")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    assert "torch AdamW fused" in r.stdout and "device-to-device copy" in r.stdout
    raw = json.loads((out / "bench_gpu.json").read_text())
    assert set(raw["recipes"]) == {"sage-hybrid", "scale", "lion", "torch AdamW fused"}
    assert raw["layers"] == raw["layers_in_config"] == 4 and raw["copy_gbps"] > 0
    for rec in raw["recipes"].values():
        assert rec["seconds"] > 0 and rec["bytes"] > rec["bytes_once"] * 0.5
        assert rec["params_finite"] is True and rec["syncs_per_step"] is None
    assert raw["recipes"]["torch AdamW fused"]["time_vs_adamw_fused"] == 1.0
    summary.main(["summarize", str(out)])
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["ok"] is True, data
    assert data["bench"]["recipes"]["lion"]["gbps"] == raw["recipes"]["lion"]["gbps"]
    assert data["bench"]["model"] == "llama_tiny"


def test_summary_reports_unreadable_pieces(tmp_path):
    out = tmp_path / "out"
    _fake_run(out, [("env", 0, 1)])
    (out / "pytest-x.xml").write_text("<testsuite><testcase")
    (out / "bench_gpu.json").write_text("{")
    data = summary.summarize(str(out))
    assert data["ok"] is False and data["tests"]["errors"] == 1
    assert "unreadable" in data["bench"]["error"]
    assert summary.main(["summarize", str(out / "missing")]) == 2
    assert summary.main(["frobnicate"]) == 2


def test_env_probe_on_this_machine(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(GPU_DIR, "summary.py"), "env",
                        str(tmp_path / "env.json")], capture_output=True, text=True,
                       timeout=120)
    data = json.loads((tmp_path / "env.json").read_text())
    assert data["torch"] == torch.__version__
    assert r.returncode == (0 if not data["problems"] else 3)
    if not torch.cuda.is_available():
        assert "no GPU is visible to torch" in data["problems"]


# ----------------------------------------------------------------------------- bench_gpu
def test_bench_gpu_arguments_and_memory_fit():
    from sage_dist import bench_gpu
    from sage_dist.models import load_llama_config

    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--recipes", "sage-hybrid,adam"])
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--steps", "0"])
    args = bench_gpu.parse_args([])
    assert args.model == "llama_1b" and args.recipes == ("sage-hybrid", "scale", "lion")
    cfg = load_llama_config("llama_1b")
    fixed, per_layer = bench_gpu.layer_numel(cfg)
    assert 40e6 < per_layer < 60e6 and fixed > 2 * 32000 * 2048
    assert bench_gpu.fit_layers(cfg, None) == 24
    assert bench_gpu.fit_layers(cfg, 140 << 30) == 24
    few = bench_gpu.fit_layers(cfg, 8 << 30)
    assert 1 <= few < 24 and (fixed + few * per_layer) * 16 <= (8 << 30) - (2 << 30)
    with pytest.raises(SystemExit, match="cannot hold even one decoder layer"):
        bench_gpu.fit_layers(cfg, 3 << 30)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="torch sees no GPU"):
            bench_gpu.main(["--device", "cuda", "--json", ""])


def test_summary_counts_steps_skipped_on_request_as_ok(tmp_path):
    out = tmp_path / "out"
    _fake_run(out, [("env", 0, 1), ("build", "skipped", 0), ("kernels", 0, 2),
                    ("gpu-tests", "skipped", 0), ("cuda-tests", "skipped", 0),
                    ("bench", "skipped", 0)])
    assert summary.summarize(str(out))["ok"] is True
    _fake_run(out, [("env", 0, 1), ("kernels", 0, 2), ("gpu-tests", "skipped", 0),
                    ("cuda-tests", "skipped", 0), ("bench", 0, 50)])  # bench ran, wrote nothing
    assert summary.summarize(str(out))["ok"] is False
