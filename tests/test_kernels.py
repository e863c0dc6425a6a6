"""The fragment ops (colsum_abs, sq_sums, sage_update_, scaled_update_) against their
pure-PyTorch references, on fragments that start and end mid-row; torch.library.opcheck.

fp32: within 1e-6 relative. bf16 storage: within one bf16 ulp, except sign ties of SAGE's
direction, which are counted and must stay below 1e-4 of the elements.
"""

import pytest
import torch

from sage_dist import ops

needs_ext = pytest.mark.skipif(not ops.HAS_EXTENSION,
                               reason=f"sage_dist._C not built ({ops.EXTENSION_ERROR})")
needs_cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.has_kernel("sage_update_", "cuda")),
    reason="needs a CUDA GPU and sage_dist._C built with its CUDA kernels")

R, C = 29, 67
# (start, end) of the flat index: whole, mid-row to mid-row, inside one row, whole rows,
# starting on a row boundary and ending mid-row, empty.
FRAGMENTS = [(0, R * C), (45, R * C - 13), (70, 120), (2 * C, 9 * C), (3 * C, 5 * C + 7),
             (400, 400)]
DTYPES = [torch.float32, torch.bfloat16]
SAGE_HP = dict(lr=3e-2, beta1=0.9, beta2=0.99, weight_decay=0.1)


def inputs(start, end, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = end - start
    t = dict(param=torch.randn(n, generator=gen).to(dtype),
             grad=torch.randn(n, generator=gen).to(dtype),
             m=0.1 * torch.randn(n, generator=gen),
             r=torch.rand(R, generator=gen) + 0.5,
             c=torch.rand(C, generator=gen) + 0.5,
             h=torch.rand(C, generator=gen))
    return {k: v.to(device) for k, v in t.items()}


def ulp_bad(actual, expected):
    """Mask of elements further apart than the tolerance of expected's dtype."""
    a, e = actual.cpu().float(), expected.cpu().float()
    if expected.dtype == torch.float32:
        return (a - e).abs() > 1e-6 * e.abs() + 1e-9
    _, exponent = torch.frexp(torch.maximum(a.abs(), e.abs()))
    return (a - e).abs() > torch.ldexp(torch.ones_like(e), exponent - 8)


def assert_close(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    bad = ulp_bad(actual, expected)
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} elements out of tolerance"


def test_kernels_registered():
    if not ops.HAS_EXTENSION:
        pytest.skip("sage_dist._C not built")
    for op in ops.OPS:
        assert ops.has_kernel(op, "cpu"), op


# ----------------------------------------------------------------------------- statistics
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frag", FRAGMENTS)
def test_colsum_abs(frag, dtype):
    t = inputs(*frag, dtype)
    got = torch.ops.sage_dist.colsum_abs(t["grad"], C, frag[0])
    torch.testing.assert_close(got, ops.reference.colsum_abs(t["grad"], C, frag[0]),
                               rtol=1e-6, atol=1e-7)


@needs_ext
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("scales", ["rc", "r", "c", ""])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frag", FRAGMENTS)
def test_sq_sums(frag, dtype, scales, dim):
    t = inputs(*frag, dtype)
    r = t["r"] if "r" in scales else None
    c = t["c"] if "c" in scales else None
    args = (t["grad"], r, c, R, C, frag[0], dim)
    torch.testing.assert_close(torch.ops.sage_dist.sq_sums(*args), ops.reference.sq_sums(*args),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frag", FRAGMENTS)
def test_sq_sums_of_momentum(frag, dtype, dim):
    """SCALE's head: the statistics of beta m + (1 - beta) g, with m left untouched."""
    t = inputs(*frag, dtype)
    m = t["m"].clone()
    args = (t["grad"], t["r"], None, R, C, frag[0], dim, m, 0.7)
    torch.testing.assert_close(torch.ops.sage_dist.sq_sums(*args), ops.reference.sq_sums(*args),
                               rtol=1e-6, atol=1e-7)
    assert torch.equal(m, t["m"])
    if dtype == torch.float32:  # the reference is the rule's own formula, summed plainly
        x = t["m"] * 0.7 + t["grad"] * (1 - 0.7)
        torch.testing.assert_close(ops.reference.sq_sums(*args),
                                   ops.reference.sq_sums(x, t["r"], None, R, C, frag[0], dim))


@needs_ext
def test_sinkhorn_rescale():
    gen = torch.Generator().manual_seed(3)
    scale = torch.rand(500, generator=gen) + 0.5
    s = torch.rand(500, generator=gen) * 30
    s[::7] = 0.0  # an all-zero line keeps its scale
    got = torch.ops.sage_dist.sinkhorn_rescale(scale, s, 2.5, 1e-8)
    ref = ops.reference.sinkhorn_rescale(scale, s, 2.5, 1e-8)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)  # torch's sqrt: within an ulp
    assert torch.equal(got[::7], scale[::7])
    assert torch.equal(scale, ops.reference.sinkhorn_rescale(scale, torch.zeros(500), 2.5, 1e-8))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(R, C), (1, 40), (300, 1)])
