"""Metrics on rank 0: one JSON object per line (train, eval, memory, final records) and a PNG
of the loss curves written at the end. Memory records hold, per rank, sage_dist.memory's
breakdown (`measure`, flattened) and the peak RSS."""
from __future__ import annotations

import json
import math
import resource
from pathlib import Path


def ppl(loss: float) -> float:
    return math.exp(min(loss, 80.0))


class MetricsLog:
    def __init__(self, path: Path, enabled: bool, resume_step: int = 0):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step and path.exists():  # drop records past the checkpoint we resume from
                keep = [ln for ln in path.read_text().splitlines()
                        if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
                path.write_text("".join(ln + "\n" for ln in keep))
            elif not resume_step:
                path.write_text("")

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_losses(metrics_path: Path, png_path: Path, title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in recs if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in recs if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def memory_record(breakdown: dict) -> dict:
    """This rank's memory record for metrics.jsonl: sage_dist.memory's breakdown as flat
    metrics (`parameters/total`, `gradients`, `optimizer_state/total`, ...; bytes) plus
    `peak_rss` (this process, getrusage)."""
    from sage_dist.memory import flatten

    return {**flatten(breakdown, prefix=""), "peak_rss": peak_rss_bytes()}
