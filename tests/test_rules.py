"""Per-rule optimizer tests against an independent transcription of docs/ALGORITHMS.md §1-§5.

The reference implementations below are plain, per-tensor PyTorch written straight from
the spec (docs/ALGORITHMS.md).  Sinkhorn and SinkGD materialise X by normalising
rows and then columns L times; no factored form is used here on purpose.

Every test feeds the project's optimizer and the reference the same initial parameter and
the same gradient at every step; the reference keeps its own state.
"""

import math

import pytest
import torch

import sage_dist.optim as sd_optim

STEPS = 20
FP32_TOL = 1e-6            # max|diff| / max|ref| per parameter, every step
SIGN_FLIP_FRACTION = 1e-3  # bf16: allowed fraction of sign flips for sign-based rules

# --------------------------------------------------------------------------------------
# Defaults, from the spec / contract (not read from the implementation).
# --------------------------------------------------------------------------------------
SPEC_DEFAULTS = {
    "SAGE": dict(lr=2e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, momentum_first=True),
    "Sinkhorn": dict(lr=2e-3, weight_decay=0.01, sinkhorn_iters=5, sinkhorn_scale=10.0, eps=1e-8),
    "SinkGD": dict(lr=2e-2, weight_decay=0.0, sinkhorn_iters=5, linear_lr_scale=0.05, eps=1e-8),
    "ScaleDense": dict(lr=1e-3, weight_decay=0.0, floor=1e-8),
    "ScaleEmbedding": dict(lr=1e-3, weight_decay=0.0, floor=1e-8),
    "ScaleHead": dict(lr=1e-3, weight_decay=0.0, momentum=0.9, floor=1e-8),
    "ScaleAdamW": dict(lr=1e-3, adam_lr=None, adam_betas=(0.9, 0.999), adam_eps=1e-8, weight_decay=0.0),
    "Lion": dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.01),
    "AdamW": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
}

# Non-default hyperparameters: every value differs from its default, so a swapped or
# ignored hyperparameter changes the numbers.
NONDEFAULT = {
    "SAGE": dict(lr=5e-3, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1),
    "Sinkhorn": dict(lr=3e-3, weight_decay=0.1, sinkhorn_iters=2, sinkhorn_scale=4.0, eps=1e-3),
    "SinkGD": dict(lr=1e-2, weight_decay=0.1, sinkhorn_iters=2, linear_lr_scale=0.1, eps=1e-3),
    "ScaleDense": dict(lr=2e-3, weight_decay=0.1, floor=0.3),
    "ScaleEmbedding": dict(lr=2e-3, weight_decay=0.1, floor=0.3),
    "ScaleHead": dict(lr=2e-3, weight_decay=0.1, momentum=0.7, floor=0.3),
    "ScaleAdamW": dict(lr=1e-3, adam_lr=2e-2, adam_betas=(0.8, 0.95), adam_eps=1e-3, weight_decay=0.1),
    "Lion": dict(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1),
    "AdamW": dict(lr=2e-3, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1),
}

# State tensors the contract names, per rule (checked at construction, compared to the reference).
STATE_KEYS = {
    "SAGE": ("step", "m", "S"),
    "Sinkhorn": (),
    "SinkGD": (),
    "ScaleDense": (),
    "ScaleEmbedding": (),
    "ScaleHead": ("m",),
    "ScaleAdamW": ("step", "exp_avg", "exp_avg_sq"),
    "Lion": ("m",),
    "AdamW": ("step", "exp_avg", "exp_avg_sq"),
}

SIGN_RULES = ("SAGE", "Lion")
ALL_RULES = tuple(SPEC_DEFAULTS)


def _as2d(t):
    """Spec notation: a tensor with >2 dims is treated as [size(0), rest]."""
    return t.reshape(t.shape[0], -1)