def test_sinkhorn_scales_whole_matrix(shape, dtype):
    """All iterations in one call: bit for bit the phase-by-phase path of the same ops, and
    within 1e-6 of the pure-PyTorch reference."""
    rows, cols = shape
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(rows * cols, generator=gen).to(dtype)
    if rows > 2:
        g[cols:2 * cols] = 0  # a zero row
    got = torch.ops.sage_dist.sinkhorn_scales(g, rows, cols, 5, 1e-8, 1.5, 0.5)
    r, c = torch.ones(rows), torch.ones(cols)
    for _ in range(5):
        r = ops.sinkhorn_rescale(r, ops.sq_sums(g, None, c, rows, cols, 0, 1), 1.5, 1e-8)
        c = ops.sinkhorn_rescale(c, ops.sq_sums(g, r, None, rows, cols, 0, 0), 0.5, 1e-8)
    assert torch.equal(got[0], r) and torch.equal(got[1], c)
    ref = ops.reference.sinkhorn_scales(g, rows, cols, 5, 1e-8, 1.5, 0.5)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [(0, R), (3, 20), (7, 8), (5, 5), (0, 1)])
def test_sinkhorn_sweep_on_whole_rows(rows, dtype):
    """One sweep per iteration over a fragment of whole rows [r0, r1): bit for bit the two
    passes (sq_sums by rows, rescale, sq_sums by columns) of the phase-by-phase path, within
    1e-6 of the reference, and the flag of exactly the non-finite gradients."""
    r0, r1 = rows
    gen = torch.Generator().manual_seed(9)
    g = torch.randn((r1 - r0) * C, generator=gen).to(dtype)
    if r1 - r0 > 2:
        g[C:2 * C] = 0  # a zero row keeps its scale
    r_fast, r_ref, r_two = (torch.ones(R) for _ in range(3))
    c = c_ref = c_two = torch.ones(C)
    for it in range(4):
        cols, bad = ops.sinkhorn_sweep_(g, r_fast[r0:r1], None if it == 0 else c, C, 1.5, 1e-8,
                                        it == 0)
        c = ops.sinkhorn_rescale(c, cols, 0.5, 1e-8)
        cols_ref, _ = ops.reference.sinkhorn_sweep_(g, r_ref[r0:r1], c_ref, C, 1.5, 1e-8, False)
        c_ref = ops.reference.sinkhorn_rescale(c_ref, cols_ref, 0.5, 1e-8)
        rs = ops.sq_sums(g, None, c_two, R, C, r0 * C, 1)
        r_two = ops.sinkhorn_rescale(r_two, rs, 1.5, 1e-8)
        c_two = ops.sinkhorn_rescale(c_two, ops.sq_sums(g, r_two, None, R, C, r0 * C, 0), 0.5,
                                     1e-8)
        assert bad.item() == 0.0
    assert torch.equal(r_fast, r_two) and torch.equal(c, c_two)
    torch.testing.assert_close(r_fast, r_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(c, c_ref, rtol=1e-6, atol=0)
    for name, bad_g, flagged in nonfinite_cases(g.numel(), dtype, gen):
        _, flag = ops.sinkhorn_sweep_(bad_g, torch.ones(r1 - r0), None, C, 1.0, 1e-8, True)
        assert flag.item() == float(flagged), name
        _, unchecked = ops.sinkhorn_sweep_(bad_g, torch.ones(r1 - r0), None, C, 1.0, 1e-8, False)
        assert unchecked.item() == 0.0


@needs_ext
def test_sinkhorn_sweep_refuses_a_fragment_that_is_not_whole_rows():
    with pytest.raises(RuntimeError, match="not whole rows of 67 columns"):
        torch.ops.sage_dist.sinkhorn_sweep_(torch.ones(70), torch.ones(1), None, C, 1.0, 1e-8,
                                            True)
    with pytest.raises(RuntimeError, match="r has 3 entries"):
        torch.ops.sage_dist.sinkhorn_sweep_(torch.ones(2 * C), torch.ones(3), None, C, 1.0, 1e-8,
                                            True)


def same(a, b):
    """Bit-for-bit equal values (NaN equal to NaN)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(
        ((a == b) | (a.isnan() & b.isnan())).all())


def nonfinite_cases(n, dtype, gen):
    """(name, gradient, flagged): NaN or Inf anywhere, and huge finite values whose squares and
    sums overflow (the flag must come from the elements, not from the sums)."""
    base = torch.randn(n, generator=gen)
    out = [("finite", base.clone(), False)]
    for name, value, where in [] if n == 0 else [("nan", float("nan"), 0), ("inf", float("inf"), n // 2),
                               ("-inf", float("-inf"), n - 1), ("-nan", -float("nan"), 3)]:
        g = base.clone()
        g[where] = value
        out.append((name, g, True))
    big = base.sign() * 3e38
    out.append(("huge finite", big, False))
    return [(name, g.to(dtype), flagged) for name, g, flagged in out]


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frag", FRAGMENTS)
def test_colsum_abs_check(frag, dtype):
    """The sums of colsum_abs, bit for bit, and the flag of exactly the elements that are NaN
    or Inf, as the engine's aminmax check (optimizer._nonfinite_flag) flags them."""
    from sage_dist.optim.optimizer import _nonfinite_flag
    gen = torch.Generator().manual_seed(11)
    for name, g, flagged in nonfinite_cases(frag[1] - frag[0], dtype, gen):
        sums, bad = torch.ops.sage_dist.colsum_abs_check(g, C, frag[0])
        assert same(sums, torch.ops.sage_dist.colsum_abs(g, C, frag[0])), name
        assert bad.shape == (1,) and bad.dtype == torch.float32
        assert bad.item() == float(flagged) == _nonfinite_flag(g.float()).item(), name
        ref_sums, ref_bad = ops.reference.colsum_abs_check(g, C, frag[0])
        assert torch.equal(bad, ref_bad), name
        if name == "finite":
            torch.testing.assert_close(sums, ref_sums, rtol=1e-6, atol=1e-7)


WHOLE_SHAPES = [(R, C), (1, 40), (300, 1), (16, 33), (72, 5)]


def whole_matrices(dtype, seed=7):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k, (rows, cols) in enumerate(WHOLE_SHAPES):
        g = torch.randn(rows * cols, generator=gen)
        if rows > 2:
            g[cols:2 * cols] = 0  # a zero row
        out.append((rows, cols, g.to(dtype), 1.0 + 0.5 * k, 2.0 - 0.25 * k))
    return out


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_sinkhorn_scales_multi_equals_one_call_per_matrix(dtype):
    """Many whole matrices in one call: each matrix's scales bit for bit those of its own
    sinkhorn_scales call (so of the phase-by-phase path), and its finiteness flag."""
    mats = whole_matrices(dtype)
    gen = torch.Generator().manual_seed(8)
    bad = [g.clone() for _, _, g, _, _ in mats[:2]]
    bad[0][5] = float("nan")
    bad[1][-1] = float("-inf")
    grads = [g for _, _, g, _, _ in mats] + bad
    shapes = [(r, c) for r, c, *_ in mats] + [(r, c) for r, c, *_ in mats[:2]]
    rts = [rt for *_, rt, _ in mats] + [1.0, 1.0]
    cts = [ct for *_, ct in mats] + [1.0, 1.0]
    rs = [torch.full((r,), 7.0) for r, _ in shapes]
    cs = [torch.full((c,), 7.0) for _, c in shapes]
    flags = [torch.full((1,), 5.0) for _ in shapes]
    torch.ops.sage_dist.sinkhorn_scales_multi_(grads, rs, cs, flags, [r for r, _ in shapes],
                                               [c for _, c in shapes], rts, cts, 3, 1e-8)
    for k, (g, (rows, cols)) in enumerate(zip(grads, shapes)):
        want = torch.ops.sage_dist.sinkhorn_scales(g, rows, cols, 3, 1e-8, rts[k], cts[k])
        if k < len(mats):
            assert torch.equal(rs[k], want[0]) and torch.equal(cs[k], want[1]), k
        assert flags[k].item() == (1.0 if k >= len(mats) else 0.0)
    del gen


@needs_ext
@pytest.mark.parametrize("pdtype, gdtype", [(torch.float32, torch.float32),
                                            (torch.bfloat16, torch.float32),
                                            (torch.float32, torch.bfloat16)])
def test_sinkhorn_update_multi(pdtype, gdtype):
    """Scales and update in one call: bit for bit sinkhorn_scales + scaled_update_ for every
    finite gradient; a parameter whose gradient holds a NaN or an Inf is left as it was and
    flagged; and within tolerance of the pure-PyTorch reference."""
    mats = whole_matrices(gdtype, seed=9)
    grads = [g for _, _, g, _, _ in mats]
    grads[1] = grads[1].clone()
    grads[1][3] = float("inf")
    gen = torch.Generator().manual_seed(10)
    params = [torch.randn(g.numel(), generator=gen).to(pdtype) for g in grads]
    Rs, Cs = [r for r, *_ in mats], [c for _, c, *_ in mats]
    rts, cts = [m[3] for m in mats], [m[4] for m in mats]
    hp = (0.03, 0.1, 0.25)
    got = [p.clone() for p in params]
    flags = [torch.full((1,), 5.0) for _ in params]
    torch.ops.sage_dist.sinkhorn_update_multi_(got, grads, flags, Rs, Cs, rts, cts, 4, 1e-8, *hp)
    ref = [p.clone() for p in params]
    ref_flags = [torch.zeros(1) for _ in params]
    ops.reference.sinkhorn_update_multi_(ref, grads, ref_flags, Rs, Cs, rts, cts, 4, 1e-8, *hp)
    for k, (p, g) in enumerate(zip(params, grads)):
        assert flags[k].item() == ref_flags[k].item() == (1.0 if k == 1 else 0.0)
        if k == 1:
            assert torch.equal(got[k], p)
            continue
        want, want_ref = p.clone(), p.clone()
        r, c = torch.ops.sage_dist.sinkhorn_scales(g, Rs[k], Cs[k], 4, 1e-8, rts[k], cts[k])
        torch.ops.sage_dist.scaled_update_(want, g, r, c, Cs[k], 0, *hp)
        assert torch.equal(got[k], want), k
        # the reference's update with these scales (the scales themselves: within 1e-6 of the
        # reference's, test_sinkhorn_scales_whole_matrix; a 1e-7 difference in a scale can
        # exceed 1e-6 relative in an updated element that nearly cancels)
        ops.reference.scaled_update_(want_ref, g, r, c, Cs[k], 0, *hp)
        assert_close(got[k], want_ref)
        r_ref, c_ref = ops.reference.sinkhorn_scales(g, Rs[k], Cs[k], 4, 1e-8, rts[k], cts[k])
        torch.testing.assert_close(r, r_ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(c, c_ref, rtol=1e-6, atol=0)


@needs_ext
def test_whole_sinkhorn_threads_and_large_matrices():
    """Results do not depend on the thread count, nor on whether a matrix's sweeps are done
    by one thread or spread over the threads (a large matrix), nor on its neighbours."""
    gen = torch.Generator().manual_seed(12)
    big = torch.randn(700 * 530, generator=gen)  # above the one-thread size of sinkhorn_scales
    small = torch.randn(40 * 33, generator=gen)
    threads = torch.get_num_threads()
    try:
        out = {}
        for n in sorted({1, 2, threads}):
            torch.set_num_threads(n)
            single = torch.ops.sage_dist.sinkhorn_scales(big, 700, 530, 3, 1e-8, 1.0, 1.0)
            rs, cs = [torch.empty(700), torch.empty(40)], [torch.empty(530), torch.empty(33)]
            torch.ops.sage_dist.sinkhorn_scales_multi_(
                [big, small], rs, cs, [torch.zeros(1), torch.zeros(1)], [700, 40], [530, 33],
                [1.0, 1.0], [1.0, 1.0], 3, 1e-8)
            sums = (torch.ops.sage_dist.colsum_abs(big, 530, 0),
                    torch.ops.sage_dist.sq_sums(big, single[0], None, 700, 530, 0, 0),
                    torch.ops.sage_dist.sq_sums(big, None, single[1], 700, 530, 0, 1))
            out[n] = (*single, rs[0], cs[0], *sums)
        first = out[min(out)]
        for n, got in out.items():
            for a, b in zip(got, first):
                assert torch.equal(a, b), n
            assert torch.equal(got[0], got[2]) and torch.equal(got[1], got[3])
    finally:
        torch.set_num_threads(threads)


def run_every_op(dtype):
    """Every op with a vector-ISA path, on mid-row fragments and whole matrices."""
    out = []
    for k, frag in enumerate(FRAGMENTS[:5]):
        t = inputs(*frag, dtype, seed=20 + k)
        start = frag[0]
        out += list(torch.ops.sage_dist.colsum_abs_check(t["grad"], C, start))
        for r, c in [(t["r"], t["c"]), (None, t["c"]), (t["r"], None), (None, None)]:
            for dim in (0, 1):
                out.append(torch.ops.sage_dist.sq_sums(t["grad"], r, c, R, C, start, dim))
        out.append(torch.ops.sage_dist.sq_sums(t["grad"], t["r"], None, R, C, start, 1,
                                               t["m"], 0.8))
        p, m = t["param"].clone(), t["m"].clone()
        torch.ops.sage_dist.sage_update_(p, m, t["grad"], t["h"], C, start, *SAGE_HP.values(),
                                         k % 2 == 0)
        q = t["param"].clone()
        torch.ops.sage_dist.scaled_update_(q, t["grad"], t["r"], t["c"], C, start, 0.03, 0.1,
                                           0.3)
        out += [p, m, q]
    mats = whole_matrices(dtype, seed=30)
    for rows, cols, g, rt, ct in mats:
        out += list(torch.ops.sage_dist.sinkhorn_scales(g, rows, cols, 3, 1e-8, rt, ct))
    params = [torch.randn(g.numel()).to(dtype) for _, _, g, _, _ in mats]
    torch.ops.sage_dist.sinkhorn_update_multi_(
        params, [g for _, _, g, _, _ in mats], [torch.zeros(1) for _ in mats],
        [m[0] for m in mats], [m[1] for m in mats], [m[3] for m in mats], [m[4] for m in mats],
        3, 1e-8, 0.03, 0.1, 0.3)
    return out + params


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_cpu_isa_gives_the_same_numbers(dtype):
    """The hot loops are compiled for AVX-512, AVX2 and the base ISA and chosen at run time
    (csrc/cpu/isa.h): every set this CPU supports gives the same results bit for bit."""
    isas = []
    for isa in ops.CPU_ISAS:
        try:
            ops.set_cpu_isa(isa)
            isas.append(isa)
        except ValueError:
            pass
    ops.set_cpu_isa("auto")
    print(f"CPU ISAs compared: {isas} (auto: {ops.cpu_isa()})")
    assert "generic" in isas
    results = {}
    try:
        for isa in isas:
            ops.set_cpu_isa(isa)
            torch.manual_seed(0)
            results[isa] = run_every_op(dtype)
    finally:
        ops.set_cpu_isa("auto")
    for isa in isas[1:]:
        for k, (a, b) in enumerate(zip(results[isa], results[isas[0]])):
            assert torch.equal(a, b), f"{isa} vs {isas[0]}: result {k}"


@needs_ext
def test_cpu_isa_choice():
    """auto takes the widest the CPU has; the environment variable asks for another."""
    import subprocess
    import sys
    flags = open("/proc/cpuinfo").read() if sys.platform.startswith("linux") else ""
    want = "avx512" if " avx512f" in flags else "avx2" if " avx2" in flags else "generic"
    if sys.platform.startswith("linux") and platform_is_x86():
        assert ops.cpu_isa() == want or os_env_isa()
    code = "from sage_dist import ops; print(ops.cpu_isa())"
    env = {**__import__("os").environ, "SAGE_DIST_CPU_ISA": "generic"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "generic"
    with pytest.raises(ValueError, match="not available"):
        ops.set_cpu_isa("sse9")
    assert ops.cpu_isa() in ops.CPU_ISAS


def platform_is_x86():
    import platform
    return platform.machine() in ("x86_64", "AMD64")


def os_env_isa():
    import os
    return os.environ.get("SAGE_DIST_CPU_ISA", "auto") != "auto"


@needs_ext
@pytest.mark.parametrize("recipe", ["sage-hybrid", "sinkgd-hybrid"])
def test_engine_flags_exactly_the_nonfinite_gradients(recipe):
    """The rules' own checks (colsum_abs_check, the whole-matrix Sinkhorn) flag the same
    gradients as the engine's aminmax check: NaN or Inf anywhere, never huge finite values."""
    from torch import nn
    from sage_dist import build_optimizer
    torch.manual_seed(0)
    model = nn.ModuleDict(dict(embed=nn.Embedding(50, 16), a=nn.Linear(16, 24),
                               b=nn.Linear(24, 16, bias=False), head=nn.Linear(16, 50,
                                                                               bias=False)))
    opt = build_optimizer(model, recipe)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    for bad in [[], [0], [1], [3], [0, 4], [2, 3]]:
        for k, p in enumerate(params):
            g = torch.randn(p.numel(), generator=gen)
            if k in bad:
                g[k % g.numel()] = float("nan") if k % 2 else float("inf")
            elif k % 2:
                g = g.sign() * 3e38  # huge but finite: statistics overflow, no flag
            p.grad = g.reshape(p.shape)
        before = [p.detach().clone() for p in params]
        count = opt.nonfinite_count
        opt.step()
        assert opt.nonfinite_count - count == len(bad), bad
        for k, (p, b) in enumerate(zip(params, before)):
            if k in bad:
                assert same(p.detach(), b), (bad, k)


def test_sq_sums_reference_by_hand():
    # [2, 3] matrix, fragment [1, 5): elements g = (1, 2, 3, 4) at (0,1) (0,2) (1,0) (1,1).
    g = torch.tensor([1.0, 2.0, 3.0, 4.0])
    r, c = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.5, 3.0])
    rows = ops.reference.sq_sums(g, r, c, 2, 3, 1, 1)   # (1*.5)^2 + (2*3)^2; (3*2)^2 + (4*2*.5)^2
    cols = ops.reference.sq_sums(g, r, c, 2, 3, 1, 0)
    torch.testing.assert_close(rows, torch.tensor([36.25, 52.0]))
    torch.testing.assert_close(cols, torch.tensor([36.0, 0.25 + 16.0, 36.0]))
    torch.testing.assert_close(ops.reference.colsum_abs(-g, 3, 1), torch.tensor([3.0, 5.0, 2.0]))


# ----------------------------------------------------------------------------- updates
def run_sage(fn, t, start, momentum_first):
    p, m = t["param"].clone(), t["m"].clone()
    fn(p, m, t["grad"], t["h"], C, start, *SAGE_HP.values(), momentum_first)
    return p, m


@needs_ext
@pytest.mark.parametrize("momentum_first", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frag", FRAGMENTS)
def test_sage_update(frag, dtype, momentum_first):
    t = inputs(*frag, dtype)
    p, m = run_sage(torch.ops.sage_dist.sage_update_, t, frag[0], momentum_first)
    p_ref, m_ref = run_sage(ops.reference.sage_update_, t, frag[0], momentum_first)
    assert_close(m, m_ref)
    # A sign tie (the direction's argument within rounding of 0) flips one element by 2 lr h.
    bad = ulp_bad(p, p_ref)
    ties = int(bad.sum())
    print(f"sage_update_ {dtype} {frag}: {ties} sign ties of {p.numel()}")
    assert ties <= 1e-4 * max(1, p.numel()), f"{ties} sign ties"


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_sage_update_large_sign_ties(dtype):
    """Many elements, bf16 grads: count the sign ties against the reference (< 1e-4)."""
    start, end = 1000 * 5 + 77, 1000 * 400 + 3   # mid-row fragment of a [*, 1000] matrix
    gen = torch.Generator().manual_seed(5)
    n = end - start
    p0, g = torch.randn(n, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)
    m0, h = 0.1 * torch.randn(n, generator=gen), torch.rand(1000, generator=gen)
    out = []
    for fn in (torch.ops.sage_dist.sage_update_, ops.reference.sage_update_):
        p, m = p0.clone(), m0.clone()
        for _ in range(3):
            fn(p, m, g, h, 1000, start, *SAGE_HP.values(), True)
        out.append((p, m))
    ties = int(ulp_bad(out[0][0], out[1][0]).sum())
    print(f"sage_update_ {dtype}, {n} elements, 3 steps: {ties} sign ties")
    assert ties < 1e-4 * n
    assert_close(out[0][1], out[1][1])


@needs_ext
@pytest.mark.parametrize("scales", ["rc", "r", "c", ""])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frag", FRAGMENTS)
def test_scaled_update(frag, dtype, scales):
    t = inputs(*frag, dtype)
    r = t["r"] if "r" in scales else None
    c = t["c"] if "c" in scales else None
    out = []
    for fn in (torch.ops.sage_dist.scaled_update_, ops.reference.scaled_update_):
        p = t["param"].clone()
        fn(p, t["grad"], r, c, C, frag[0], 3e-2, 0.1, 0.3)
        out.append(p)
    assert_close(*out)


@needs_ext
@pytest.mark.parametrize("scales", ["r", ""])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frag", FRAGMENTS)
def test_momentum_scaled_update(frag, dtype, scales):
    t = inputs(*frag, dtype)
    r = t["r"] if "r" in scales else None
    out = []
    for fn in (torch.ops.sage_dist.momentum_scaled_update_, ops.reference.momentum_scaled_update_):
        p, m = t["param"].clone(), t["m"].clone()
        fn(p, m, t["grad"], r, None, C, frag[0], 0.9, 3e-2, 0.1, 3e-2)
        out.append((p, m))
    assert torch.equal(out[0][1], out[1][1])  # the momentum: fp32, rounded alike
    assert_close(out[0][0], out[1][0])


def fragment_lists(dtypes=((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                            (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16))):
    """One fragment of each kind in FRAGMENTS, with mixed param / grad dtypes."""
    out = []
    for k, frag in enumerate(FRAGMENTS):
        pd, gd = dtypes[k % len(dtypes)]
        t = inputs(*frag, torch.float32, seed=k)
        t["param"], t["grad"] = t["param"].to(pd), t["grad"].to(gd)
        out.append((frag[0], t))
    return out


@needs_ext
def test_scaled_update_multi_equals_one_call_per_fragment():
    multi, single = fragment_lists(), fragment_lists()
    torch.ops.sage_dist.scaled_update_multi_(
        [t["param"] for _, t in multi], [t["grad"] for _, t in multi],
        [t["r"] for _, t in multi], [t["c"] for _, t in multi], [C] * len(multi),
        [start for start, _ in multi], 3e-2, 0.1, 0.3)
    for start, t in single:
        torch.ops.sage_dist.scaled_update_(t["param"], t["grad"], t["r"], t["c"], C, start,
                                           3e-2, 0.1, 0.3)
    for (_, a), (_, b) in zip(multi, single):
        assert torch.equal(a["param"], b["param"])


@needs_ext
@pytest.mark.parametrize("momentum_first", [True, False])
def test_sage_update_multi_equals_one_call_per_fragment(momentum_first):
    multi, single = fragment_lists(), fragment_lists()
    torch.ops.sage_dist.sage_update_multi_(
        [t["param"] for _, t in multi], [t["m"] for _, t in multi],
        [t["grad"] for _, t in multi], [t["h"] for _, t in multi], [C] * len(multi),
        [start for start, _ in multi], *SAGE_HP.values(), momentum_first)
    for start, t in single:
        torch.ops.sage_dist.sage_update_(t["param"], t["m"], t["grad"], t["h"], C, start,
                                         *SAGE_HP.values(), momentum_first)
    for (_, a), (_, b) in zip(multi, single):
        assert torch.equal(a["param"], b["param"]) and torch.equal(a["m"], b["m"])


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_multi_lists_of_different_lengths_rejected(impl):
    if impl == "kernel" and not ops.HAS_EXTENSION:
        pytest.skip("sage_dist._C not built")
    fn = (torch.ops.sage_dist.scaled_update_multi_ if impl == "kernel"
          else ops.reference.scaled_update_multi_)
    (s0, a), (s1, b) = fragment_lists()[:2]
    with pytest.raises(RuntimeError, match="lists have different lengths"):
        fn([a["param"], b["param"]], [a["grad"], b["grad"]], [a["r"]], [a["c"], b["c"]], [C, C],
           [s0, s1], 0.1, 0.0, 0.1)


@needs_ext
@pytest.mark.parametrize("recipe, op, calls, kw", [
    # a, b and head (Sinkhorn, whole matrices): scales and updates in one call
    ("sage-hybrid", "sinkhorn_update_multi_", [3], {}),
    # with nonfinite='raise' no parameter may change before every flag is known: the scales
    # in one call, the updates in another, one phase later
    ("sage-hybrid", "sinkhorn_scales_multi_", [3], dict(nonfinite="raise")),
    ("sage-hybrid", "scaled_update_multi_", [3], dict(nonfinite="raise")),
    ("sage-hybrid", "sage_update_multi_", [1], {}),    # the embedding
    ("scale", "scaled_update_multi_", [4], {})])       # embedding and dense rules share lr, wd
def test_engine_batches_the_updates_of_a_phase(monkeypatch, recipe, op, calls, kw):
    """The engine issues one multi-tensor call per op and hyperparameter set in a phase."""
    from torch import nn
    from sage_dist import build_optimizer
    torch.manual_seed(0)
    model = nn.ModuleDict(dict(embed=nn.Embedding(50, 16), a=nn.Linear(16, 24, bias=False),
                               b=nn.Linear(24, 16, bias=False), head=nn.Linear(16, 50,
                                                                               bias=False)))
    seen = []
    real = getattr(ops, op)
    monkeypatch.setattr(ops, op, lambda *a: (seen.append(len(a[0])), real(*a))[1])
    opt = build_optimizer(model, recipe, **kw)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert seen == calls


def test_scaled_update_reference_by_hand():
    p = torch.tensor([1.0, 1.0, 1.0])
    g = torch.tensor([1.0, 2.0, 4.0])                # [2, 2] matrix, fragment [1, 4)
    ops.reference.scaled_update_(p, g, torch.tensor([1.0, 0.5]), torch.tensor([2.0, 1.0]),
                                2, 1, 0.1, 0.5, 0.25)
    # decay 0.95; x = (1*1*1, 2*.5*2, 4*.5*1) = (1, 2, 2)
    torch.testing.assert_close(p, torch.tensor([0.95 - 0.25, 0.95 - 0.5, 0.95 - 0.5]))


# ----------------------------------------------------------------------------- opcheck
def opcheck_cases():
    t = inputs(45, R * C - 13, torch.float32)
    tb = inputs(70, 190, torch.bfloat16, seed=1)
    yield "colsum_abs", (t["grad"], C, 45)
    yield "colsum_abs", (tb["grad"], C, 70)
    yield "sq_sums", (t["grad"], t["r"], t["c"], R, C, 45, 1)
    yield "sq_sums", (tb["grad"], None, tb["c"], R, C, 70, 0)
    yield "sage_update_", (t["param"], t["m"], t["grad"], t["h"], C, 45, 0.01, 0.9, 0.99, 0.1,
                           True)
    yield "sage_update_", (tb["param"], tb["m"], tb["grad"], tb["h"], C, 70, 0.01, 0.9, 0.99,
                           0.0, False)
    yield "scaled_update_", (t["param"], t["grad"], t["r"], t["c"], C, 45, 0.01, 0.1, 0.1)
    yield "scaled_update_", (tb["param"], tb["grad"], None, tb["c"], C, 70, 0.01, 0.0, 0.1)
    yield "sq_sums", (t["grad"], t["r"], None, R, C, 45, 1, t["m"], 0.9)
    yield "momentum_scaled_update_", (t["param"], t["m"], t["grad"], t["r"], None, C, 45, 0.9,
                                      0.01, 0.0, 0.01)
    yield "momentum_scaled_update_", (tb["param"], tb["m"], tb["grad"], None, None, C, 70, 0.5,
                                      0.01, 0.1, 0.01)
    fl = fragment_lists()[:3]
    yield "scaled_update_multi_", ([t["param"] for _, t in fl], [t["grad"] for _, t in fl],
                                   [t["r"] for _, t in fl], [t["c"] for _, t in fl], [C] * 3,
                                   [s for s, _ in fl], 0.01, 0.1, 0.1)
    yield "sage_update_multi_", ([t["param"] for _, t in fl], [t["m"] for _, t in fl],
                                 [t["grad"] for _, t in fl], [t["h"] for _, t in fl], [C] * 3,
                                 [s for s, _ in fl], 0.01, 0.9, 0.99, 0.1, True)
    yield "sinkhorn_rescale", (t["r"], t["r"] * 3, 1.5, 1e-8)
    yield "sinkhorn_scales", (inputs(0, R * C, torch.float32)["grad"], R, C, 2, 1e-8, 1.0, 1.0)
    yield "sinkhorn_scales", (inputs(0, R * C, torch.bfloat16)["grad"], R, C, 1, 1e-8, 2.0, 0.5)
    yield "round_bf16_", (torch.empty(120, dtype=torch.bfloat16), t["grad"][:120].clone(), 7, 45)
    yield "colsum_abs_check", (t["grad"], C, 45)
    whole_rows = inputs(0, R * C, torch.float32)["grad"][2 * C:9 * C]
    yield "sinkhorn_sweep_", (whole_rows, torch.ones(7), None, C, 1.0, 1e-8, True)
    yield "sinkhorn_sweep_", (inputs(0, R * C, torch.bfloat16)["grad"][:3 * C], torch.ones(3),
                              t["c"], C, 2.0, 1e-8, False)
    yield "colsum_abs_check", (tb["grad"], C, 70)
    w = [inputs(0, R * C, torch.float32)["grad"], inputs(0, 40, torch.bfloat16, seed=2)["grad"]]
    yield "sinkhorn_scales_multi_", (w, [torch.empty(R), torch.empty(8)],
                                     [torch.empty(C), torch.empty(5)], [torch.zeros(1)] * 2,
                                     [R, 8], [C, 5], [1.0, 2.0], [1.0, 0.5], 2, 1e-8)
    yield "sinkhorn_update_multi_", ([w[0].clone() * 2, w[1].float().clone()], w,
                                     [torch.zeros(1), torch.zeros(1)], [R, 8], [C, 5],
                                     [1.0, 2.0], [1.0, 0.5], 2, 1e-8, 0.01, 0.1, 0.1)


@needs_ext
@pytest.mark.parametrize("case", list(opcheck_cases()), ids=lambda c: c[0])
def test_opcheck(case):
    name, args = case
    torch.library.opcheck(getattr(torch.ops.sage_dist, name).default, args)


# ----------------------------------------------------------------------------- errors
@needs_ext
def test_kernels_reject_bad_arguments():
    """Argument checks live once, in C++ (csrc/include/sage_dist/fragment_checks.h)."""
    t = inputs(0, R * C, torch.float32)
    sq, su = torch.ops.sage_dist.sq_sums, torch.ops.sage_dist.sage_update_
    sc = torch.ops.sage_dist.scaled_update_
    with pytest.raises(RuntimeError, match="dim=2 is invalid"):
        sq(t["grad"], None, None, R, C, 0, 2)
    with pytest.raises(RuntimeError, match="outside a"):
        sq(t["grad"], None, None, R - 1, C, 0, 1)
    with pytest.raises(RuntimeError, match="C=0 is invalid"):
        sq(t["grad"], None, None, R, 0, 0, 1)
    with pytest.raises(RuntimeError, match="h has 3 entries"):
        su(t["param"], t["m"], t["grad"], torch.ones(3), C, 0, 0.1, 0.9, 0.99, 0.0, True)
    with pytest.raises(RuntimeError, match="m \\(optimizer state\\) has dtype"):
        su(t["param"], t["m"].double(), t["grad"], t["h"], C, 0, 0.1, 0.9, 0.99, 0.0, True)
    with pytest.raises(RuntimeError, match="r has 3 entries but the fragment reaches row"):
        sc(t["param"], t["grad"], torch.ones(3), None, C, 0, 0.1, 0.0, 0.1)


def test_references_check_what_their_math_needs():
    t = inputs(0, R * C, torch.float32)
    with pytest.raises(RuntimeError, match="dim=2 is invalid"):
        ops.reference.sq_sums(t["grad"], None, None, R, C, 0, 2)
    with pytest.raises(ValueError, match="outside a"):
        ops.reference.sq_sums(t["grad"], None, None, R - 1, C, 0, 1)
    with pytest.raises(RuntimeError, match="grad has 3 elements but param has"):
        ops.reference.scaled_update_(t["param"], t["grad"][:3], None, None, C, 0, 0.1, 0.0, 0.1)


# ----------------------------------------------------------------------------- force_reference
@needs_ext
def test_force_reference_runs_the_references():
    """Inside force_reference() the public ops skip the dispatcher: the kernel's contiguity
    check (which the reference does not need) no longer fires, and the results are the
    reference's."""
    g = torch.randn(R, 2 * C)[:, ::2]                     # not contiguous
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ops.colsum_abs(g, C, 0)
    with ops.force_reference():
        got = ops.colsum_abs(g, C, 0)
        with ops.force_reference(False):
            with pytest.raises(RuntimeError, match="must be contiguous"):
                ops.colsum_abs(g, C, 0)
    assert torch.equal(got, ops.reference.colsum_abs(g, C, 0))
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ops.colsum_abs(g, C, 0)


# ----------------------------------------------------------------------------- GPU
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frag", FRAGMENTS)
def test_cuda_against_reference(frag, dtype):
    t = inputs(*frag, dtype, device="cuda")
    tc = {k: v.cpu() for k, v in t.items()}
    start = frag[0]
    torch.testing.assert_close(torch.ops.sage_dist.colsum_abs(t["grad"], C, start).cpu(),
                               ops.reference.colsum_abs(tc["grad"], C, start),
                               rtol=1e-6, atol=1e-7)
    for dim in (0, 1):
        args = (t["r"], t["c"], R, C, start, dim)
        torch.testing.assert_close(
            torch.ops.sage_dist.sq_sums(t["grad"], *args).cpu(),
            ops.reference.sq_sums(tc["grad"], tc["r"], tc["c"], R, C, start, dim),
            rtol=1e-6, atol=1e-7)
    p, m = run_sage(torch.ops.sage_dist.sage_update_, t, start, True)
    p_ref, m_ref = run_sage(ops.reference.sage_update_, tc, start, True)
    assert_close(m, m_ref)
    assert int(ulp_bad(p, p_ref).sum()) <= 1e-4 * max(1, p.numel())
    p, p_ref = t["param"].clone(), tc["param"].clone()
    torch.ops.sage_dist.scaled_update_(p, t["grad"], t["r"], t["c"], C, start, 0.03, 0.1, 0.3)
    ops.reference.scaled_update_(p_ref, tc["grad"], tc["r"], tc["c"], C, start, 0.03, 0.1, 0.3)
    assert_close(p, p_ref)
    torch.testing.assert_close(
        torch.ops.sage_dist.sq_sums(t["grad"], t["r"], None, R, C, start, 1, t["m"], 0.9).cpu(),
        ops.reference.sq_sums(tc["grad"], tc["r"], None, R, C, start, 1, tc["m"], 0.9),
        rtol=1e-6, atol=1e-7)
    p, m, p_ref, m_ref = t["param"].clone(), t["m"].clone(), tc["param"].clone(), tc["m"].clone()
    torch.ops.sage_dist.momentum_scaled_update_(p, m, t["grad"], t["r"], None, C, start, 0.9,
                                                0.03, 0.1, 0.03)
    ops.reference.momentum_scaled_update_(p_ref, m_ref, tc["grad"], tc["r"], None, C, start, 0.9,
                                         0.03, 0.1, 0.03)
    assert torch.equal(m.cpu(), m_ref)
    assert_close(p, p_ref)
    if frag == (0, R * C):
        for a, b in zip(torch.ops.sage_dist.sinkhorn_scales(t["grad"], R, C, 5, 1e-8, 1.0, 1.0),
                        ops.reference.sinkhorn_scales(tc["grad"], R, C, 5, 1e-8, 1.0, 1.0)):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- fallback
FALLBACK_RUN = """
import json, sys, warnings
import torch
import sage_dist
from sage_dist import ops
assert not ops.HAS_EXTENSION and not ops.has_kernel("sq_sums", "cpu")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Embedding(50, 12), torch.nn.Linear(12, 9))
for p in model.parameters():
    p.grad = torch.randn_like(p)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    opt = sage_dist.build_optimizer(model, sys.argv[1])
    for _ in range(2):
        opt.step()
print(json.dumps({"params": [p.detach().reshape(-1).tolist() for p in model.parameters()],
                  "warnings": [str(w.message) for w in caught]}))
"""


@pytest.mark.parametrize("recipe", ["sage-hybrid", "scale"])
def test_fallback_without_kernels_matches(recipe):
    """Without the native library the dispatcher runs each op's registered reference (one
    warning per op and device) and gives the same steps as the kernels."""
    import json
    import os
    import subprocess
    import sys
    import sage_dist

    env = dict(os.environ, SAGE_DIST_NO_EXTENSION="1")
    out = subprocess.run([sys.executable, "-c", FALLBACK_RUN, recipe], env=env, check=True,
                         capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    fallbacks = [w for w in res["warnings"] if "pure-PyTorch fallback" in w]
    assert fallbacks and len(fallbacks) == len(set(fallbacks)), fallbacks  # once per op
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 12), torch.nn.Linear(12, 9))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = sage_dist.build_optimizer(model, recipe)
    for _ in range(2):
        opt.step()
    for p, q in zip(model.parameters(), res["params"]):
        torch.testing.assert_close(p.detach().reshape(-1), torch.tensor(q), rtol=1e-6,
                                   atol=1e-7)
