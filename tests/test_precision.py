"""Precision options: stochastic rounding of bf16 writes (sage_dist::round_bf16_) and bf16
optimizer state. Both are off by default; the math stays fp32 either way."""
import copy

import pytest
import torch
from torch import nn

from sage_dist import build_optimizer, ops
from sage_dist.optim.optimizer import RoutedOptimizer

needs_ext = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="sage_dist._C is not built")
BF16 = torch.bfloat16


def bits(t):
    return t.view(torch.int16)


def awkward_values(n=50_003, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 10.0 ** torch.randint(-30, 30, (n,), generator=g)
    x[:8] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.4e38,
                          -3.39e38, 1e-40])  # NaN, infs, zeros, near the bf16 max, subnormal
    return x


# ----------------------------------------------------------------------------- the op
@needs_ext
@pytest.mark.parametrize("offset", [0, 45, 2 ** 40])
def test_kernel_matches_reference_bitwise(offset):
    x = awkward_values()
    a, b = torch.empty(x.numel(), dtype=BF16), torch.empty(x.numel(), dtype=BF16)
    torch.ops.sage_dist.round_bf16_(a, x, 123456789, offset)
    ops.reference.round_bf16_(b, x, 123456789, offset)
    assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_rounds_to_a_neighbour_and_keeps_specials(impl):
    if impl == "kernel" and not ops.HAS_EXTENSION:
        pytest.skip("sage_dist._C is not built")
    fn = torch.ops.sage_dist.round_bf16_ if impl == "kernel" else ops.reference.round_bf16_
    x = awkward_values()
    out = torch.empty(x.numel(), dtype=BF16)
    fn(out, x, 1, 0)
    # The result is x with its low 16 bits dropped (toward zero) or the next bf16 away from
    # zero; exactly representable values stay as they are.
    xb = x.view(torch.int32)
    trunc = xb & ~0xFFFF
    got = out.float().view(torch.int32)
    finite = torch.isfinite(x)
    ok = (got == trunc) | ((got == trunc + 0x10000) & ((xb & 0xFFFF) != 0))
    assert bool(ok[finite].all()), x[finite][~ok[finite]][:5]
    assert torch.isnan(out[0]) and out[1] == float("inf") and out[2] == -float("inf")
    assert out[3] == 0 and torch.signbit(out[4])


@pytest.mark.parametrize("value", [1.0 + 2 ** -9, -3.0 - 2 ** -7, 1e-3])
def test_unbiased(value):
    n = 400_000
    x = torch.full((n,), value)
    out = torch.empty(n, dtype=BF16)
    ops.round_bf16_(out, x, 99, 0)
    # Each element lands on one of the two neighbours; the mean is value within 5 sigma.
    lo = (x.view(torch.int32) & ~0xFFFF).view(torch.float32)[0].item()
    hi = ((x.view(torch.int32) & ~0xFFFF) + 0x10000).view(torch.float32)[0].item()
    sigma = abs(hi - lo) / 2 / n ** 0.5
    assert abs(out.float().double().mean().item() - value) < 5 * sigma
    assert len(torch.unique(out.float())) == 2


def test_a_fragment_rounds_as_the_whole_tensor():
    x = awkward_values(10_000)
    whole = torch.empty(10_000, dtype=BF16)
    ops.round_bf16_(whole, x, 5, 0)
    for a, b in [(0, 1), (17, 4_321), (4_321, 10_000)]:
        part = torch.empty(b - a, dtype=BF16)
        ops.round_bf16_(part, x[a:b].contiguous(), 5, a)
        assert torch.equal(bits(part), bits(whole[a:b]))


def test_bad_arguments():
    """Argument checks live once, in the kernels; the reference checks only sizes."""
    if not ops.HAS_EXTENSION:
        pytest.skip("sage_dist._C is not built")
    fn = torch.ops.sage_dist.round_bf16_
    with pytest.raises(RuntimeError, match="src has 4 elements"):
        ops.reference.round_bf16_(torch.empty(3, dtype=BF16), torch.empty(4), 0, 0)
    with pytest.raises(RuntimeError, match="out has dtype .*; allowed: BFloat16"):
        fn(torch.empty(3), torch.empty(3), 0, 0)
    with pytest.raises(RuntimeError, match="src has dtype .*; allowed: Float"):
        fn(torch.empty(3, dtype=BF16), torch.empty(3, dtype=BF16), 0, 0)
    with pytest.raises(RuntimeError, match="src has 4 elements"):
        fn(torch.empty(3, dtype=BF16), torch.empty(4), 0, 0)
    with pytest.raises(RuntimeError, match="offset=-1 is invalid"):
        fn(torch.empty(3, dtype=BF16), torch.empty(3), 0, -1)


