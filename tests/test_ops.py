"""Tests of the native ops (sage_dist._C) against their pure-PyTorch references.

Build first: `python setup.py build_ext --inplace` (or `pip install --no-build-isolation -e .`).
Set SAGE_DIST_ALLOW_NO_EXT=1 to run without the extension (kernel tests then skip).
"""

import os
import warnings

import pytest
import torch

from sage_dist import ops

ALLOW_NO_EXT = os.environ.get("SAGE_DIST_ALLOW_NO_EXT") == "1"
needs_ext = pytest.mark.skipif(not ops.HAS_EXTENSION,
                               reason=f"sage_dist._C not built ({ops.EXTENSION_ERROR})")
needs_cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.has_cuda_kernels()),
    reason="needs a CUDA GPU and sage_dist._C built with its CUDA kernels")

DTYPES = [torch.float32, torch.bfloat16]
HYPER = dict(lr=3e-2, beta1=0.9, beta2=0.99, weight_decay=0.1)


def make_lion_inputs(n, param_dtype, grad_dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(n, generator=gen).to(device=device, dtype=param_dtype)
    exp_avg = (0.1 * torch.randn(n, generator=gen)).to(device)
    grad = torch.randn(n, generator=gen).to(device=device, dtype=grad_dtype)
    return param, exp_avg, grad


def assert_close_in_dtype(actual, expected):
    """fp32: within 1e-6 relative. bf16: within one bf16 ulp of the expected value."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = actual.cpu().float(), expected.cpu().float()
    if expected.dtype == torch.float32:
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-9)
        return
    _, exponent = torch.frexp(torch.maximum(a.abs(), e.abs()))
    ulp = torch.ldexp(torch.ones_like(e), exponent - 8)  # bf16 keeps 8 significant bits
    bad = (a - e).abs() > ulp
    assert not bad.any(), f"{int(bad.sum())} elements differ by more than 1 bf16 ulp"


def run_lion_beside_reference(n, param_dtype, grad_dtype, device, steps=3):
    param, exp_avg, _ = make_lion_inputs(n, param_dtype, grad_dtype, device)
    ref_param, ref_exp_avg = param.cpu().clone(), exp_avg.cpu().clone()
    for step in range(steps):
        _, _, grad = make_lion_inputs(n, param_dtype, grad_dtype, device, seed=100 + step)
        torch.ops.sage_dist.lion_update_(param, exp_avg, grad, *HYPER.values())
        ops.reference.lion_update_(ref_param, ref_exp_avg, grad.cpu(), **HYPER)
        assert_close_in_dtype(param, ref_param)
        assert_close_in_dtype(exp_avg, ref_exp_avg)


def test_extension_is_built():
    if not ops.HAS_EXTENSION:
        if ALLOW_NO_EXT:
            pytest.skip(f"sage_dist._C not built ({ops.EXTENSION_ERROR}); "
                        "allowed by SAGE_DIST_ALLOW_NO_EXT=1")
        pytest.fail(f"sage_dist._C is not built ({ops.EXTENSION_ERROR}); run "
                    "`python setup.py build_ext --inplace` or set SAGE_DIST_ALLOW_NO_EXT=1")
    assert ops.has_kernel("lion_update_", "cpu") and ops.has_kernel("lion_update_multi_", "cpu")


def test_reference_matches_spec_by_hand():
    # p = 1*(1 - 0.1*0.1) = 0.99; u = sign(0.9*0.5 + 0.1*(-1)) = +1; p = 0.99 - 0.1 = 0.89;
    # m = 0.99*0.5 + 0.01*(-1) = 0.485.  Second element: zero direction -> decay only.
    for fn in (ops.reference.lion_update_, ops.lion_update_):
        param, exp_avg = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn(param, exp_avg, torch.tensor([-1.0, 0.0]), 0.1, 0.9, 0.99, 0.1)
        torch.testing.assert_close(param, torch.tensor([0.89, 1.98]))
        torch.testing.assert_close(exp_avg, torch.tensor([0.485, 0.0]))


@needs_ext
@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("grad_dtype", DTYPES)
def test_lion_opcheck_cpu(param_dtype, grad_dtype):
    args = make_lion_inputs(37, param_dtype, grad_dtype) + tuple(HYPER.values())
    torch.library.opcheck(torch.ops.sage_dist.lion_update_.default, args)


@needs_ext
@pytest.mark.parametrize("n", [0, 1, 1000, 100_003])  # 100_003 spans several parallel tasks
@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("grad_dtype", DTYPES)
def test_lion_cpu_matches_reference(n, param_dtype, grad_dtype):
    run_lion_beside_reference(n, param_dtype, grad_dtype, "cpu")


@needs_ext
def test_lion_accepts_any_shapes_with_equal_numel():
    param, exp_avg, grad = make_lion_inputs(24, torch.float32, torch.float32)
    ref_param, ref_exp_avg = param.clone(), exp_avg.clone()
    torch.ops.sage_dist.lion_update_(param.view(4, 6), exp_avg, grad.view(2, 3, 4),
                                     *HYPER.values())
    ops.reference.lion_update_(ref_param, ref_exp_avg, grad, **HYPER)
    assert torch.equal(param, ref_param) and torch.equal(exp_avg, ref_exp_avg)


@needs_ext
@pytest.mark.parametrize("case, match", [
    ("grad_size", "grad has 9 elements .* same number of elements"),
    ("exp_avg_size", "exp_avg has 11 elements .* same number of elements"),
    ("exp_avg_dtype", "exp_avg .* has dtype .*; allowed: Float"),
    ("param_dtype", "param has dtype .*; allowed: Float, BFloat16"),
    ("non_contiguous", "param must be contiguous"),
])
def test_lion_rejects_bad_arguments(case, match):
    """Argument checks live once, in the kernels (csrc/include/sage_dist/checks.h)."""
    impl = torch.ops.sage_dist.lion_update_
    param, exp_avg, grad = make_lion_inputs(10, torch.float32, torch.float32)
    if case == "grad_size":
        grad = grad[:9]
    elif case == "exp_avg_size":
        exp_avg = torch.zeros(11)
    elif case == "exp_avg_dtype":
        exp_avg = exp_avg.to(torch.bfloat16)
    elif case == "param_dtype":
        param = param.double()
    elif case == "non_contiguous":
        param = torch.randn(10, 2)[:, 0]
    before = param.clone()
    with pytest.raises(RuntimeError, match=match):
        impl(param, exp_avg, grad, *HYPER.values())
    assert torch.equal(param, before)


def test_reference_refuses_unequal_sizes():
    param, exp_avg, grad = make_lion_inputs(10, torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="grad has 9 elements .* same number of elements"):
        ops.reference.lion_update_(param, exp_avg, grad[:9], *HYPER.values())


@needs_ext
def test_lion_traces_under_torch_compile():
    param, exp_avg, grad = make_lion_inputs(64, torch.bfloat16, torch.bfloat16)
    ref_param, ref_exp_avg = param.clone(), exp_avg.clone()
    step = torch.compile(ops.lion_update_, backend="aot_eager", fullgraph=True)
    step(param, exp_avg, grad, **HYPER)
    ops.reference.lion_update_(ref_param, ref_exp_avg, grad, **HYPER)
    assert torch.equal(param, ref_param) and torch.equal(exp_avg, ref_exp_avg)


@needs_cuda_kernels
@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("grad_dtype", DTYPES)
def test_lion_cuda_matches_reference(param_dtype, grad_dtype):
    args = make_lion_inputs(37, param_dtype, grad_dtype, "cuda") + tuple(HYPER.values())
    torch.library.opcheck(torch.ops.sage_dist.lion_update_.default, args)
    for n in (1, 1000, 1_000_003):
        run_lion_beside_reference(n, param_dtype, grad_dtype, "cuda")


# ----------------------------------------------------------------------------- multi-tensor
def lion_lists(device="cpu"):
    """Mixed dtypes and sizes: empty, tiny, and sizes that span several CPU tasks and
    several CUDA chunks."""
    specs = [(0, torch.float32, torch.float32), (5, torch.bfloat16, torch.float32),
             (70_001, torch.float32, torch.bfloat16), (33_000, torch.float32, torch.float32),
             (1, torch.bfloat16, torch.bfloat16), (40_000, torch.bfloat16, torch.float32)]
    return [make_lion_inputs(n, pd, gd, device, seed=i) for i, (n, pd, gd) in enumerate(specs)]


def split(lists):
    return [list(x) for x in zip(*lists)]


@needs_ext
def test_lion_multi_equals_one_call_per_tensor():
    multi, single = lion_lists(), lion_lists()
    params, exp_avgs, grads = split(multi)
    torch.ops.sage_dist.lion_update_multi_(params, exp_avgs, grads, *HYPER.values())
    for p, m, g in single:
        torch.ops.sage_dist.lion_update_(p, m, g, *HYPER.values())
    for (p, m, _), (q, n, _) in zip(multi, single):
        assert torch.equal(p, q) and torch.equal(m, n)


@needs_ext
def test_lion_multi_opcheck():
    params, exp_avgs, grads = split(lion_lists()[:3])
    torch.library.opcheck(torch.ops.sage_dist.lion_update_multi_.default,
                          (params, exp_avgs, grads, *HYPER.values()))


@needs_ext
def test_lion_multi_rejects_bad_lists():
    fn = torch.ops.sage_dist.lion_update_multi_
    params, exp_avgs, grads = split(lion_lists()[1:3])
    with pytest.raises(RuntimeError, match="have 2, 1 and 2 tensors"):
        fn(params, exp_avgs[:1], grads, *HYPER.values())
    with pytest.raises(RuntimeError, match="exp_avg .*has dtype torch.bfloat16|exp_avg .*BFloat16"):
        fn(params, [exp_avgs[0].bfloat16(), exp_avgs[1]], grads, *HYPER.values())


@needs_ext
def test_engine_issues_one_multi_tensor_lion_call_per_step(monkeypatch):
    from torch import nn
    from sage_dist import build_optimizer
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    calls = []
    real = ops.lion_update_multi_
    monkeypatch.setattr(ops, "lion_update_multi_",
                        lambda *a: (calls.append(len(a[0])), real(*a))[1])
    opt = build_optimizer(model, "lion")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert calls == [4]  # two weights and two biases, one call
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@needs_cuda_kernels
def test_lion_multi_cuda_matches_cpu():
    cuda, cpu = lion_lists("cuda"), lion_lists()
    torch.ops.sage_dist.lion_update_multi_(*split(cuda), *HYPER.values())
    torch.ops.sage_dist.lion_update_multi_(*split(cpu), *HYPER.values())
    for (p, m, _), (q, n, _) in zip(cuda, cpu):
        assert torch.equal(p.cpu(), q) and torch.equal(m.cpu(), n)
