"""sage_dist's custom ops: `torch.ops.sage_dist.<name>`, with one Python function per op.

    schemas.py    every schema, once; the references as the dispatcher's default; fake kernels
    reference.py  the pure-PyTorch reference of each op (the oracle and the fallback)
    span.py       the geometry of a fragment (a range of a row-major matrix)
    csrc/         the native kernels, registered per device (CPU always, CUDA when built)

The functions here call the dispatcher, which picks the native kernel of the tensors' device
or falls back to the reference. Inside `with force_reference():` they call the references
directly (what the step benchmark's "reference" row measures). Scalars are converted to the
schema's types, and in-place ops run under no_grad (an optimizer update is never part of a
graph). This package imports nothing from the rest of sage_dist.
"""
from __future__ import annotations

import contextlib

import torch

from . import reference, selfcheck
from .schemas import EXTENSION_ERROR, HAS_EXTENSION, SCHEMAS, has_kernel  # noqa: F401

_FORCE_REFERENCE = False  # a plain global: torch.compile traces through it (a guard)


@contextlib.contextmanager
def force_reference(enabled: bool = True):
    """Run every op through its pure-PyTorch reference while active."""
    global _FORCE_REFERENCE
    old, _FORCE_REFERENCE = _FORCE_REFERENCE, bool(enabled)
    try:
        yield
    finally:
        _FORCE_REFERENCE = old


def has_cuda_kernels() -> bool:
    """True when sage_dist._C was compiled with its CUDA kernels."""
    return has_kernel("lion_update_", "cuda")


def _native_library():
    """ctypes handle of the loaded sage_dist._C (the same library: its state is shared)."""
    global _LIB
    if _LIB is None and HAS_EXTENSION:
        import ctypes

        from .. import _C

        _LIB = ctypes.CDLL(_C.__file__)
        _LIB.sage_dist_cpu_isa.restype = ctypes.c_char_p
        _LIB.sage_dist_set_cpu_isa.argtypes = [ctypes.c_char_p]
    return _LIB


_LIB = None
CPU_ISAS = ("avx512", "avx2", "generic")


def cpu_isa() -> str | None:
    """The vector ISA the CPU kernels' hot loops run with ('avx512', 'avx2' or 'generic',
    chosen at run time for this CPU; csrc/cpu/isa.h), None without the native library."""
    lib = _native_library()
    return lib.sage_dist_cpu_isa().decode() if lib is not None else None


def set_cpu_isa(name: str) -> str:
    """Run the CPU hot loops with `name` ('auto' or one of CPU_ISAS) from now on, in this
    process (all give the same numbers; tests and benchmarks compare them). Returns the one in
    use; ValueError if this CPU (or build) lacks it."""
    lib = _native_library()
    if lib is None:
        raise RuntimeError(f"sage_dist._C is not loaded ({EXTENSION_ERROR})")
    if lib.sage_dist_set_cpu_isa(str(name).encode()) != 0:
        raise ValueError(f"cpu isa {name!r} is not available here: allowed are 'auto' and "
                         f"those this CPU supports among {', '.join(CPU_ISAS)}")
    return cpu_isa()


_CASTS = {"float": float, "int": int, "bool": bool,  # keyed by str(argument.type)
          "List[int]": lambda xs: [int(x) for x in xs], "List[Tensor]": list}


def _public(name: str):
    packet = getattr(torch.ops.sage_dist, name)
    native = packet.default  # the only overload: calling it skips the packet's resolution
    ref = getattr(reference, name)
    schema = native._schema
    names = [a.name for a in schema.arguments]
    casts = [_CASTS.get(str(a.type)) for a in schema.arguments]
    mutates = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)

    def call(*args, **kwargs):
        if kwargs:  # by name, as the schema names them; trailing defaults stay the op's
            args += tuple(kwargs.pop(n) for n in names[len(args):] if n in kwargs)
            if kwargs:
                raise TypeError(f"sage_dist.ops.{name}() got unexpected or out-of-order "
                                f"arguments {sorted(kwargs)}; its schema is {schema}")
        args = tuple(a if f is None or a is None else f(a) for f, a in zip(casts, args))
        fn = ref if _FORCE_REFERENCE or not selfcheck.native_ok(name, args, packet) \
            else native  # a native kernel that failed its self-check: the reference
        if mutates and torch.is_grad_enabled():
            with torch.no_grad():
                return fn(*args)
        return fn(*args)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"torch.ops.sage_dist.{schema}\n\n{ref.__doc__ or ''}"
    return call


lion_update_ = _public("lion_update_")
lion_update_multi_ = _public("lion_update_multi_")
colsum_abs = _public("colsum_abs")
colsum_abs_check = _public("colsum_abs_check")
sq_sums = _public("sq_sums")
sage_update_ = _public("sage_update_")
scaled_update_ = _public("scaled_update_")
momentum_scaled_update_ = _public("momentum_scaled_update_")
sinkhorn_rescale = _public("sinkhorn_rescale")
sinkhorn_scales = _public("sinkhorn_scales")
sinkhorn_sweep_ = _public("sinkhorn_sweep_")
sinkhorn_scales_multi_ = _public("sinkhorn_scales_multi_")
sinkhorn_update_multi_ = _public("sinkhorn_update_multi_")
scaled_update_multi_ = _public("scaled_update_multi_")
sage_update_multi_ = _public("sage_update_multi_")
round_bf16_ = _public("round_bf16_")
OPS = tuple(SCHEMAS)
# Fused forms with a CPU kernel only (docs/KERNELS.md): the rules use them where
# has_kernel(op, device) says so and otherwise run the ops they fuse, with the same results.
CPU_ONLY = ("colsum_abs_check", "sinkhorn_sweep_", "sinkhorn_scales_multi_",
            "sinkhorn_update_multi_")
