"""Build script of sage_dist and its native extension ``sage_dist._C``.

The extension always holds the CPU kernels (csrc/ops.cpp + csrc/cpu/*.cpp). The CUDA
kernels (csrc/cuda/*.cu) are added when all of these hold:
  * torch was built with CUDA (torch.version.cuda is set),
  * a CUDA toolkit is found: $CUDA_HOME, else /usr/local/cuda (must contain bin/nvcc),
  * SAGE_DIST_NO_CUDA is not "1".
Environment knobs: CUDA_HOME, SAGE_DIST_NO_CUDA=1, TORCH_CUDA_ARCH_LIST (an explicit list,
used as given), SAGE_DIST_CUDA_ARCHS (torch | visible, default torch: every architecture the
installed torch is built for, plus any visible GPU none of them runs on, with PTX of the
newest; visible: only the visible GPUs', a quicker build for this machine; see
choose_cuda_archs), SAGE_DIST_CPU_ARCH (auto | native | avx2 | generic, default auto: AVX2 if
the build machine has it; the hot loops are built for AVX2 and AVX-512 as well and chosen at
run time, SAGE_DIST_CPU_ISA overriding), MAX_JOBS (parallel compile jobs, read by torch's ninja build).

    pip install --no-build-isolation -e .
    python setup.py build_ext --inplace
"""

import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# When torch reports no architectures and no GPU is visible: what CUDA 13 builds (Turing to
# Blackwell), PTX of the newest for GPUs after it.
FALLBACK_CUDA_ARCHS = "7.5;8.0;8.6;9.0;10.0;12.0+PTX"


try:
    import torch  # noqa: F401  (the extension is compiled against the installed torch)
except ImportError:
    sys.exit("sage_dist: building needs torch installed first; "
             "install torch, then `pip install --no-build-isolation -e .`")


def _log(msg):
    print(f"[sage_dist setup] {msg}", flush=True)


def _sources(pattern):
    # setuptools wants paths relative to setup.py.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _find_cuda_toolkit():
    """Returns (toolkit root or None, reason). Never trusts `nvcc` on PATH: it may be a wrapper."""
    import torch

    if os.environ.get("SAGE_DIST_NO_CUDA") == "1":
        return None, "SAGE_DIST_NO_CUDA=1"
    if not torch.version.cuda:
        return None, f"torch {torch.__version__} was built without CUDA"
    root = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    for rel in ("bin/nvcc", "include/cuda_runtime.h"):  # a dir holding only an nvcc wrapper fails
        if not os.path.isfile(os.path.join(root, rel)):
            return None, (f"no CUDA toolkit at {root} (no {rel}); "
                          "set CUDA_HOME to the toolkit root, e.g. /usr/local/cuda-13.0")
    return os.path.realpath(root), "ok"


