"""Kernel self-check: the first time an op's native kernel runs on a device type (per process),
it is compared once with its pure-PyTorch reference on a small input.

The input is a fragment of a [3, 5] matrix that starts and ends mid-row (flat elements
[2, 11)), plus a whole matrix for sinkhorn_scales, in fp32; the tolerance is the kernel tests'
(tests/test_kernels.py): within 1e-6 relative (+1e-9 absolute), bit for bit for round_bf16_,
and for sage_update_ a sign tie (the direction's argument within rounding of 0) is allowed.
On a mismatch the library warns once, naming the op and the device, and runs that op through
its reference on that device type from then on: correct numbers, slower, never silently wrong
ones. An op without a native kernel on the device is not checked (the dispatcher already runs
its reference). SAGE_DIST_SELF_CHECK=0 turns the check off. A check costs well under a
millisecond per op on CPU.

Imports nothing from the rest of sage_dist (only this package's schemas and references).
"""
from __future__ import annotations

import os
import warnings

import torch

from . import reference
from .schemas import has_kernel

ENV = "SAGE_DIST_SELF_CHECK"
RTOL, ATOL = 1e-6, 1e-9
R, C, START, END = 3, 5, 2, 11  # a fragment starting and ending mid-row
_RESULTS: dict[tuple[str, str], bool] = {}  # (op, device type) -> native kernel trusted
REPORTS: dict[tuple[str, str], str] = {}  # (op, device type) -> why it was not trusted


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip() != "0"


def _device_of(args) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0].device
    return torch.device("cpu")


def native_ok(name: str, args, packet) -> bool:
    """Whether `name`'s native kernel may run on the device of `args` (checking it the first
    time on this device type). False: call the reference instead."""
    device = _device_of(args)
    key = (name, device.type)
    ok = _RESULTS.get(key)
    if ok is not None:
        return ok
    if torch.compiler.is_compiling():  # never run the check while tracing ...
        return True
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return True  # ... or while a CUDA graph is captured (the check copies to the host)
    ok = True
    if enabled() and has_kernel(name, device.type):
        why = check(name, device, packet)
        if why is not None:
            ok = False
            REPORTS[key] = why
            warnings.warn(
                f"sage_dist: the native {device.type} kernel of sage_dist::{name} failed its "
                f"self-check against the pure-PyTorch reference ({why}); sage_dist uses the "
                f"reference for {name} on {device.type} from now on (correct, slower). Set "
                f"{ENV}=0 to skip the check.", RuntimeWarning, stacklevel=3)
    _RESULTS[key] = ok
    return ok


def reset() -> None:
    """Forget every result (tests): the next call of each op checks again."""
    _RESULTS.clear()
    REPORTS.clear()


