"""A real (non-editable) install works from any directory: `pip install .` into a fresh venv
outside the checkout, then imports, the commands and the shipped configs from a temporary
directory, with the installed copy (not the checkout) imported.

The venv sees the current environment's packages (torch, transformers, DeepSpeed) through a
.pth file, so nothing is downloaded; sage_dist itself is built from a copy of the checkout
(`--no-build-isolation --no-deps`, CPU-only extension via SAGE_DIST_NO_CUDA=1), so the
shared checkout gets no build/ or egg-info. The current environment's editable install of
sage_dist is inert there: .pth files of a directory named in a .pth file are not run.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# Not copied into the build tree: VCS, environments, build outputs, caches, run outputs.
IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info",
                                "__pycache__", ".pytest_cache", "*.so", "*.pyc", "runs",
                                "outputs")


def _run(cmd, cwd, env, timeout=600):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, (f"{' '.join(map(str, cmd))} exited {out.returncode}\n"
                                 f"stdout:\n{out.stdout[-4000:]}\nstderr:\n{out.stderr[-4000:]}")
    return out


def _inside(path, root) -> bool:
    return Path(path).resolve().is_relative_to(Path(root).resolve())


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv dir, its site-packages, env to run it with, a working directory)."""
    base = tmp_path_factory.mktemp("install")
    assert not _inside(base, ROOT)
    src, venv, work = base / "src", base / "venv", base / "work"
    shutil.copytree(ROOT, src, symlinks=True, ignore=IGNORE)
    work.mkdir()
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"], check=True,
                             capture_output=True, text=True).stdout.strip()
    # --system-site-packages reaches the base interpreter's packages, not those of the venv
    # running this test: name the latter (torch, DeepSpeed, pip, setuptools) in a .pth.
    here = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(purelib, "_parent_env.pth").write_text("".join(f"{p}\n" for p in here))

    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(VIRTUAL_ENV=str(venv), PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu",
               PATH=os.pathsep.join([str(venv / "bin"), env.get("PATH", "")]))
    build_env = dict(env, SAGE_DIST_NO_CUDA="1", MAX_JOBS=env.get("MAX_JOBS", "2"),
                     PIP_DISABLE_PIP_VERSION_CHECK="1",
                     # the build may use ninja from the current environment
                     PATH=os.pathsep.join([env["PATH"], os.path.dirname(sys.executable)]))
    # --ignore-installed: pip sees the current environment's (editable) sage_dist through the
    # .pth and must neither uninstall nor skip it.
    _run([py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
          "--no-cache-dir", "--ignore-installed", src], cwd=work, env=build_env, timeout=1800)
    return venv, Path(purelib), env, work


def test_installed_copy_is_imported(installed):
    venv, site, env, work = installed
    code = """
import json, sys
import sage_dist
sage_dist.deepspeed; sage_dist.fsdp; sage_dist.memory
import sage_dist._C, sage_dist.memory.estimate
from sage_dist import models
print(json.dumps({
    "sage_dist": sage_dist.__file__, "memory": sage_dist.memory.__file__,
    "ext": sage_dist._C.__file__,
    "train": str(models.find_config("tiny_single", "train")),
    "zero2": str(models.find_config("configs/deepspeed/zero2.json", "deepspeed")),
    "llama_60m": str(models.find_config("llama_60m", "models")),
    "shipped": {k: models.shipped(k) for k in ("models", "deepspeed", "train")},
    "sys_path": sys.path,
    "editable": [m for m in sys.modules if m.startswith("__editable__")],
}))
"""
    got = json.loads(_run([venv / "bin" / "python", "-c", code], cwd=work, env=env)
                     .stdout.strip().splitlines()[-1])
    print(json.dumps(got, indent=1))
    for key in ("sage_dist", "memory", "ext", "train", "zero2", "llama_60m"):
        assert _inside(got[key], site / "sage_dist"), (key, got[key])
    assert Path(got["train"]).name == "tiny_single.yaml"
    assert Path(got["zero2"]).parts[-2:] == ("deepspeed", "zero2.json")
    # every shipped config made it into the install (setup.py's package_data)
    for kind, names in got["shipped"].items():
        assert names == sorted(p.stem for p in (ROOT / "sage_dist" / "configs" / kind).iterdir()
                               if p.suffix in (".json", ".yaml", ".yml")), kind
    assert not got["editable"]
    assert all(Path(work, p).resolve() != ROOT for p in got["sys_path"]), got["sys_path"]


def test_describe_by_name(installed):
    venv, _, env, work = installed
    out = _run([venv / "bin" / "sage-dist", "describe", "--model", "llama_60m"], cwd=work,
               env=env).stdout
    assert "model.embed_tokens.weight" in out and "total" in out


def test_memory_by_name(installed):
    venv, _, env, work = installed
    out = _run([venv / "bin" / "sage-dist", "memory", "--model", "llama_7b", "--world", "64",
                "--engine", "deepspeed", "--zero", "2", "--bf16"], cwd=work, env=env).stdout
    print(out)
    assert "llama_7b (6,738,415,616 parameters): DeepSpeed ZeRO-2, world 64, bf16" in out
    assert "estimate_zero2_model_states_mem_needs" in out


def test_train_by_name(installed, tmp_path):
    venv, _, env, work = installed
    out_dir = tmp_path / "run"
    _run([venv / "bin" / "sage-dist-train", "--config", "tiny_single", "--steps", "2",
          "--eval_every", "1", "--eval_batches", "1", "--log_every", "1", "--out_dir", out_dir,
          "--plot", "false"], cwd=work, env=env, timeout=900)
    assert (out_dir / "metrics.jsonl").is_file()
    assert not (work / "runs").exists()
