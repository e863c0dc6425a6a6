"""Build script of sage_dist and its native extension ``sage_dist._C``.

The extension always holds the CPU kernels (csrc/ops.cpp + csrc/cpu/*.cpp). The CUDA
kernels (csrc/cuda/*.cu) are added when all of these hold:
  * torch was built with CUDA (torch.version.cuda is set),
  * a CUDA toolkit is found: $CUDA_HOME, else /usr/local/cuda (must contain bin/nvcc),
  * SAGE_DIST_NO_CUDA is not "1".
Environment knobs: CUDA_HOME, SAGE_DIST_NO_CUDA=1, TORCH_CUDA_ARCH_LIST (default
"8.0;9.0+PTX"), SAGE_DIST_CPU_ARCH (auto | avx2 | generic, default auto: AVX2 if the build
machine has it), MAX_JOBS (parallel compile jobs, read by torch's ninja build).

    pip install --no-build-isolation -e .
    python setup.py build_ext --inplace
"""

import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # A100, H100; the PTX lets newer GPUs JIT-compile


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
    """Vector ISA of the CPU kernels: SAGE_DIST_CPU_ARCH=auto (default: AVX2 when the build
    machine has it, as DeepSpeed builds its CPU ops for the build machine), avx2, or generic
    (baseline x86-64 / the compiler's default: a build to copy to other machines)."""
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
    _log(f"CPU kernels built for: {arch} (SAGE_DIST_CPU_ARCH)")
    return {"native": ["-march=native"], "avx2": ["-mavx2"]}.get(arch, [])


def _extensions():
    # torch.utils.cpp_extension reads CUDA_HOME and TORCH_CUDA_ARCH_LIST when imported /
    # when building, so both are settled before that import.
    cuda_root, reason = _find_cuda_toolkit()
    if cuda_root:
        os.environ["CUDA_HOME"] = cuda_root
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)

    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = _sources("csrc/ops.cpp") + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if os.name == "nt":
        cxx = ["/O2", "/std:c++17"]
    else:
        # No FMA contraction: the CPU kernels then round exactly like the PyTorch reference.
        cxx = ["-O3", "-ffp-contract=off"] + _cpu_arch_flags()

    if not cuda_root:
        _log(f"building CPU-only extension sage_dist._C (CUDA sources skipped: {reason})")
        return [CppExtension("sage_dist._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx})]

    cuda_sources = _sources("csrc/cuda/*.cu")
    include_dirs += _pip_cuda_include_dirs()
    _log(f"building sage_dist._C WITH CUDA kernels: {len(cuda_sources)} .cu file(s), "
         f"toolkit {cuda_root}, archs {os.environ['TORCH_CUDA_ARCH_LIST']}")
    # --fmad=false for the same reason as -ffp-contract=off: the kernels are memory-bound,
    # so bitwise agreement with the reference costs nothing measurable.
    nvcc = ["-O3", "--fmad=false", "-lineinfo"]
    return [CUDAExtension("sage_dist._C", sources + cuda_sources, include_dirs=include_dirs,
                          extra_compile_args={"cxx": cxx, "nvcc": nvcc})]


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