def choose_cuda_archs(env, torch_archs, visible, nvcc_archs=None):
    """The CUDA architectures to build for, as (TORCH_CUDA_ARCH_LIST value, what it came from).

    A pure function of its inputs (tests/test_gpu_ready.py calls it with made-up ones):
      env          the environment: TORCH_CUDA_ARCH_LIST (used as given when set),
                   SAGE_DIST_CUDA_ARCHS ('torch', the default, or 'visible');
      torch_archs  what the installed torch is built for (torch.cuda.get_arch_list():
                   'sm_75', 'sm_90a', 'compute_120', ...);
      visible      the visible GPUs' compute capabilities, [(major, minor), ...];
      nvcc_archs   what the toolkit can build ('compute_75', ... from nvcc --list-gpu-arch),
                   None when unknown.
    'torch': every architecture torch has kernels for (so the extension runs wherever torch
    does), plus each visible GPU that none of them runs on (a cubin runs on GPUs of its major
    version and an equal or higher minor one); 'visible': the visible GPUs only. Either way
    architectures the toolkit cannot build are dropped, and the newest also gets PTX, which
    the driver JIT-compiles for GPUs newer than every cubin.
    """
    import re

    explicit = (env.get("TORCH_CUDA_ARCH_LIST") or "").strip()
    if explicit:
        return explicit, "TORCH_CUDA_ARCH_LIST"
    mode = env.get("SAGE_DIST_CUDA_ARCHS") or "torch"
    if mode not in ("torch", "visible"):
        raise ValueError(f"SAGE_DIST_CUDA_ARCHS={mode!r} is invalid: allowed are 'torch', "
                         f"'visible' (or set TORCH_CUDA_ARCH_LIST to a list such as '8.0;9.0')")

    def cap(name):  # 'sm_90a' / 'compute_120' / '8.6' -> (9, 0) / (12, 0) / (8, 6)
        m = re.fullmatch(r"(?:sm_|compute_)(\d+)(\d)[a-z]?|(\d+)\.(\d)[a-z]?(?:\+PTX)?", name)
        if not m:
            return None
        major, minor = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        return int(major), int(minor)

    def fmt(caps):
        return ", ".join(f"{a}.{b}" for a, b in sorted(caps)) or "none"

    torch_caps = {c for c in map(cap, torch_archs) if c}
    visible = {tuple(v) for v in visible}
    notes = []
    if mode == "visible":
        if not visible:
            raise ValueError("SAGE_DIST_CUDA_ARCHS=visible, but no GPU is visible to this build")
        caps = set(visible)
        notes.append(f"the visible GPUs ({fmt(visible)})")
    elif torch_caps:
        caps = set(torch_caps)
        notes.append(f"the installed torch's architectures ({fmt(torch_caps)})")
        added = {v for v in visible
                 if not any(c[0] == v[0] and c[1] <= v[1] for c in torch_caps)}
        caps |= added
        notes.append(f"visible GPUs: {fmt(visible)}"
                     + (f" ({fmt(added)} added: no torch architecture runs on them)"
                        if added else ""))
    else:
        caps = {cap(a) for a in FALLBACK_CUDA_ARCHS.split(";")} | visible
        notes.append(f"torch reports no architectures: {FALLBACK_CUDA_ARCHS} and the visible "
                     f"GPUs ({fmt(visible)})")
    if nvcc_archs is not None:
        can = {c for c in map(cap, nvcc_archs) if c}
        dropped = {c for c in caps if c not in can}
        if dropped:
            caps -= dropped
            notes.append(f"dropped {fmt(dropped)}: this toolkit cannot build them")
    if not caps:
        raise ValueError("no CUDA architecture left to build for (" + "; ".join(notes)
                         + "); set TORCH_CUDA_ARCH_LIST")
    archs = [f"{a}.{b}" for a, b in sorted(caps)]
    archs[-1] += "+PTX"
    return ";".join(archs), "; ".join(notes)


