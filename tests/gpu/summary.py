"""The two Python helpers of tests/gpu/check.sh (tested on the CPU by tests/test_gpu_ready.py).

    python tests/gpu/summary.py env OUT_JSON       what the machine has: torch, CUDA, GPUs
    python tests/gpu/summary.py summarize OUT_DIR  one JSON of the whole check: OUT_DIR/gpu_check.json

`env` imports torch only (not sage_dist, whose extension may not be built yet). It exits 0
when the machine can run the check, 3 when it cannot (no GPU visible, torch without CUDA, or
torch older than MIN_TORCH), saying why; a CUDA major other than 13 is only a warning.

`summarize` reads what the steps left in OUT_DIR (steps.tsv: name, exit status, seconds;
env.json; build.log; pytest-*.xml, JUnit reports; bench_gpu.json) and writes gpu_check.json:
each step's status, the CUDA architectures built for, the tests' counts with every failure,
error and skip reason, and the benchmark's figures. Missing pieces are reported as missing,
never guessed. `ok` is true when every step exited 0 (or was skipped on request), the tests
that ran passed with no failure or error, and the benchmark wrote its results.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
import xml.etree.ElementTree as ET

MIN_TORCH = (2, 11)
SCHEMA = 1


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:2])


def probe_env() -> tuple[dict, list[str]]:
    """(facts about the machine, reasons it cannot run the check)."""
    import platform

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "host": socket.gethostname(),
           "cuda_home": os.environ.get("CUDA_HOME"), "gpus": []}
    problems, warnings = [], []
    if _version_tuple(torch.__version__) < MIN_TORCH:
        problems.append(f"torch {torch.__version__} is older than "
                        f"{'.'.join(map(str, MIN_TORCH))}")
    if not torch.version.cuda:
        problems.append(f"torch {torch.__version__} was built without CUDA")
    elif torch.version.cuda.split(".")[0] != "13":
        warnings.append(f"torch is built for CUDA {torch.version.cuda}, not 13")
    if torch.version.cuda and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env["gpus"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                "memory_gib": round(p.total_memory / 2**30, 1),
                                "sm_count": p.multi_processor_count})
    if not env["gpus"]:
        problems.append("no GPU is visible to torch")
    env["warnings"] = warnings
    env["problems"] = problems
    return env, problems


def cmd_env(out_json: str) -> int:
    env, problems = probe_env()
    with open(out_json, "w") as fh:
        json.dump(env, fh, indent=2)
    gpus = ", ".join(f"{g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)"
                     for g in env["gpus"]) or "none"
    print(f"torch {env['torch']} (CUDA {env['torch_cuda']}), python {env['python']}, "
          f"GPUs: {gpus}")
    for w in env["warnings"]:
        print(f"warning: {w}")
    for p in problems:
        print(f"cannot run the GPU check: {p}")
    return 3 if problems else 0


# ----------------------------------------------------------------------------- summarize
def read_steps(path: str) -> list[dict]:
    steps = []
    if not os.path.isfile(path):
        return steps
    with open(path) as fh:
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or not parts[0]:
                continue
            name, rc, seconds = parts[:3]
            note = parts[3] if len(parts) > 3 else ""
            status = rc if rc in ("skipped", "dry-run") else None
            code = None if status else int(rc)
            steps.append({"name": name, "rc": code, "seconds": float(seconds),
                          "status": status or ("ok" if code == 0 else
                                               "timed out" if code in (124, 137) else "failed"),
                          **({"note": note} if note else {})})
    return steps


def read_junit(paths: list[str]) -> dict:
    """Counts and details of JUnit XML reports (pytest --junitxml)."""
    out = {"reports": [os.path.basename(p) for p in paths], "tests": 0, "passed": 0,
           "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skips": []}
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError) as e:
            out["failures"].append({"test": os.path.basename(path), "kind": "report",
                                    "message": f"unreadable JUnit report: {e}"})
            out["errors"] += 1
            continue
        for case in root.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
            out["tests"] += 1
            kinds = {child.tag: child for child in case}
            if "failure" in kinds or "error" in kinds:
                kind = "failure" if "failure" in kinds else "error"
                el = kinds[kind]
                out["failed" if kind == "failure" else "errors"] += 1
                text = (el.get("message") or el.text or "").strip()
                out["failures"].append({"test": name, "kind": kind, "message": text[:2000]})
            elif "skipped" in kinds:
                out["skipped"] += 1
                out["skips"].append({"test": name,
                                     "reason": (kinds["skipped"].get("message") or "")[:500]})
            else:
                out["passed"] += 1
    return out


def read_build(path: str) -> dict:
    """The build's own summary lines ([sage_dist setup] ...): the CUDA archs and whether the
    CUDA sources were compiled."""
    out = {"log": os.path.basename(path), "archs": None, "cuda_sources": None, "lines": []}
    if not os.path.isfile(path):
        out["log"] = None
        return out
    with open(path, errors="replace") as fh:
        for line in fh:
            if "[sage_dist setup]" not in line:
                continue
            line = line.strip()
            out["lines"].append(line)
            m = re.search(r"CUDA archs: (\S+)", line)
            if m:
                out["archs"] = m.group(1)
            if "WITH CUDA kernels" in line:
                out["cuda_sources"] = True
            elif "CPU-only" in line:
                out["cuda_sources"] = False
    return out


BENCH_KEYS = ("model", "layers", "layers_in_config", "parameters", "name", "capability",
              "cuda_kernels", "copy_gbps", "copy_gbps_before", "copy_gbps_after",
              "finiteness_check_ms", "steps", "warmup")
RECIPE_KEYS = ("ms", "gbps", "bandwidth_fraction", "bandwidth_fraction_once",
               "time_vs_adamw_fused", "bytes", "bytes_once", "syncs_per_step",
               "state_and_temporaries_peak_bytes", "params_finite")


def read_bench(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        return {"error": f"unreadable {os.path.basename(path)}: {e}"}
    out = {k: data.get(k) for k in BENCH_KEYS}
    out["recipes"] = {name: {k: r.get(k) for k in RECIPE_KEYS}
                      for name, r in data.get("recipes", {}).items()}
    return out


def summarize(out_dir: str, now: float | None = None) -> dict:
    def path(name):
        return os.path.join(out_dir, name)

    steps = read_steps(path("steps.tsv"))
    env = None
    if os.path.isfile(path("env.json")):
        with open(path("env.json")) as fh:
            env = json.load(fh)
    reports = sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir)
                     if re.fullmatch(r"pytest-.*\.xml", f))
    tests = read_junit(reports) if reports else None
    bench = read_bench(path("bench_gpu.json"))
    dry = any(s["status"] == "dry-run" for s in steps)
    status = {s["name"]: s["status"] for s in steps}
    tests_skipped = all(status.get(n) == "skipped" for n in ("gpu-tests", "cuda-tests"))
    tests_ok = (tests["failed"] == 0 and tests["errors"] == 0 and tests["passed"] > 0
                if tests is not None else tests_skipped)
    bench_ok = ("error" not in bench if bench is not None else status.get("bench") == "skipped")
    ok = (bool(steps) and not dry and all(v in ("ok", "skipped") for v in status.values())
          and "env" in status and tests_ok and bench_ok)
    summary = {
        "schema": SCHEMA,
        "ok": ok,
        "dry_run": dry,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
        "seconds": round(sum(s["seconds"] for s in steps), 1),
        "env": env,
        "steps": steps,
        "build": read_build(path("build.log")),
        "tests": tests,
        "bench": bench,
        "files": sorted(os.listdir(out_dir)),
    }
    return summary


def cmd_summarize(out_dir: str) -> int:
    summary = summarize(out_dir)
    target = os.path.join(out_dir, "gpu_check.json")
    with open(target, "w") as fh:
        json.dump(summary, fh, indent=2)
    for s in summary["steps"]:
        print(f"  {s['name']:<14} {s['status']:<10} {s['seconds']:>7.1f} s")
    t = summary["tests"]
    if t:
        print(f"  tests: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
              f"{t['skipped']} skipped")
        for f in t["failures"]:
            print(f"    FAILED {f['test']}: {f['message'].splitlines()[0] if f['message'] else ''}")
    b = summary["bench"]
    if b and "error" not in b:
        print(f"  bench: {b['model']} ({b['parameters']} parameters) on {b['name']}, copy "
              f"{b['copy_gbps']:.1f} GB/s")
        for name, r in b["recipes"].items():
            rel = r["time_vs_adamw_fused"]
            print(f"    {name:<20} {r['ms']:8.2f} ms {r['gbps']:8.1f} GB/s "
                  f"{r['bandwidth_fraction']:6.0%} of copy"
                  + (f", {rel:.2f}x AdamW fused" if rel else ""))
    print(f"wrote {target}: ok={summary['ok']}")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "env":
        return cmd_env(argv[1])
    if len(argv) == 2 and argv[0] == "summarize":
        if not os.path.isdir(argv[1]):
            print(f"summary.py: {argv[1]!r} is not a directory", file=sys.stderr)
            return 2
        return cmd_summarize(argv[1])
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
