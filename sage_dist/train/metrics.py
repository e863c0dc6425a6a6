"""Metrics on rank 0: one JSON object per line (train, eval, memory, final records) and a PNG
of the loss curves written at the end."""
from __future__ import annotations

import json
import math
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


def memory_table(per_rank: list[dict]) -> str:
    def mib(b):
        return f"{b / 2 ** 20:10.2f}"

    lines = ["rank |  params MiB |   grads MiB | optim state MiB | peak RSS MiB",
             "-----+-------------+-------------+-----------------+-------------"]
    for r, m in enumerate(per_rank):
        lines.append(f"{r:4d} | {mib(m['params'])}  | {mib(m['grads'])}  | "
                     f"{mib(m['optimizer'])}      | {mib(m['peak_rss'])}")
    return "\n".join(lines)
