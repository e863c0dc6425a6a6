"""The README's Python snippets run as written, and the docs link only inside the repository.

Every ```python block of README.md is a snippet that must run. A snippet whose first line is
a launch comment,

    # [VAR=value ...] torchrun --nproc_per_node N file.py   (anything after)

runs in N real processes under torchrun (gloo on CPU) with those variables set; any other
snippet runs in one fresh interpreter. Both run from the repository root, importing the
checkout's sage_dist, with each snippet's text unchanged: a small wrapper executes the file
and then leaves with os._exit (after a gloo process group, interpreter finalisation can abort
the process; see sage_dist/train/cli.py, end_process). A snippet fails the test if any rank
raises, exits non-zero, or does not finish.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The docs this test keeps honest (docs/INTEGRATIONS.md is checked by its own owners).
DOCS = [README] + [ROOT / "docs" / f"{n}.md" for n in
                   ("ALGORITHMS", "DISTRIBUTED", "TRAINING", "KERNELS", "MEMORY", "PERFORMANCE",
                    "QUALITY")]
TIMEOUT = 600
DONE = "README-SNIPPET-FINISHED"

FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
LAUNCH = re.compile(r"^#\s*((?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*)torchrun\s+--nproc_per_node[ =](\d+)"
                    r"\s+(\S+\.py)")

WRAPPER = f"""\
import os, runpy, sys, traceback
code = 0
try:
    runpy.run_path(sys.argv[1], run_name="__main__")
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
except BaseException:
    traceback.print_exc()
    code = 1
if code == 0:
    print("{DONE} rank", os.environ.get("RANK", "0"))
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
"""


class Snippet:
    def __init__(self, text: str, line: int):
        self.text, self.line = text, line
        first = text.splitlines()[0] if text.strip() else ""
        m = LAUNCH.match(first)
        self.nproc = int(m.group(2)) if m else 0            # 0: one plain interpreter
        self.env = dict(kv.split("=", 1) for kv in m.group(1).split()) if m else {}
        self.file = m.group(3) if m else f"readme_line{line}.py"

    @property
    def id(self) -> str:
        return f"line{self.line}-{Path(self.file).stem}"


def snippets() -> list[Snippet]:
    text = README.read_text(encoding="utf-8")
    return [Snippet(m.group(1), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(snippet: Snippet, tmp_path: Path) -> None:
    script = tmp_path / snippet.file
    script.write_text(snippet.text, encoding="utf-8")
    wrapper = tmp_path / "run_snippet.py"
    wrapper.write_text(WRAPPER, encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = "1"
    env.update(snippet.env)
    if snippet.nproc:
        env["DS_ACCELERATOR"] = env.get("DS_ACCELERATOR", "cpu")  # this test runs on CPU
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
               str(snippet.nproc), "--master_addr", "127.0.0.1", "--master_port",
               str(_free_port()), str(wrapper), str(script)]
    else:
        cmd = [sys.executable, str(wrapper), str(script)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # torchrun and the ranks it started
        out, _ = proc.communicate()
        pytest.fail(f"README snippet at line {snippet.line} did not finish in {TIMEOUT} s:\n"
                    f"{out[-6000:]}")
    finished = out.count(DONE)
    expected = max(1, snippet.nproc)
    print(out[-3000:])
    assert proc.returncode == 0 and finished == expected, (
        f"README snippet at line {snippet.line} ({snippet.file}) failed: exit code "
        f"{proc.returncode}, {finished} of {expected} processes finished.\n{out[-8000:]}")


SNIPPETS = snippets()


def test_readme_has_the_snippets():
    """The README shows the three uses, and the multi-process ones say how to launch them."""
    assert len(SNIPPETS) >= 3, "README.md should hold at least three ```python snippets"
    assert any(s.nproc == 0 for s in SNIPPETS)
    multi = [s for s in SNIPPETS if s.nproc]
    assert any("fsdp" in s.text for s in multi) and any("deepspeed" in s.text for s in multi)
    for s in SNIPPETS:
        if "init_process_group" in s.text or "deepspeed.initialize" in s.text:
            assert s.nproc, f"snippet at line {s.line} needs processes but has no launch comment"


@pytest.mark.parametrize("snippet", [
    pytest.param(s, id=s.id, marks=[pytest.mark.slow] if s.nproc else []) for s in SNIPPETS])
def test_snippet_runs_as_written(snippet, tmp_path):
    _run(snippet, tmp_path)


# -- links ----------------------------------------------------------------------------------
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file."""
    out = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_links_stay_inside_the_repository(doc):
    assert doc.is_file(), f"{doc.relative_to(ROOT)} is missing"
    text = doc.read_text(encoding="utf-8")
    for bad in (".." + "/shared", "/" + "work/", "shared" + "/spec"):  # (not matching itself)
        assert bad not in text, f"{doc.name} mentions {bad!r}: point inside the repository"
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        rel, _, anchor = target.partition("#")
        dest = (doc.parent / rel).resolve() if rel else doc
        assert dest.exists(), f"{doc.name}: link {target!r} points to nothing"
        assert ROOT in dest.parents or dest == ROOT, f"{doc.name}: link {target!r} leaves the repository"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{doc.name}: link {target!r}: no such heading"
