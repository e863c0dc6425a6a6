"""An English corpus that needs no download: the docstrings of Python's standard library.

The machines this project runs on reach no data hub, yet a pretraining smoke test wants real
prose. Every Python install carries a few MB of it in docstrings. We collect them once per
Python version, cache the result as JSON, and split it into train/validation deterministically.

One document = one module: its docstring, then those of its public classes (with their public
methods) and functions, in sorted order. Identical docstrings (inherited ones, `object`'s) are
kept only at their first appearance.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import platform
import re
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

VALIDATION_EVERY = 20  # every 20th document goes to validation (5 %)
FORMAT_VERSION = 2  # bump when the collection rules change, so old caches are not reused

# GUI toolkits, the test suite and modules that act on import (open a browser, print a poem).
_SKIP_TOP = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test",
    "__hello__", "__phello__", "pydoc_data", "sitecustomize",
})
_SKIP_PARTS = frozenset({"test", "tests", "__main__", "idle_test"})


def cache_dir() -> Path:
    """Where corpus, tokenizer and token files live; SAGE_DIST_CACHE overrides the default."""
    root = os.environ.get("SAGE_DIST_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "sage_dist"
    return base / "corpus"


def corpus_path() -> Path:
    # Docstrings change between Python releases, so the version is part of the key.
    return cache_dir() / f"stdlib-docs-v{FORMAT_VERSION}-py{platform.python_version()}.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory and os.replace, so a reader (or a concurrent
    writer) never sees a half-written cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is fine to share
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def clean(text: str) -> str:
    """Strip trailing spaces, turn tabs into spaces, and squeeze runs of blank lines."""
    lines = [line.rstrip().replace("\t", "    ") for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# ---------------------------------------------------------------------------------------------
# Collection. It runs in a child interpreter (see _collect_in_child): importing ~1000 modules
# has side effects (prints, signal handlers, memory) that must not leak into a training run.


def _is_public(name: str) -> bool:
    return not name.startswith("_") and not (set(name.split(".")) & _SKIP_PARTS)


def _stdlib_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple(os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib"))


def _from_stdlib(module, roots: tuple[str, ...]) -> bool:
    """True for built-in modules and files under the stdlib directories; rejects look-alikes
    from site-packages (e.g. setuptools' replacement for distutils)."""
    file = getattr(module, "__file__", None)
    if file is None:
        return True
    real = os.path.realpath(file)
    return any(real.startswith(r + os.sep) for r in roots) and "site-packages" not in real


def _try_import(name: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated modules warn on import
            return importlib.import_module(name)
    except (Exception, SystemExit):  # ImportError, platform-specific errors, odd modules
        return None


def _module_names() -> list[str]:
    """All public stdlib modules and submodules that import here, sorted."""
    roots, found = _stdlib_roots(), set()
    todo = sorted(n for n in sys.stdlib_module_names if _is_public(n) and n not in _SKIP_TOP)
    while todo:
        name = todo.pop()
        module = _try_import(name)
        if module is None or not _from_stdlib(module, roots):
            continue
        found.add(name)
        for info in pkgutil.iter_modules(getattr(module, "__path__", None) or []):
            sub = f"{name}.{info.name}"
            if _is_public(info.name) and _is_public(sub):
                todo.append(sub)
    return sorted(found)


def _owned(obj, module) -> bool:
    """Defined here, or in a private helper (io.TextIOWrapper lives in `_io`) that no public
    module would otherwise cover. Re-exports from other public modules are left to them."""
    origin = getattr(obj, "__module__", None)
    if not isinstance(origin, str):
        return False
    return origin == module.__name__ or origin.rpartition(".")[2].startswith("_")


def _member_docs(module) -> list:
    """Public classes and functions of `module`, with each class's public methods and
    properties, in sorted order."""
    out = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not _owned(obj, module):
            continue
        if inspect.isclass(obj):
            out.append(obj)
            out.extend(v for k, v in sorted(vars(obj).items()) if not k.startswith("_")
                       and (inspect.isroutine(v) or inspect.isdatadescriptor(v)))
        elif inspect.isroutine(obj):
            out.append(obj)
    return out


def _help_topics() -> list[str]:
    """The prose of `help('TOPIC')`: sections of the language reference shipped with pydoc."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [clean(topics[key]) for key in sorted(topics)]


def _docstring(obj) -> str:
    try:
        return clean(inspect.getdoc(obj) or "")
    except Exception:  # a broken descriptor can raise from __doc__
        return ""


def collect_documents() -> list[str]:
    """Import the stdlib and return one cleaned document per module, then one per help
    topic (deterministic order)."""
    seen: set[str] = set()
    docs = []
    for name in _module_names():
        module = sys.modules[name]
        parts = []
        for obj in [module, *_member_docs(module)]:
            text = _docstring(obj)
            # Very short docstrings ("Return self==value.") are boilerplate, not prose.
            if len(text.split()) >= 4 and text not in seen:
                seen.add(text)
                parts.append(text)
        if parts:
            docs.append("\n\n".join(parts))
    docs += _help_topics()
    return list(dict.fromkeys(d for d in docs if d))  # some help topics repeat


def _collect_in_child() -> list[str]:
    """Run collect_documents in a fresh interpreter: -I ignores the environment and user site,
    -S skips site-packages so only the real stdlib can be imported."""
    with tempfile.TemporaryDirectory(prefix="sage_dist_corpus_") as tmp:
        out = Path(tmp) / "docs.json"
        cmd = [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "--collect", str(out)]
        proc = subprocess.run(cmd, cwd=tmp, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=600)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"corpus collection failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-2000:]}")
        return json.loads(out.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Public API


def load_documents(refresh: bool = False) -> list[str]:
    """All documents, from the cache when present (collected and cached otherwise)."""
    path = corpus_path()
    if path.exists() and not refresh:
        return json.loads(path.read_text(encoding="utf-8"))
    docs = _collect_in_child()
    atomic_write_bytes(path, json.dumps(docs, ensure_ascii=False).encode("utf-8"))
    return docs


def split_documents(docs: list[str]) -> dict[str, list[str]]:
    """Every VALIDATION_EVERY-th document (index 19, 39, ...) is validation, the rest train."""
    val = [d for i, d in enumerate(docs) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
    train = [d for i, d in enumerate(docs) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1]
    return {"train": train, "validation": val}


def load_splits(refresh: bool = False) -> dict[str, list[str]]:
    return split_documents(load_documents(refresh=refresh))


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--collect":  # child mode, see _collect_in_child
        Path(argv[1]).write_text(json.dumps(collect_documents(), ensure_ascii=False),
                                 encoding="utf-8")
        return 0
    splits = load_splits(refresh="--refresh" in argv)
    for name, docs in splits.items():
        size = sum(len(d.encode("utf-8")) for d in docs)
        print(f"{name}: {len(docs)} documents, {size / 1e6:.2f} MB")
    print(f"cache: {corpus_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