# --------------------------------------------------------------------------------------
# Reference transcriptions.  step(theta, g, lr) takes fp32 tensors and the step's lr
# (after any schedule) and returns (new fp32 theta, aux); aux holds the pre-sign value and
# its magnitude scale for the sign-based rules, None otherwise.
# --------------------------------------------------------------------------------------
class RefSAGE:  # §1
    def __init__(self, shape, hp):
        self.b1, self.b2 = hp["betas"]
        self.eps = hp["eps"]
        self.wd = hp["weight_decay"]
        self.momentum_first = hp["momentum_first"]
        self.m = torch.zeros(shape, dtype=torch.float32)
        if len(shape) >= 2:
            C = math.prod(shape[1:])
            self.S = torch.zeros(C, dtype=torch.float32)
        else:
            self.S = torch.zeros(shape, dtype=torch.float32)
        self.t = 0

    def step(self, theta, g, lr):
        b1, b2, eps = self.b1, self.b2, self.eps
        self.t += 1
        t = self.t
        theta = theta * (1.0 - lr * self.wd)
        if g.dim() >= 2:
            g2 = _as2d(g)
            R = g2.shape[0]
            s = g2.abs().sum(dim=0) / R
        else:
            s = g.abs()
        self.S = b2 * self.S + (1.0 - b2) * s
        S_hat = self.S / (1.0 - b2 ** t)
        sigma = torch.sqrt(torch.mean(S_hat * S_hat))
        gamma = torch.sqrt(torch.mean(s * s))
        one = torch.ones_like(S_hat)
        H = torch.minimum(torch.minimum(sigma / (S_hat + eps), one), gamma / (s + eps))
        if self.momentum_first:
            self.m = b2 * self.m + (1.0 - b2) * g
            v = b1 * self.m + (1.0 - b1) * g
            scale = b1 * self.m.abs() + (1.0 - b1) * g.abs()
        else:
            v = b1 * self.m + (1.0 - b1) * g
            scale = b1 * self.m.abs() + (1.0 - b1) * g.abs()
            self.m = b2 * self.m + (1.0 - b2) * g
        u = torch.sign(v)
        if g.dim() >= 2:
            step = _as2d(u) * H.reshape(1, -1)
            theta = (_as2d(theta) - lr * step).reshape(theta.shape)
        else:
            theta = theta - lr * (u * H)
        return theta, dict(presign=v, scale=scale)

    def state(self):
        return {"step": self.t, "m": self.m, "S": self.S}


class RefSinkhorn:  # §2
    def __init__(self, shape, hp):
        self.L = hp["sinkhorn_iters"]
        self.kappa = hp["sinkhorn_scale"]
        self.eps = hp["eps"]
        self.wd = hp["weight_decay"]

    def step(self, theta, g, lr):
        theta = theta * (1.0 - lr * self.wd)
        X = _as2d(g).clone()
        for _ in range(self.L):
            row_norm = torch.sqrt((X * X).sum(dim=1, keepdim=True))
            X = X / (row_norm + self.eps)
            col_norm = torch.sqrt((X * X).sum(dim=0, keepdim=True))
            X = X / (col_norm + self.eps)
        theta = theta - (lr * self.kappa) * X.reshape(theta.shape)
        return theta, None

    def state(self):
        return {}


class RefSinkGD:  # §3
    def __init__(self, shape, hp):
        self.L = hp["sinkhorn_iters"]
        self.alpha = hp["linear_lr_scale"]
        self.eps = hp["eps"]
        self.wd = hp["weight_decay"]

    def step(self, theta, g, lr):
        X = _as2d(g).clone()
        R, C = X.shape
        for _ in range(self.L):
            row_norm = torch.sqrt((X * X).sum(dim=1, keepdim=True))
            X = math.sqrt(C) * X / (row_norm + self.eps)
            col_norm = torch.sqrt((X * X).sum(dim=0, keepdim=True))
            X = math.sqrt(R) * X / (col_norm + self.eps)
        theta = theta * (1.0 - lr * self.wd) - (self.alpha * lr) * X.reshape(theta.shape)
        return theta, None

    def state(self):
        return {}


class RefScaleDense:  # §4 dense weight: per output row RMS (over dim 1)
    def __init__(self, shape, hp):
        self.floor = hp["floor"]
        self.wd = hp["weight_decay"]

    def step(self, theta, g, lr):
        s = torch.sqrt(torch.mean(g * g, dim=1))
        u = g / torch.clamp(s, min=self.floor)[:, None]
        theta = theta * (1.0 - lr * self.wd) - lr * u
        return theta, None

    def state(self):
        return {}


class RefScaleEmbedding:  # §4 embedding: per feature column RMS (over dim 0)
    def __init__(self, shape, hp):
        self.floor = hp["floor"]
        self.wd = hp["weight_decay"]

    def step(self, theta, g, lr):
        s = torch.sqrt(torch.mean(g * g, dim=0))
        u = g / torch.clamp(s, min=self.floor)[None, :]
        theta = theta * (1.0 - lr * self.wd) - lr * u
        return theta, None

    def state(self):
        return {}


class RefScaleHead:  # §4 last layer: momentum, then per vocab row RMS of m
    def __init__(self, shape, hp):
        self.beta = hp["momentum"]
        self.floor = hp["floor"]
        self.wd = hp["weight_decay"]
        self.m = torch.zeros(shape, dtype=torch.float32)

    def step(self, theta, g, lr):
        self.m = self.beta * self.m + (1.0 - self.beta) * g
        s = torch.sqrt(torch.mean(self.m * self.m, dim=1))
        u = self.m / torch.clamp(s, min=self.floor)[:, None]
        theta = theta * (1.0 - lr * self.wd) - lr * u
        return theta, None

    def state(self):
        return {"m": self.m}