def _cuda_archs(cuda_root):
    """choose_cuda_archs with this machine's inputs: torch's arch list, the visible GPUs, and
    the toolkit's `nvcc --list-gpu-arch`."""
    import subprocess

    import torch

    archs = list(torch.cuda.get_arch_list())
    if not archs and hasattr(torch._C, "_cuda_getArchFlags"):  # older torch: [] without a GPU
        archs = torch._C._cuda_getArchFlags().split()
    visible = []
    if torch.cuda.is_available():
        visible = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    try:
        out = subprocess.run([os.path.join(cuda_root, "bin", "nvcc"), "--list-gpu-arch"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        nvcc_archs = out.split()
    except (OSError, subprocess.SubprocessError):
        nvcc_archs = None
    try:
        return choose_cuda_archs(os.environ, archs, visible, nvcc_archs)
    except ValueError as e:
        sys.exit(f"sage_dist setup: {e}")


def _pip_cuda_include_dirs():
    """Headers of the CUDA libraries shipped as pip wheels (nvidia/cu<major>/include), if any.

    A minimal toolkit may lack e.g. cusparse.h, which torch's CUDA headers include."""
    import torch

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    major = torch.version.cuda.split(".")[0]
    found = []
    for base in spec.submodule_search_locations:
        path = os.path.join(base, f"cu{major}", "include")
        if os.path.isdir(path):
            found.append(path)
    return found


def _cpu_arch_flags():
    """Compiler flags of the CPU kernels: OpenMP (the kernels run on torch's intra-op threads,
    in the libgomp that torch itself loads; without it ATen's parallel_for runs serially in an
    extension) and the vector ISA of everything but the hot loops.

    SAGE_DIST_CPU_ARCH=auto (default: AVX2 when the build machine has it, as DeepSpeed builds
    its CPU ops for the build machine), native, avx2, or generic (baseline x86-64 / the
    compiler's default: a build to copy to other machines). Whatever the choice, the hot loops
    (csrc/cpu/isa_*.cpp) are also compiled for AVX2 and for AVX-512 and picked at run time for
    the CPU they run on (SAGE_DIST_CPU_ISA=auto|avx512|avx2|generic overrides at run time)."""
    arch = os.environ.get("SAGE_DIST_CPU_ARCH", "auto")
    if arch not in ("auto", "native", "avx2", "generic"):
        sys.exit(f"sage_dist setup: SAGE_DIST_CPU_ARCH={arch!r} is invalid: "
                 "allowed are 'auto', 'native', 'avx2', 'generic'")
    if arch == "auto":
        try:
            with open("/proc/cpuinfo") as f:
                arch = "avx2" if " avx2" in f.read() else "generic"
        except OSError:
            arch = "generic"
    _log(f"CPU kernels built for: {arch} (SAGE_DIST_CPU_ARCH); their hot loops also for AVX2 "
         f"and AVX-512, chosen at run time")
    return ["-fopenmp"] + {"native": ["-march=native"], "avx2": ["-mavx2"]}.get(arch, [])


def _extensions():
    # torch.utils.cpp_extension reads CUDA_HOME and TORCH_CUDA_ARCH_LIST when imported /
    # when building, so both are settled before that import.
    cuda_root, reason = _find_cuda_toolkit()
    if cuda_root:
        os.environ["CUDA_HOME"] = cuda_root
        archs, source = _cuda_archs(cuda_root)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        _log(f"CUDA archs: {archs} (from {source})")

    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = _sources("csrc/ops.cpp") + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if os.name == "nt":
        cxx = ["/O2", "/std:c++17"]
    else:
        # No FMA contraction: the CPU kernels then round exactly like the PyTorch reference.
        cxx = ["-O3", "-ffp-contract=off"] + _cpu_arch_flags()
    link = [] if os.name == "nt" else ["-fopenmp"]  # links libgomp (torch's, already loaded)

    if not cuda_root:
        _log(f"building CPU-only extension sage_dist._C (CUDA sources skipped: {reason})")
        return [CppExtension("sage_dist._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx}, extra_link_args=link)]

    cuda_sources = _sources("csrc/cuda/*.cu")
    include_dirs += _pip_cuda_include_dirs()
    _log(f"building sage_dist._C WITH CUDA kernels: {len(cuda_sources)} .cu file(s), "
         f"toolkit {cuda_root}, archs {os.environ['TORCH_CUDA_ARCH_LIST']}")
    # --fmad=false for the same reason as -ffp-contract=off: the kernels are memory-bound,
    # so bitwise agreement with the reference costs nothing measurable.
    nvcc = ["-O3", "--fmad=false", "-lineinfo"]
    return [CUDAExtension("sage_dist._C", sources + cuda_sources, include_dirs=include_dirs,
                          extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                          extra_link_args=link)]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    # BuildExtension uses ninja when it is importable/on PATH, and falls back otherwise.
    return {"build_ext": BuildExtension}


setup(
    name="sage_dist",
    version="0.1.0",
    description="Memory-efficient optimizers (SAGE, SinkGD, SCALE, Lion) for distributed training",
    python_requires=">=3.10",
    packages=find_packages(include=["sage_dist*"]),
    # The shipped configs (models, DeepSpeed JSON, training YAML) are package data: found by
    # name or path from any directory once installed (sage_dist.models.find_config).
    package_data={"sage_dist": ["configs/*/*.json", "configs/*/*.yaml"]},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    install_requires=["torch", "transformers", "PyYAML", "numpy"],
    entry_points={"console_scripts": ["sage-dist = sage_dist.cli:main", "sage-dist-train = sage_dist.train.cli:entry"]},
    zip_safe=False,
)