# -- the inputs ------------------------------------------------------------------------------
def _inputs(device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(1234)
    n = END - START

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    t = dict(param=randn(n), grad=randn(n), m=0.1 * randn(n), r=torch.rand(R, generator=gen)
             + 0.5, c=torch.rand(C, generator=gen) + 0.5, h=torch.rand(C, generator=gen),
             param2=randn(n - 3), grad2=randn(n - 3), m2=0.1 * randn(n - 3),
             whole=randn(R * C), s=torch.tensor([0.0, 2.0, 0.5]),
             scale=torch.rand(R, generator=gen) + 0.5, src=randn(n) * 3)
    return {k: v.to(device) for k, v in t.items()}


def _cases(t: dict) -> dict:
    """op -> (args with fresh copies of what it writes, indices of the written arguments)."""
    cp = torch.Tensor.clone
    lion = (1e-2, 0.9, 0.99, 0.1)
    sage = (3e-2, 0.9, 0.99, 0.1)
    return {
        "lion_update_": lambda: ((cp(t["param"]), cp(t["m"]), t["grad"], *lion), (0, 1)),
        "lion_update_multi_": lambda: (([cp(t["param"]), cp(t["param2"])],
                                        [cp(t["m"]), cp(t["m2"])], [t["grad"], t["grad2"]],
                                        *lion), (0, 1)),
        "colsum_abs": lambda: ((t["grad"], C, START), ()),
        "sq_sums": lambda: ((t["grad"], t["r"], t["c"], R, C, START, 1, t["m"], 0.9), ()),
        "sage_update_": lambda: ((cp(t["param"]), cp(t["m"]), t["grad"], t["h"], C, START,
                                  *sage, True), (0, 1)),
        "scaled_update_": lambda: ((cp(t["param"]), t["grad"], t["r"], t["c"], C, START, 1e-2,
                                    0.1, 3e-2), (0,)),
        "momentum_scaled_update_": lambda: ((cp(t["param"]), cp(t["m"]), t["grad"], t["r"],
                                             t["c"], C, START, 0.9, 1e-2, 0.1, 3e-2), (0, 1)),
        "sinkhorn_rescale": lambda: ((t["scale"], t["s"], 1.5, 1e-8), ()),
        "sinkhorn_scales": lambda: ((t["whole"], R, C, 3, 1e-8, 1.0, 1.5), ()),
        "scaled_update_multi_": lambda: (([cp(t["param"]), cp(t["param2"])],
                                          [t["grad"], t["grad2"]], [t["r"], t["r"]],
                                          [t["c"], t["c"]], [C, C], [START, 0], 1e-2, 0.1,
                                          3e-2), (0,)),
        "sage_update_multi_": lambda: (([cp(t["param"]), cp(t["param2"])],
                                        [cp(t["m"]), cp(t["m2"])], [t["grad"], t["grad2"]],
                                        [t["h"], t["h"]], [C, C], [START, 0], *sage, False),
                                       (0, 1)),
        "colsum_abs_check": lambda: ((t["grad"], C, START), ()),
        "sinkhorn_sweep_": lambda: ((t["whole"][C:], cp(t["r"][1:]), t["c"], C, 1.5, 1e-8, True),
                                    (1,)),
        "sinkhorn_scales_multi_": lambda: (
            ([t["whole"], t["whole"][:R * 4]], [t["whole"].new_empty(R), t["whole"].new_empty(R)],
             [t["whole"].new_empty(C), t["whole"].new_empty(4)],
             [t["whole"].new_zeros(1), t["whole"].new_zeros(1)], [R, R], [C, 4], [1.0, 1.5],
             [1.5, 1.0], 3, 1e-8), (1, 2, 3)),
        "sinkhorn_update_multi_": lambda: (
            ([t["whole"].flip(0), t["whole"][:R * 4].flip(0)], [t["whole"], t["whole"][:R * 4]],
             [t["whole"].new_zeros(1), t["whole"].new_zeros(1)], [R, R], [C, 4], [1.0, 1.5],
             [1.5, 1.0], 3, 1e-8, 1e-2, 0.1, 3e-2), (0, 2)),
        "round_bf16_": lambda: ((torch.empty(END - START, dtype=torch.bfloat16,
                                             device=t["src"].device), t["src"], 77, START),
                                (0,)),
    }


def _flat(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _flat(item)]
    return []


def _mismatch(name: str, got: torch.Tensor, want: torch.Tensor, tie_ok) -> str | None:
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"shape/dtype {tuple(got.shape)} {got.dtype} vs {tuple(want.shape)} {want.dtype}"
    a, e = got.detach().cpu(), want.detach().cpu()
    if name == "round_bf16_":
        bad = a.view(torch.int16) != e.view(torch.int16)
    else:
        a, e = a.float(), e.float()
        bad = ~((a - e).abs() <= RTOL * e.abs() + ATOL)  # NaN counts as bad
    if tie_ok is not None:
        bad &= ~tie_ok
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0])
        return (f"{int(bad.sum())} of {bad.numel()} elements out of tolerance, e.g. element {i}: "
                f"{a.reshape(-1)[i].item()!r} vs reference {e.reshape(-1)[i].item()!r}")
    return None


def _sage_ties(t: dict, momentum_first: bool) -> torch.Tensor:
    """Elements whose SAGE direction argument is within rounding of 0 (a sign tie)."""
    g, m = t["grad"].cpu().float(), t["m"].cpu().float()
    if momentum_first:
        m = m * 0.99 + g * 0.01
    arg = m * 0.9 + g * 0.1
    return arg.abs() <= 1e-5 * (m.abs() + g.abs()) + 1e-12


def check(name: str, device: torch.device, packet) -> str | None:
    """None if `packet` (the dispatcher's op: the native kernel on `device`) agrees with the
    reference on the self-check input, else what differed."""
    t = _inputs(device)
    make = _cases(t)[name]
    ref = getattr(reference, name)
    with torch.no_grad():
        args_native, written = make()
        args_ref, _ = make()
        try:
            out_native = packet(*args_native)
        except Exception as e:  # noqa: BLE001 - a kernel that fails is not trusted either
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        out_ref = ref(*args_ref)
    got = _flat(out_native) + [x for i in written for x in _flat(args_native[i])]
    want = _flat(out_ref) + [x for i in written for x in _flat(args_ref[i])]
    if len(got) != len(want):
        return f"{len(got)} results vs the reference's {len(want)}"
    ties = None
    if name == "sage_update_":
        ties = _sage_ties(t, True)
    for k, (a, e) in enumerate(zip(got, want)):
        tie_ok = ties if (ties is not None and k == 0) else None  # param only, not m
        why = _mismatch(name, a, e, tie_ok)
        if why is not None:
            return why
    return None