class RefScaleAdamW:  # §4 1-D rule
    def __init__(self, shape, hp):
        self.b1, self.b2 = hp["adam_betas"]
        self.eps = hp["adam_eps"]
        self.wd = hp["weight_decay"]
        self.peak_lr = hp["lr"]  # the group's lr at construction
        self.adam_lr = hp["adam_lr"] if hp["adam_lr"] is not None else hp["lr"]
        self.m1 = torch.zeros(shape, dtype=torch.float32)
        self.m2 = torch.zeros(shape, dtype=torch.float32)
        self.t = 0

    def step(self, theta, g, lr):
        b1, b2 = self.b1, self.b2
        self.m1 = b1 * self.m1 + (1.0 - b1) * g
        self.m2 = b2 * self.m2 + (1.0 - b2) * g * g
        self.t += 1
        t = self.t
        eta1 = self.adam_lr * (lr / self.peak_lr)
        corr = math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
        theta = theta * (1.0 - eta1 * self.wd) - eta1 * corr * self.m1 / (torch.sqrt(self.m2) + self.eps)
        return theta, None

    def state(self):
        return {"step": self.t, "exp_avg": self.m1, "exp_avg_sq": self.m2}


class RefLion:  # §5
    def __init__(self, shape, hp):
        self.b1, self.b2 = hp["betas"]
        self.wd = hp["weight_decay"]
        self.m = torch.zeros(shape, dtype=torch.float32)

    def step(self, theta, g, lr):
        b1, b2 = self.b1, self.b2
        theta = theta * (1.0 - lr * self.wd)
        v = b1 * self.m + (1.0 - b1) * g
        scale = b1 * self.m.abs() + (1.0 - b1) * g.abs()
        u = torch.sign(v)
        theta = theta - lr * u
        self.m = b2 * self.m + (1.0 - b2) * g
        return theta, dict(presign=v, scale=scale)

    def state(self):
        return {"m": self.m}


class RefAdamW:  # torch.optim.AdamW semantics (eps after the bias-corrected sqrt)
    def __init__(self, shape, hp):
        self.b1, self.b2 = hp["betas"]
        self.eps = hp["eps"]
        self.wd = hp["weight_decay"]
        self.m1 = torch.zeros(shape, dtype=torch.float32)
        self.m2 = torch.zeros(shape, dtype=torch.float32)
        self.t = 0

    def step(self, theta, g, lr):
        b1, b2 = self.b1, self.b2
        self.t += 1
        t = self.t
        theta = theta * (1.0 - lr * self.wd)
        self.m1 = b1 * self.m1 + (1.0 - b1) * g
        self.m2 = b2 * self.m2 + (1.0 - b2) * g * g
        bc1 = 1.0 - b1 ** t
        bc2 = 1.0 - b2 ** t
        denom = torch.sqrt(self.m2) / math.sqrt(bc2) + self.eps
        theta = theta - (lr / bc1) * self.m1 / denom
        return theta, None

    def state(self):
        return {"step": self.t, "exp_avg": self.m1, "exp_avg_sq": self.m2}


REFS = {
    "SAGE": RefSAGE,
    "Sinkhorn": RefSinkhorn,
    "SinkGD": RefSinkGD,
    "ScaleDense": RefScaleDense,
    "ScaleEmbedding": RefScaleEmbedding,
    "ScaleHead": RefScaleHead,
    "ScaleAdamW": RefScaleAdamW,
    "Lion": RefLion,
    "AdamW": RefAdamW,
}

# A shape each rule is defined on (ScaleAdamW is the 1-D rule).
DEFAULT_SHAPE = {r: (37, 23) for r in ALL_RULES}
DEFAULT_SHAPE["ScaleAdamW"] = (41,)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------
def _cls(rule):
    return getattr(sd_optim, rule)


def _full_hp(rule, kwargs):
    hp = dict(SPEC_DEFAULTS[rule])
    hp.update(kwargs)
    return hp


def make_grad(shape, gen, kind="dense"):
    """Random gradient with varied row/column/global scales (so dampers, floors and
    normalisations all matter).  kind='embed': ~90 % of rows exactly zero."""
    g = torch.randn(shape, generator=gen)
    if len(shape) >= 2:
        R = shape[0]
        row = torch.exp(0.7 * torch.randn(R, generator=gen)).reshape(R, *([1] * (len(shape) - 1)))
        col = torch.exp(0.7 * torch.randn(shape[1:], generator=gen)).unsqueeze(0)
        g = g * row * col
    else:
        g = g * torch.exp(0.7 * torch.randn(shape, generator=gen))
    g = g * float(torch.exp(0.5 * torch.randn((), generator=gen)))
    if kind == "embed":
        keep = torch.rand(shape[0], generator=gen) < 0.1
        keep[int(torch.randint(shape[0], (), generator=gen))] = True
        g[~keep] = 0.0
    elif kind == "zero":
        g = torch.zeros(shape)
    return g


