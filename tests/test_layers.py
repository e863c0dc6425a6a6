"""The house rules that keep the layers apart, checked on the source itself.

    train/ -> deepspeed.py, fsdp.py (engine faces) -> optim/ -> shard/ -> ops/ -> csrc/

* ops/ imports nothing from the rest of sage_dist (the bottom layer);
* shard/ does not import optim/, optim/ does not import the engine faces or the trainer;
* only shard/zero.py reads DeepSpeed internals (the names it lists, which its version check
  verifies at initialize);
* no module of sage_dist/ runs past about 400 lines;
* nothing in the repository points outside it.
"""
import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sage_dist"


def modules(sub=""):
    return sorted((PKG / sub).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Absolute names of the sage_dist modules a file imports (relative imports resolved)."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            names = [name] + [f"{name}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n.startswith("sage_dist")}
    return out


@pytest.mark.parametrize("layer, forbidden", [
    ("ops", ("sage_dist.shard", "sage_dist.optim", "sage_dist.deepspeed", "sage_dist.fsdp",
             "sage_dist.train", "sage_dist.memory")),
    ("shard", ("sage_dist.optim", "sage_dist.deepspeed", "sage_dist.fsdp", "sage_dist.train",
               "sage_dist.memory")),
    ("optim", ("sage_dist.deepspeed", "sage_dist.fsdp", "sage_dist.train", "sage_dist.memory",
               "sage_dist.baselines")),
])
def test_imports_point_down(layer, forbidden):
    bad = [(p.relative_to(ROOT), n) for p in modules(layer) for n in imported(p)
           if n.startswith(forbidden)]
    assert not bad, bad


def test_the_import_check_sees_imports():
    # The check above must be able to fail: the DeepSpeed face imports optim and shard.
    names = imported(PKG / "deepspeed.py")
    assert any(n.startswith("sage_dist.optim") for n in names)
    assert any(n.startswith("sage_dist.shard") for n in names)


def test_deepspeed_internals_are_read_in_zero_py_only():
    from sage_dist.shard import zero

    pattern = re.compile(r"""(\.|getattr\([^,]+,\s*["'])(%s)\b""" % "|".join(
        sorted(zero.DEEPSPEED_ATTRIBUTES)))
    hits = []
    for p in modules():
        if p == PKG / "shard" / "zero.py":
            continue
        for n, line in enumerate(p.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code):
                hits.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)
    # ... and the check would see one if it were there.
    assert pattern.search("flats = wrapper.single_partition_of_fp32_groups")
    assert pattern.search('getattr(p, "ds_shape", None)')


def test_modules_fit_in_a_readers_head():
    long = {str(p.relative_to(ROOT)): n for p in modules()
            if (n := len(p.read_text().splitlines())) > 420}
    assert not long, long


def test_nothing_points_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    # Written in pieces so that this file does not match itself.
    pattern = re.compile("|".join([r"\.\./" + "shared", "shared" + "/spec", "/" + "work/"]))
    bad = []
    for f in files:
        path = ROOT / f
        if path.is_symlink() or not path.is_file() or path.suffix in (".png", ".so"):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        bad += [f"{f}:{n}" for n, line in enumerate(text.splitlines(), 1)
                if pattern.search(line)]
    assert not bad, bad
