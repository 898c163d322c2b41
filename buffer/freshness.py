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
If the trainer waits anyway in two of three steps (filtered groups need replacements, or evaluation
or a checkpoint takes the workers away), the lead goes one higher (`bump`); one late wake-up on a
loaded machine is not worth a version of freshness. The bump is given back one at a time after
`patience` steps without a wait.

Within a step, when the trainer publishes in-step weights (after every minibatch,
`trainer.publish_every=minibatch`), waiting is worth something too: at lead 1 the next batch is held
after the trainer's new version for

    hold = max(0, T − m · L)

so that it is generated with weights updated during the step and arrives as the step ends. A held
batch that still came late shortens the holds that follow (by the trainer's wait, at most that
hold, given back 10% a calm step) instead of raising the lead: a version more of lead would cost
far more freshness than a few milliseconds less of hold. Without in-step weights nothing changes
within a step, and admission is never held.

Only the lead and the hold move. The admission rule itself, and its η bound, stay in
areal/buffer/staleness.py (`StalenessController.set_lead`).
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


def just_in_time_hold(train_s: float, latency_s: float, margin: float = 1.25) -> float:
    """hold = max(0, T − m · L): how long after a new version the next batch may wait and still arrive
    before the trainer needs it (module docstring)."""
    return max(0.0, train_s - margin * latency_s)


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
                 wait_tolerance: float = 0.05, patience: int = 10, clock=time.monotonic, in_step_updates: bool = False):
        self.controller, self.margin, self.clock = controller, margin, clock
        self.in_step_updates = in_step_updates  # the trainer publishes weights within a step: hold admission
        self.hold_until, self.hold = 0.0, 0.0  # no batch is admitted before hold_until; the last hold, seconds
        self.slack = 0.0  # taken off every hold after held batches came late; shrinks by 10% a calm step
        self.wait_tolerance, self.patience = wait_tolerance, patience
        self.latencies: deque[float] = deque(maxlen=window or 2 * controller.groups_per_step)
        self.admitted_at: dict[int, float] = {}
        self.train_s = 0.0  # EMA of the trainer's own time per step
        self.bump = 0
        self.calm_steps = 0  # steps since the lead last rose
        self.recent_waits: deque[bool] = deque(maxlen=3)  # whether the trainer waited, the last 3 steps
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

    def stepped(self, own_s: float, wait_s: float, now: float | None = None) -> int:
        """One update done: `own_s` the trainer's own time for it, `wait_s` how long it waited for the
        batch. Sets and returns the lead, and the hold of the batch this version lets in."""
        now = self.clock() if now is None else now
        with self._lock:
            self.steps += 1
            self.train_s = own_s if self.steps == 1 else 0.7 * self.train_s + 0.3 * own_s
            waited = self.steps > 1 and wait_s > self.wait_tolerance * max(own_s, 1e-9)  # the first batch always waits
            if waited and self.hold > 0:  # that batch was held too long: shorten the holds before raising the lead
                self.slack += min(wait_s, self.hold)  # (the hold is to blame for at most its own length)
            elif waited:
                self.recent_waits.append(True)
                if sum(self.recent_waits) >= 2:  # a shortfall that recurs, not one late wake-up
                    self.bump, self.calm_steps = self.bump + 1, 0
                    self.recent_waits.clear()
            else:
                self.recent_waits.append(False)
                self.calm_steps += 1
                self.slack *= 0.9
                if self.bump and self.calm_steps >= self.patience:
                    self.bump, self.calm_steps = self.bump - 1, 0
            eta = self.controller.max_staleness
            self.bump = min(self.bump, eta)
            latency = high_quantile(self.latencies)
            lead = self.controller.set_lead(freshness_lead(latency, self.train_s, eta, self.margin) + self.bump)
            hold = self.in_step_updates and lead == 1 and self.steps > 1 and bool(self.latencies)
            self.hold = max(0.0, just_in_time_hold(self.train_s, latency, self.margin) - self.slack) if hold else 0.0
            self.hold_until = now + self.hold
            return lead

    def hold_s(self, now: float | None = None) -> float:
        """Seconds the dispatcher must still hold admission (0: admit)."""
        now = self.clock() if now is None else now
        with self._lock:
            return max(0.0, self.hold_until - now)

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {"admission/lead": float(self.controller.lead),
                    "admission/latency_s": high_quantile(self.latencies),
                    "admission/train_s": self.train_s, "admission/bump": float(self.bump),
                    "admission/hold_s": self.hold, "admission/hold_slack_s": self.slack}