def rel_err(actual, expected):
    a = actual.detach().float().reshape(-1)
    e = expected.detach().float().reshape(-1)
    diff = (a - e).abs().max().item() if a.numel() else 0.0
    denom = e.abs().max().item() if e.numel() else 0.0
    return diff, denom


def assert_rel_close(actual, expected, what, tol=FP32_TOL):
    assert actual.numel() == expected.numel(), f"{what}: numel {actual.numel()} != {expected.numel()}"
    diff, denom = rel_err(actual, expected)
    assert diff <= tol * denom, (
        f"{what}: max|diff|={diff:.4e} max|ref|={denom:.4e} rel={diff / max(denom, 1e-45):.3e} > {tol:g}")


def bf16_ordinal(x):
    """Monotone integer position of each bf16 value (so |ord(a)-ord(b)| is the ulp distance)."""
    b = x.detach().contiguous().view(torch.int16).to(torch.int32)
    return torch.where(b < 0, -(b & 0x7FFF), b)


def compare_state(rule, opt, p, ref, what):
    st = opt.state[p]
    for key, val in ref.state().items():
        assert key in st, f"{what}: state key {key!r} missing"
        if key == "step":
            assert float(st[key]) == float(val), f"{what}: step {float(st[key])} != {val}"
        else:
            assert st[key].dtype == torch.float32, f"{what}: state {key} dtype {st[key].dtype}"
            assert_rel_close(st[key], val, f"{what} state {key}")


def lr_factor(k):
    """LR schedule factor for step k (1 at step 0; goes down and up again)."""
    return 1.0 if k == 0 else 0.25 + 0.75 * abs(math.cos(0.4 * k))


def run_fp32(rule, kwargs, shape, *, seed=0, kinds=None, schedule=False, steps=STEPS):
    """Run the optimizer and the reference side by side in fp32, compare every step."""
    torch.manual_seed(seed)
    hp = _full_hp(rule, kwargs)
    p0 = 0.05 * torch.randn(shape)
    p = torch.nn.Parameter(p0.clone())
    opt = _cls(rule)([p], **kwargs)
    ref = REFS[rule](tuple(shape), hp)
    theta = p0.clone()
    gen = torch.Generator().manual_seed(seed + 1000)
    peak = opt.param_groups[0]["lr"]
    assert peak == hp["lr"]
    for k in range(steps):
        kind = kinds[k] if kinds is not None else "dense"
        g = make_grad(shape, gen, kind)
        lr = peak * lr_factor(k) if schedule else peak
        opt.param_groups[0]["lr"] = lr
        p.grad = g.clone()
        opt.step()
        theta, _ = ref.step(theta, g.clone(), lr)
        what = f"{rule} {kwargs} shape={tuple(shape)} step {k + 1}"
        assert torch.isfinite(p).all(), f"{what}: non-finite parameter"
        assert_rel_close(p, theta, what)
        compare_state(rule, opt, p, ref, what)
    return opt, p


def run_bf16(rule, kwargs, shape, *, seed=0, steps=STEPS):
    """bf16 parameter.  Each step the reference starts from the optimizer's current bf16
    parameter, computes in fp32 with its own fp32 state, writes back to bf16; the two bf16
    results may differ by at most 1 ulp, except (sign rules) at sign flips of a pre-sign
    value that is within rounding of zero."""
    torch.manual_seed(seed)
    hp = _full_hp(rule, kwargs)
    p = torch.nn.Parameter((0.05 * torch.randn(shape)).to(torch.bfloat16))
    opt = _cls(rule)([p], **kwargs)
    ref = REFS[rule](tuple(shape), hp)
    gen = torch.Generator().manual_seed(seed + 1000)
    lr = opt.param_groups[0]["lr"]
    flips = 0
    for k in range(steps):
        g = make_grad(shape, gen).to(torch.bfloat16)
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        assert p.dtype == torch.bfloat16
        new32, aux = ref.step(before.float(), g.float(), lr)
        expect = new32.to(torch.bfloat16)
        ulps = (bf16_ordinal(p) - bf16_ordinal(expect)).abs()
        bad = ulps > 1
        what = f"{rule} bf16 {kwargs} shape={tuple(shape)} step {k + 1}"
        if bad.any():
            assert aux is not None, (
                f"{what}: {int(bad.sum())} elements differ by >1 bf16 ulp (max {int(ulps.max())} ulps); "
                f"first: got {p.detach()[bad][:5].tolist()} want {expect[bad][:5].tolist()}")
            near_zero = aux["presign"].abs() <= 1e-5 * aux["scale"]
            not_flip = bad & ~near_zero
            assert not not_flip.any(), (
                f"{what}: {int(not_flip.sum())} elements differ by >1 ulp and are not sign flips "
                f"(max {int(ulps[not_flip].max())} ulps); got {p.detach()[not_flip][:5].tolist()} "
                f"want {expect[not_flip][:5].tolist()}")
            flips += int(bad.sum())
        compare_state_bf16 = {k2: v for k2, v in ref.state().items()}
        for key, val in compare_state_bf16.items():
            st = opt.state[p][key]
            if key == "step":
                assert float(st) == float(val), f"{what}: step"
            else:
                assert st.dtype == torch.float32, f"{what}: state {key} dtype {st.dtype}"
                assert_rel_close(st, val, f"{what} state {key}")
    total = p.numel() * steps
    if rule in SIGN_RULES:
        print(f"[bf16 {rule} {kwargs} {tuple(shape)}] sign flips: {flips} of {total} element-steps")
    assert flips < SIGN_FLIP_FRACTION * total, f"{rule}: {flips} sign flips of {total}"


