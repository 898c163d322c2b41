"""The end-of-run picture: reward and held-out accuracy against step and wall time."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_report(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("reward/mean") is not None]
    evals = [r for r in records if r.get("eval/accuracy") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, x_key, x_label in ((axes[0], "step", "step"), (axes[1], "time/wall_s", "wall time (s)")):
        ax.plot([r[x_key] for r in train], [r["reward/mean"] for r in train], label="train reward (mean)", alpha=0.7)
        ax.plot([r[x_key] for r in evals], [r["eval/accuracy"] for r in evals], "o-", label="held-out accuracy (greedy)")
        ax.set_xlabel(x_label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
