"""The live view of a run: a rich progress bar with the reward, and periodic metric lines."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)

_LINE_KEYS = (
    ("reward/mean", "reward", "{:.3f}"),
    ("reward/accuracy", "acc", "{:.3f}"),
    ("eval/accuracy", "eval", "{:.3f}"),
    ("train/loss", "loss", "{:+.4f}"),
    ("train/clip_fraction", "clip", "{:.3f}"),
    ("rollout/response_length", "len", "{:.1f}"),
    ("time/step_s", "s/step", "{:.2f}"),
)


class RunView:
    def __init__(self, total_steps: int, enabled: bool, every: int):
        self.every = every
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("reward {task.fields[reward]}"),
            TextColumn("eval {task.fields[eval]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, disable=not enabled, transient=False,
        )
        self.task = self.progress.add_task("train", total=total_steps, reward="-", eval="-")

    def __enter__(self) -> "RunView":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def step(self, step: int, metrics: dict) -> None:
        fields = {"reward": f"{metrics['reward/mean']:.3f}"}
        if "eval/accuracy" in metrics:
            fields["eval"] = f"{metrics['eval/accuracy']:.3f}"
        self.progress.update(self.task, completed=step, **fields)
        if self.every and (step % self.every == 0 or "eval/accuracy" in metrics):
            parts = [f"{label} {fmt.format(metrics[k])}" for k, label, fmt in _LINE_KEYS if metrics.get(k) is not None]
            self.progress.console.print(f"step {step:4d}  " + "  ".join(parts))