# --------------------------------------------------------------------------------------
# fp32 comparisons, 20 steps, every rule
# --------------------------------------------------------------------------------------
SAGE_SHAPES = [(37, 23), (8, 5, 3), (41,)]


@pytest.mark.parametrize("shape", SAGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("momentum_first", [True, False])
@pytest.mark.parametrize("hp", ["default", "nondefault"])
def test_sage_fp32(shape, momentum_first, hp):
    kwargs = dict(NONDEFAULT["SAGE"]) if hp == "nondefault" else {}
    if not momentum_first or hp == "nondefault":
        kwargs["momentum_first"] = momentum_first
    run_fp32("SAGE", kwargs, shape, seed=11, schedule=(hp == "nondefault"))


OTHER_CASES = [
    ("Sinkhorn", (37, 23)), ("Sinkhorn", (23, 37)),
    ("SinkGD", (37, 23)), ("SinkGD", (23, 37)),
    ("ScaleDense", (37, 23)),
    ("ScaleEmbedding", (37, 23)),
    ("ScaleHead", (37, 23)),
    ("ScaleAdamW", (41,)),
    ("Lion", (37, 23)), ("Lion", (41,)),
    ("AdamW", (37, 23)), ("AdamW", (41,)),
]


@pytest.mark.parametrize("rule,shape", OTHER_CASES, ids=lambda x: x if isinstance(x, str) else "x".join(map(str, x)))
@pytest.mark.parametrize("hp", ["default", "nondefault"])
def test_rule_fp32(rule, shape, hp):
    kwargs = dict(NONDEFAULT[rule]) if hp == "nondefault" else {}
    run_fp32(rule, kwargs, shape, seed=7, schedule=(hp == "nondefault"))


@pytest.mark.parametrize("rule,shape", [("SAGE", (37, 23)), ("SAGE", (41,))] + OTHER_CASES,
                         ids=lambda x: x if isinstance(x, str) else "x".join(map(str, x)))
def test_package_oracle_matches_the_transcription(rule, shape):
    """sage_dist.optim.reference (the oracle every sharded and fused path is tested against)
    equals this file's independent transcription of the spec, step after step."""
    from sage_dist.optim import reference as oracle

    torch.manual_seed(5)
    kwargs = dict(NONDEFAULT[rule])
    hp = _full_hp(rule, kwargs)
    p0 = 0.05 * torch.randn(shape)
    group = _cls(rule)([torch.nn.Parameter(p0.clone())], **kwargs).param_groups[0]
    ref = REFS[rule](tuple(shape), hp)
    theta, mine = p0.clone(), p0.clone()
    state = oracle.init_state(group["rule"], mine)
    gen = torch.Generator().manual_seed(77)
    for k in range(10):
        g = make_grad(shape, gen)
        oracle.step(group["rule"], mine, g.clone(), state, group)
        theta, _ = ref.step(theta, g.clone(), group["lr"])
        assert_rel_close(mine, theta, f"oracle {rule} {tuple(shape)} step {k + 1}")


@pytest.mark.parametrize("kwargs", [dict(), dict(adam_lr=2e-2, weight_decay=0.1)],
                         ids=["adam_lr_none", "adam_lr_2e-2"])
def test_scale_adamw_lr_follows_schedule(kwargs):
    """eta_1 = adam_lr * group['lr'] / peak_lr with group['lr'] edited between steps."""
    opt, _ = run_fp32("ScaleAdamW", kwargs, (41,), seed=3, schedule=True)
    assert opt.param_groups[0]["peak_lr"] == SPEC_DEFAULTS["ScaleAdamW"]["lr"]


def test_scale_adamw_peak_lr_is_construction_lr():
    p = torch.nn.Parameter(torch.randn(5))
    opt = sd_optim.ScaleAdamW([p], lr=3e-3, adam_lr=1e-2)
    assert opt.param_groups[0]["peak_lr"] == 3e-3


@pytest.mark.parametrize("hp", ["default", "nondefault"])
def test_adamw_matches_torch(hp):
    kwargs = dict(NONDEFAULT["AdamW"]) if hp == "nondefault" else {}
    torch.manual_seed(5)
    shapes = [(37, 23), (41,)]
    init = [0.05 * torch.randn(s) for s in shapes]
    ps = [torch.nn.Parameter(t.clone()) for t in init]
    qs = [torch.nn.Parameter(t.clone()) for t in init]
    opt = sd_optim.AdamW(ps, **kwargs)
    topt = torch.optim.AdamW(qs, **kwargs)
    gen = torch.Generator().manual_seed(6)
    for k in range(STEPS):
        for p, q, s in zip(ps, qs, shapes):
            g = make_grad(s, gen)
            p.grad = g.clone()
            q.grad = g.clone()
        lr = kwargs.get("lr", 1e-3) * lr_factor(k)
        opt.param_groups[0]["lr"] = lr
        topt.param_groups[0]["lr"] = lr
        opt.step()
        topt.step()
        for p, q in zip(ps, qs):
            assert_rel_close(p, q, f"AdamW vs torch.optim.AdamW {hp} step {k + 1}")
            assert_rel_close(opt.state[p]["exp_avg"], topt.state[q]["exp_avg"], "exp_avg")
            assert_rel_close(opt.state[p]["exp_avg_sq"], topt.state[q]["exp_avg_sq"], "exp_avg_sq")
            assert float(opt.state[p]["step"]) == float(topt.state[q]["step"])


# --------------------------------------------------------------------------------------
# bf16 parameters
# --------------------------------------------------------------------------------------
BF16_CASES = (
    [("SAGE", dict(momentum_first=mf), s) for mf in (True, False) for s in SAGE_SHAPES]
    + [("SAGE", dict(NONDEFAULT["SAGE"]), (37, 23))]
    + [(r, {}, DEFAULT_SHAPE[r]) for r in ALL_RULES if r != "SAGE"]
    + [("Lion", dict(NONDEFAULT["Lion"]), (37, 23)), ("ScaleAdamW", dict(NONDEFAULT["ScaleAdamW"]), (41,))]
)


@pytest.mark.parametrize("rule,kwargs,shape", BF16_CASES,
                         ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(BF16_CASES)])
