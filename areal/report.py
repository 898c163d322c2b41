"""The end-of-run picture: reward and held-out accuracy against step and wall time, for
asynchronous runs the staleness of the consumed tokens, and what each checkpoint cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_report(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("reward/mean") is not None]
    evals = [r for r in records if r.get("eval/accuracy") is not None]
    lags = [r for r in train if r.get("staleness/lag_hist")]
    ckpts = {r["ckpt/step"]: r for r in records if r.get("ckpt/step") is not None}  # one row per checkpoint
    panels = 2 + bool(lags) + bool(ckpts)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), constrained_layout=True)
    for ax, x_key, x_label in ((axes[0], "step", "step"), (axes[1], "time/wall_s", "wall time (s)")):
        ax.plot([r[x_key] for r in train], [r["reward/mean"] for r in train], label="train reward (mean)", alpha=0.7)
        ax.plot([r[x_key] for r in evals], [r["eval/accuracy"] for r in evals], "o-", label="held-out accuracy (greedy)")
        ax.set_xlabel(x_label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    if lags:
        width = max(len(r["staleness/lag_hist"]) for r in lags)
        steps = [r["step"] for r in lags]
        shares = [[(r["staleness/lag_hist"] + [0] * width)[k] / max(1, sum(r["staleness/lag_hist"])) for r in lags]
                  for k in range(width)]
        axes[2].stackplot(steps, shares, labels=[f"lag {k}" for k in range(width)], alpha=0.8)
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("share of consumed tokens")
        axes[2].set_title("staleness (trainer version - token version)")
        axes[2].legend(loc="lower right")
    if ckpts:
        ax, rows = axes[-1], list(ckpts.values())
        steps = [r["ckpt/step"] for r in rows]
        for key, label in (("ckpt/blocked_s", "trainer blocked"), ("ckpt/snapshot_s", "host copy (overlapped)"),
                           ("ckpt/persist_s", "write (background)")):
            ax.plot(steps, [max(r[key], 1e-6) * 1e3 for r in rows], "o-", label=label)
        failed = [r["ckpt/step"] for r in rows if not r.get("ckpt/ok", 1.0)]
        for step in failed:
            ax.axvline(step, color="red", alpha=0.4)
        ax.set_yscale("log")
        ax.set_xlabel("checkpoint step")
        ax.set_ylabel("ms")
        ax.set_title(f"checkpoints: {len(rows)} ({len(failed)} failed, {rows[-1].get('ckpt/skipped', 0)} skipped)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