# ----------------------------------------------------------------------------- the engine
class Tiny(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Embedding(64, 32).to(dtype)
        self.proj = nn.Linear(32, 48, bias=False).to(dtype)
        self.norm = nn.LayerNorm(48).to(dtype)


def set_grads(model, step):
    g = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def test_small_updates_survive_only_with_stochastic_rounding():
    """Lion moves each weight by lr per step. With lr below half a bf16 step, nearest
    rounding keeps every weight at 1.0 forever; stochastic rounding moves them by lr on
    average (the expectation is exact: 100 steps of 1e-3 from 1.0 gives 0.9)."""
    results = {}
    for sr in (False, True):
        w = nn.Parameter(torch.ones(64, 64, dtype=BF16))
        opt = RoutedOptimizer([{"params": [w], "rule": "lion", "lr": 1e-3, "weight_decay": 0.0}],
                              stochastic_rounding=sr)
        for _ in range(100):
            w.grad = torch.ones_like(w)
            opt.step()
        results[sr] = w.float().mean().item()
    assert results[False] == 1.0
    assert abs(results[True] - 0.9) < 3e-3, results


@pytest.mark.parametrize("recipe", ["sage-hybrid", "lion", "scale"])
def test_bf16_state_is_the_fp32_step_rounded(recipe):
    """One step from zero state: the parameters match an fp32-state run exactly (the rule
    works on fp32 copies), and each bf16 state tensor is the fp32 state rounded to nearest."""
    torch.manual_seed(0)
    ref_model = Tiny()
    model = copy.deepcopy(ref_model)
    ref = build_optimizer(ref_model, recipe)
    opt = build_optimizer(model, recipe, state_dtype="bfloat16")
    set_grads(ref_model, 0)
    set_grads(model, 0)
    ref.step()
    opt.step()
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    low = 0
    for p_ref, p in zip(ref_model.parameters(), model.parameters()):
        for key, v in opt.state[p].items():
            v_ref = ref.state[p_ref][key]
            if v.dim() > 0 and v.numel() == p.numel():
                assert v.dtype == BF16
                assert torch.equal(bits(v), bits(v_ref.to(BF16)))
                low += 1
            else:
                assert v.dtype == torch.float32 and torch.equal(v, v_ref)
    assert low > 0
    assert opt.state_bytes()["elementwise"] * 2 == ref.state_bytes()["elementwise"]


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_stochastic_rounding_resumes_exactly(state_dtype):
    """The rounding seeds come from the step count saved with the optimizer, so a run
    resumed from a state_dict continues bit for bit."""
    torch.manual_seed(0)
    base = Tiny(BF16)
    kw = dict(state_dtype=state_dtype, stochastic_rounding=True, rounding_seed=7)

    def make(model):
        return build_optimizer(model, "sage-hybrid", **kw)

    straight = copy.deepcopy(base)
    opt = make(straight)
    for step in range(4):
        set_grads(straight, step)
        opt.step()

    first = copy.deepcopy(base)
    opt1 = make(first)
    for step in range(2):
        set_grads(first, step)
        opt1.step()
    saved = copy.deepcopy(opt1.state_dict())
    resumed = copy.deepcopy(first)
    opt2 = make(resumed)
    opt2.load_state_dict(saved)
    for step in range(2, 4):
        set_grads(resumed, step)
        opt2.step()
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(bits(a), bits(b))
    changed = sum(int((a != b).sum()) for a, b in zip(base.parameters(), straight.parameters()))
    assert changed > 0


def test_seed_changes_the_rounding():
    torch.manual_seed(0)
    base = Tiny(BF16)
    outs = []
    for seed in (1, 2):
        m = copy.deepcopy(base)
        opt = build_optimizer(m, "lion", stochastic_rounding=True, rounding_seed=seed, lr=1e-4)
        set_grads(m, 0)
        opt.step()
        outs.append(torch.cat([p.float().reshape(-1) for p in m.parameters()]))
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("kw, words", [
    (dict(state_dtype="fp16"), ["state_dtype='fp16'", "'float32', 'bfloat16'"]),
    (dict(state_dtype=torch.float16), ["state_dtype=torch.float16", "'bfloat16'"]),
    (dict(stochastic_rounding="yes"), ["stochastic_rounding='yes'", "True or False"]),
    (dict(rounding_seed=-1), ["rounding_seed=-1", "[0, 2**63)"]),
])
def test_bad_options_fail_before_anything(kw, words):
    model = Tiny()
    with pytest.raises(ValueError) as e:
        build_optimizer(model, "sage-hybrid", **kw)
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.skipif(not (torch.cuda.is_available() and ops.has_cuda_kernels()),
                    reason="needs a CUDA GPU and sage_dist._C built with its CUDA kernels")
def test_cuda_matches_reference_bitwise():
    x = awkward_values()
    out = torch.empty(x.numel(), dtype=BF16, device="cuda")
    torch.ops.sage_dist.round_bf16_(out, x.cuda(), 31337, 45)
    ref = torch.empty(x.numel(), dtype=BF16)
    ops.reference.round_bf16_(ref, x, 31337, 45)
    assert torch.equal(bits(out.cpu()), bits(ref))


def test_unnamed_groups_round_independently():
    """Hand-built groups without names give their parameters generated names that repeat
    from group to group ("group.params[0]"); their rounding must still be independent."""
    ws = [nn.Parameter(torch.ones(64, 64, dtype=BF16)) for _ in range(2)]
    opt = RoutedOptimizer([{"params": [w], "rule": "lion", "lr": 1e-3, "weight_decay": 0.0}
                           for w in ws], stochastic_rounding=True)
    for w in ws:
        w.grad = torch.ones_like(w)
    opt.step()
    assert not torch.equal(ws[0], ws[1])