def test_rule_bf16(rule, kwargs, shape):
    run_bf16(rule, kwargs, shape, seed=21)


# --------------------------------------------------------------------------------------
# Embedding-shaped gradients with ~90 % zero rows
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule,kwargs", [
    ("SAGE", {}),
    ("SAGE", dict(momentum_first=False)),
    ("SAGE", dict(NONDEFAULT["SAGE"])),
    ("Sinkhorn", {}),
    ("Sinkhorn", dict(NONDEFAULT["Sinkhorn"])),
    ("ScaleEmbedding", {}),
    ("ScaleEmbedding", dict(NONDEFAULT["ScaleEmbedding"])),
], ids=["SAGE", "SAGE-lion-order", "SAGE-nondefault", "Sinkhorn", "Sinkhorn-nondefault",
        "ScaleEmbedding", "ScaleEmbedding-nondefault"])
def test_sparse_rows_embedding_grad(rule, kwargs):
    run_fp32(rule, kwargs, (200, 16), seed=13, kinds=["embed"] * STEPS)


# --------------------------------------------------------------------------------------
# Zero gradients: no NaN/Inf anywhere, and still equal to the reference
# --------------------------------------------------------------------------------------
ZERO_CASES = (
    [(r, DEFAULT_SHAPE[r]) for r in ALL_RULES]
    + [("SAGE", (41,)), ("SAGE", (8, 5, 3)), ("Lion", (41,)), ("AdamW", (41,))]
)


@pytest.mark.parametrize("rule,shape", ZERO_CASES, ids=[f"{r}-{'x'.join(map(str, s))}" for r, s in ZERO_CASES])
def test_zero_gradients_finite(rule, shape):
    kinds = ["zero"] * 3 + ["dense"] * 3 + ["zero"] * 3
    opt, p = run_fp32(rule, {}, shape, seed=17, kinds=kinds, steps=len(kinds))
    assert torch.isfinite(p).all()
    for key, val in opt.state[p].items():
        if torch.is_tensor(val):
            assert torch.isfinite(val).all(), f"{rule}: state {key} not finite"


@pytest.mark.parametrize("rule", ALL_RULES)
def test_zero_gradients_from_start_finite_bf16(rule):
    shape = DEFAULT_SHAPE[rule]
    p = torch.nn.Parameter(torch.randn(shape).to(torch.bfloat16))
    opt = _cls(rule)([p])
    for _ in range(3):
        p.grad = torch.zeros_like(p)
        opt.step()
        assert torch.isfinite(p.float()).all()
        for key, val in opt.state[p].items():
            if torch.is_tensor(val):
                assert torch.isfinite(val.float()).all(), f"{rule}: state {key} not finite"


