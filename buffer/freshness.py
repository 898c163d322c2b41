"""Freshness-aware admission: start a prompt as late as the trainer allows, and no later.

η bounds how old consumed data may be. Admitting greedily fills that budget, so when generation
is faster than training, every consumed token is exactly η versions old, with no gain in speed.
The fix is to admit a batch only as many versions ahead of the trainer (the lead d, 1 ≤ d ≤ η)
as it takes to arrive in time.

A batch admitted when the trainer reaches version v − d is consumed at version v, d trainer
steps (d·T seconds) later. It arrives L seconds after admission: the wait for weights v − d,
then generation, then rewards. The trainer never waits while L ≤ d·T, so the freshest safe lead is

    d = clamp(⌈m · L / T⌉, 1, η)            (η = 0: d = 0, the synchronous rule, unchanged)

where:
- T is the trainer's own time per step (from taking a batch to asking for the next; waits excluded);
- L is a high quantile of recent admission-to-arrival latencies;
- m > 1 is a safety margin.

d = 1 is the floor of overlap: data generated while the trainer computes version v + 1 comes from
version v. When generation is the bottleneck (L > η·T), d = η, which is greedy admission as before.
If the trainer waits anyway (filtered groups need replacements, or evaluation or a checkpoint takes
the workers away), the lead goes one higher (`bump`). The bump is given back one at a time after
`patience` steps without a wait.

Only the lead moves. The admission rule itself, and its η bound, stay in areal/buffer/staleness.py
(`StalenessController.set_lead`).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

from areal.buffer.staleness import StalenessController


def freshness_lead(latency_s: float, train_s: float, max_staleness: int, margin: float = 1.25) -> int:
    """d = clamp(⌈margin · latency / train⌉, 1, η); 0 when η = 0 (module docstring)."""
    if max_staleness == 0:
        return 0
    if train_s <= 0:
        return max_staleness  # nothing measured yet about the trainer: no reason to hold back
    return max(1, min(max_staleness, math.ceil(margin * latency_s / train_s)))


def high_quantile(values, q: float = 0.9) -> float:
    """The q-quantile of `values` (nearest rank, no interpolation); 0 for none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class FreshnessPacer:
    """Measures what the lead needs and sets it on the admission controller after every step.

    The dispatcher reports `admitted(ids)`, the collector `arrived(id)`, and the trainer loop
    `stepped(own_s, wait_s)` once per update. Thread-safe: the three run on different threads.
    """

    def __init__(self, controller: StalenessController, margin: float = 1.25, window: int | None = None,
                 wait_tolerance: float = 0.05, patience: int = 10, clock=time.monotonic):
        self.controller, self.margin, self.clock = controller, margin, clock
        self.wait_tolerance, self.patience = wait_tolerance, patience
        self.latencies: deque[float] = deque(maxlen=window or 2 * controller.groups_per_step)
        self.admitted_at: dict[int, float] = {}
        self.train_s = 0.0  # EMA of the trainer's own time per step
        self.bump = 0
        self.calm_steps = 0  # steps since the trainer last waited
        self.steps = 0
        self._lock = threading.Lock()
        controller.set_lead(min(1, controller.max_staleness))  # fresh from the start; waits raise it

    def admitted(self, group_ids, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        with self._lock:
            for g in group_ids:
                self.admitted_at[g] = now

    def arrived(self, group_id: int, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        with self._lock:
            started = self.admitted_at.pop(group_id, None)
            if started is not None:  # a checkpoint's group was admitted by an earlier run: no latency to learn
                self.latencies.append(now - started)

    def stepped(self, own_s: float, wait_s: float) -> int:
        """One update done: `own_s` the trainer's own time for it, `wait_s` how long it waited for the
        batch. Sets and returns the lead."""
        with self._lock:
            self.steps += 1
            self.train_s = own_s if self.steps == 1 else 0.7 * self.train_s + 0.3 * own_s
            if self.steps > 1 and wait_s > self.wait_tolerance * max(own_s, 1e-9):  # the first batch always waits
                self.bump, self.calm_steps = self.bump + 1, 0
            else:
                self.calm_steps += 1
                if self.bump and self.calm_steps >= self.patience:
                    self.bump, self.calm_steps = self.bump - 1, 0
            eta = self.controller.max_staleness
            self.bump = min(self.bump, eta)
            lead = freshness_lead(high_quantile(self.latencies), self.train_s, eta, self.margin) + self.bump
            return self.controller.set_lead(lead)

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {"admission/lead": float(self.controller.lead),
                    "admission/latency_s": high_quantile(self.latencies),
                    "admission/train_s": self.train_s, "admission/bump": float(self.bump)}