# --------------------------------------------------------------------------------------
# State: created at construction, shapes and dtypes from the contract
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SAGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sage_state_at_construction(shape, dtype):
    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    opt = sd_optim.SAGE([p])
    assert p in opt.state, "SAGE state must exist right after construction"
    st = opt.state[p]
    assert set(STATE_KEYS["SAGE"]) <= set(st), f"state keys {sorted(st)}"
    assert torch.is_tensor(st["step"]) and st["step"].dtype == torch.float32 and st["step"].numel() == 1
    assert float(st["step"]) == 0.0
    assert st["m"].shape == p.shape and st["m"].dtype == torch.float32
    assert torch.count_nonzero(st["m"]) == 0
    if len(shape) >= 2:
        C = math.prod(shape[1:])
        assert tuple(st["S"].shape) == (C,), f"S shape {tuple(st['S'].shape)}, want ({C},)"
    else:
        assert st["S"].shape == p.shape
    assert st["S"].dtype == torch.float32
    assert torch.count_nonzero(st["S"]) == 0
    assert opt.nonfinite_count == 0


@pytest.mark.parametrize("rule", [r for r in ALL_RULES if STATE_KEYS[r]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_at_construction(rule, dtype):
    shape = DEFAULT_SHAPE[rule]
    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    opt = _cls(rule)([p])
    assert p in opt.state, f"{rule}: state must exist right after construction"
    st = opt.state[p]
    for key in STATE_KEYS[rule]:
        assert key in st, f"{rule}: missing state {key!r} (has {sorted(st)})"
        if key == "step":
            assert float(st[key]) == 0.0
        elif not (rule == "SAGE" and key == "S"):
            assert st[key].shape == p.shape, f"{rule}: {key} shape {tuple(st[key].shape)}"
            assert st[key].dtype == torch.float32, f"{rule}: {key} dtype {st[key].dtype}"
            assert torch.count_nonzero(st[key]) == 0


@pytest.mark.parametrize("rule", ALL_RULES)
def test_constructor_defaults_match_spec(rule):
    p = torch.nn.Parameter(torch.randn(DEFAULT_SHAPE[rule]))
    opt = _cls(rule)([p])
    group = opt.param_groups[0]
    for key, want in SPEC_DEFAULTS[rule].items():
        if key == "adam_lr":
            continue  # None may be stored as None or resolved to lr
        assert key in group, f"{rule}: group has no {key!r}"
        got = group[key]
        if isinstance(want, tuple):
            got = tuple(got)
        assert got == want, f"{rule}: default {key}={got!r}, spec says {want!r}"
    assert group.get("nonfinite", "skip") == "skip"


@pytest.mark.parametrize("rule", ["SAGE", "Sinkhorn", "Lion", "AdamW", "ScaleDense"])
def test_param_group_overrides(rule):
    """Two groups with different hyperparameters in one optimizer; each follows its own."""
    torch.manual_seed(31)
    shape = (37, 23)
    hp_a = {}
    hp_b = {k: v for k, v in NONDEFAULT[rule].items()}
    init = [0.05 * torch.randn(shape), 0.05 * torch.randn(shape)]
    pa = torch.nn.Parameter(init[0].clone())
    pb = torch.nn.Parameter(init[1].clone())
    opt = _cls(rule)([{"params": [pa], **hp_a}, {"params": [pb], **hp_b}])
    refs = [REFS[rule](shape, _full_hp(rule, hp_a)), REFS[rule](shape, _full_hp(rule, hp_b))]
    thetas = [init[0].clone(), init[1].clone()]
    lrs = [_full_hp(rule, hp_a)["lr"], _full_hp(rule, hp_b)["lr"]]
    gen = torch.Generator().manual_seed(32)
    for k in range(8):
        ga, gb = make_grad(shape, gen), make_grad(shape, gen)
        pa.grad, pb.grad = ga.clone(), gb.clone()
        opt.step()
        for i, (p, g) in enumerate(((pa, ga), (pb, gb))):
            thetas[i], _ = refs[i].step(thetas[i], g, lrs[i])
            assert_rel_close(p, thetas[i], f"{rule} group {i} step {k + 1}")


# --------------------------------------------------------------------------------------
# Non-finite gradients
# --------------------------------------------------------------------------------------
def _snapshot_state(opt, p):
    out = {}
    for k, v in opt.state[p].items():
        out[k] = v.detach().clone() if torch.is_tensor(v) else v
    return out


def _assert_state_identical(opt, p, snap, what):
    st = opt.state[p]
    assert set(st) == set(snap), f"{what}: state keys changed {sorted(snap)} -> {sorted(st)}"
    for k, v in snap.items():
        if torch.is_tensor(v):
            assert torch.equal(st[k], v), f"{what}: state {k} changed"
        else:
            assert st[k] == v, f"{what}: state {k} changed"


def _two_params(rule, seed):
    torch.manual_seed(seed)
    shape = DEFAULT_SHAPE[rule]
    good = torch.nn.Parameter(0.05 * torch.randn(shape))
    bad = torch.nn.Parameter(0.05 * torch.randn(shape))
    return shape, good, bad


# Weight decay on for every rule so that "untouched" is a real check.
WD = {"weight_decay": 0.1}


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("rule", ALL_RULES)
def test_nonfinite_skip(rule, bad_value):
    shape, good, bad = _two_params(rule, 41)
    opt = _cls(rule)([good, bad], **WD)
    assert opt.nonfinite_count == 0
    gen = torch.Generator().manual_seed(42)
    for _ in range(2):  # build up some state first
        good.grad = make_grad(shape, gen)
        bad.grad = make_grad(shape, gen)
        opt.step()
    assert opt.nonfinite_count == 0
    bad_before = bad.detach().clone()
    good_before = good.detach().clone()
    snap = _snapshot_state(opt, bad)
    g = make_grad(shape, gen)
    g.view(-1)[3] = bad_value
    bad.grad = g
    good.grad = make_grad(shape, gen)
    opt.step()
    assert torch.equal(bad.detach(), bad_before), f"{rule}: param with non-finite grad changed"
    _assert_state_identical(opt, bad, snap, rule)
    assert not torch.equal(good.detach(), good_before), f"{rule}: the other param did not update"
    assert torch.isfinite(good).all()
    assert opt.nonfinite_count == 1
    # a second bad step increments again; a later good step updates normally
    bad.grad = g.clone()
    good.grad = make_grad(shape, gen)
    opt.step()
    assert opt.nonfinite_count == 2
    assert torch.equal(bad.detach(), bad_before)
    bad.grad = make_grad(shape, gen)
    good.grad = make_grad(shape, gen)
    opt.step()
    assert opt.nonfinite_count == 2
    assert not torch.equal(bad.detach(), bad_before)
    assert torch.isfinite(bad).all()


@pytest.mark.parametrize("rule", ALL_RULES)
def test_nonfinite_raise(rule):
    shape, good, bad = _two_params(rule, 43)
    # the bad parameter comes last, so a rule that updates params one by one before
    # checking would already have changed the good one
    opt = _cls(rule)([good, bad], nonfinite="raise", **WD)
    gen = torch.Generator().manual_seed(44)
    for _ in range(2):
        good.grad = make_grad(shape, gen)
        bad.grad = make_grad(shape, gen)
        opt.step()
    befores = [good.detach().clone(), bad.detach().clone()]
    snaps = [_snapshot_state(opt, good), _snapshot_state(opt, bad)]
    good.grad = make_grad(shape, gen)
    g = make_grad(shape, gen)
    g.view(-1)[0] = float("nan")
    bad.grad = g
    with pytest.raises(FloatingPointError):
        opt.step()
    for p, b, s, name in zip((good, bad), befores, snaps, ("good", "bad")):
        assert torch.equal(p.detach(), b), f"{rule}: {name} param changed although step raised"
        _assert_state_identical(opt, p, s, f"{rule} {name}")


# --------------------------------------------------------------------------------------
# grad None and sparse grads
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ALL_RULES)
def test_grad_none_skipped(rule):
    shape, with_grad, no_grad = _two_params(rule, 51)
    opt = _cls(rule)([no_grad, with_grad], **WD)
    snap = _snapshot_state(opt, no_grad) if no_grad in opt.state else None
    before = no_grad.detach().clone()
    before_other = with_grad.detach().clone()
    gen = torch.Generator().manual_seed(52)
    for _ in range(3):
        with_grad.grad = make_grad(shape, gen)
        assert no_grad.grad is None
        opt.step()
    assert torch.equal(no_grad.detach(), before), f"{rule}: param with grad None changed"
    if snap is not None:
        _assert_state_identical(opt, no_grad, snap, rule)
    assert not torch.equal(with_grad.detach(), before_other)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_sparse_grad_raises(rule):
    shape = DEFAULT_SHAPE[rule]
    p = torch.nn.Parameter(torch.randn(shape))
    opt = _cls(rule)([p])
    g = torch.zeros(shape)
    g.view(-1)[:5] = 1.0
    p.grad = g.to_sparse()
    with pytest.raises(RuntimeError):
        opt.step()


def test_sparse_embedding_backward_raises():
    emb = torch.nn.Embedding(50, 8, sparse=True)
    opt = sd_optim.SAGE(emb.parameters())
    emb(torch.tensor([1, 2, 3])).sum().backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises(RuntimeError):
        opt.step()
