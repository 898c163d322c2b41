"""`TrajectoryBuffer`: bounded, thread-safe store of whole `Group`s between rollout and trainer.

Groups are never split: `put` takes a whole group, `get_batch` returns whole groups.

Accounting invariant (checked by the tests after every operation):

    put == consumed + sum(filtered.values()) + held

where `filtered` counts groups dropped with a reason: "uniform_reward" (dynamic filtering
at put time) or "stale" (strict staleness at consumption time).

Interaction with the `StalenessController` (optional; pass it to share the budget):
  * put(group) reports the finish of one admitted group: `on_finished(accepted=True)` when
    it is held, `on_finished(accepted=False)` when it is filtered (frees budget). A group
    waiting in a blocked put still counts as running, so the sum accepted + running the
    rule sees is the same.
  * a strict-mode stale drop happens to a group already counted as accepted, so it calls
    `on_discarded()` (accepted -= 1). This keeps accepted == (groups trained) + held: the
    dropped group needs a replacement to fill the batch, and without the decrement every
    drop would permanently shrink the budget until admission starves and training hangs.
    With the controller, held never exceeds (η + 1)·B, so `capacity_groups` is then only
    a memory guard.

Version lag: with oldest_first or fifo and groups finishing in admission order, every
consumed group started at most η versions before the consuming step (the tests check this
in a model of the loop). Groups finishing out of order can lag more (the bound is then on
the amount of off-policy data); strict mode turns it into a hard per-token guarantee.

Processes: the buffer lives in the trainer process, next to the controller (admission is
decided there). Rollout worker processes send finished groups over a queue, and the trainer's
collector thread (`areal.fleet.Collector`) `put`s them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from areal.buffer.config import BufferConfig
from areal.buffer.staleness import StalenessController
from areal.trajectory import Group

FILTER_UNIFORM_REWARD = "uniform_reward"
FILTER_STALE = "stale"
FILTER_REASONS = (FILTER_UNIFORM_REWARD, FILTER_STALE)


class BufferClosed(RuntimeError):
    """The buffer was closed: no more puts, and a get that cannot be served fails."""


def has_uniform_rewards(group: Group) -> bool:
    """True when every reward in the group is equal (GRPO advantages would all be 0)."""
    rewards = group.rewards
    return all(r == rewards[0] for r in rewards)


def version_lag(current_version: int, group: Group) -> int:
    """current_version − oldest token version (0 for a group with no generated token)."""
    oldest = group.oldest_version
    return 0 if oldest < 0 else current_version - oldest


@dataclass
class _Held:
    seq: int  # arrival order, for FIFO and tie-breaking
    group: Group
    oldest_version: int
    num_trajectories: int
    num_tokens: int


class TrajectoryBuffer:
    def __init__(
        self,
        config: BufferConfig | None = None,
        controller: StalenessController | None = None,
        max_staleness: int | None = None,
    ) -> None:
        """eta for strict mode comes from `controller`, or `max_staleness` when there is none."""
        self.config = config if config is not None else BufferConfig()
        self.controller = controller
        if controller is not None:
            if max_staleness is not None and max_staleness != controller.max_staleness:
                raise ValueError(
                    f"max_staleness {max_staleness} != controller max_staleness {controller.max_staleness}"
                )
            max_staleness = controller.max_staleness
        if self.config.strict_staleness and max_staleness is None:
            raise ValueError("strict_staleness needs eta: pass a controller or max_staleness")
        self.max_staleness = 0 if max_staleness is None else max_staleness
        self._cond = threading.Condition(threading.Lock())
        self._held: dict[int, _Held] = {}  # insertion-ordered by seq
        self._next_seq = 0
        self._closed = False
        # counters
        self._put = 0
        self._consumed = 0
        self._filtered = {reason: 0 for reason in FILTER_REASONS}
        self._put_waits = 0
        self._held_trajectories = 0
        self._held_tokens = 0
        self._consumed_max_lag = 0
        self._last_batch_max_lag = 0

    # -- producer side ----------------------------------------------------------------
    def put(self, group: Group, timeout: float | None = None) -> bool:
        """Hand over one finished group. Returns True if held, False if filtered.

        Blocks while the buffer is full; raises TimeoutError after ``timeout`` seconds
        (the group was not taken: retry, or report it with controller.on_aborted()),
        and BufferClosed if the buffer is or becomes closed.
        """
        if not group.trajectories:
            raise ValueError(f"group {group.group_id} has no trajectories")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._raise_if_closed("put")
            if self.config.filter_uniform_rewards and has_uniform_rewards(group):
                if self.controller is not None:
                    self.controller.on_finished(accepted=False)
                self._put += 1
                self._filtered[FILTER_UNIFORM_REWARD] += 1
                return False
            waited = False
            while len(self._held) >= self.config.capacity_groups:
                if not waited:
                    self._put_waits += 1
                    waited = True
                self._wait_locked(deadline, f"put of group {group.group_id} (buffer full)")
                self._raise_if_closed("put")
            if self.controller is not None:
                self.controller.on_finished(accepted=True)  # raises before any change here
            entry = _Held(
                seq=self._next_seq,
                group=group,
                oldest_version=group.oldest_version,
                num_trajectories=len(group.trajectories),
                num_tokens=sum(t.num_tokens for t in group.trajectories),
            )
            self._next_seq += 1
            self._held[entry.seq] = entry
            self._put += 1
            self._held_trajectories += entry.num_trajectories
            self._held_tokens += entry.num_tokens
            self._cond.notify_all()
            return True

    # -- consumer side ----------------------------------------------------------------
    def get_batch(
        self, num_groups: int, current_version: int, timeout: float | None = None
    ) -> list[Group]:
        """Wait until ``num_groups`` groups are held, then remove and return them whole,
        chosen by ``config.order``. In strict mode, first drop (reason "stale") every held
        group whose oldest token is more than η versions behind ``current_version``.

        Raises TimeoutError after ``timeout`` seconds, and BufferClosed if the buffer is
        closed with too few groups held.
        """
        if not 1 <= num_groups <= self.config.capacity_groups:
            raise ValueError(
                f"num_groups must be in [1, capacity_groups={self.config.capacity_groups}], "
                f"got {num_groups}"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self.config.strict_staleness:
                    self._drop_stale_locked(current_version)
                if len(self._held) >= num_groups:
                    break
                if self._closed:
                    raise BufferClosed(
                        f"buffer closed with {len(self._held)} groups held, {num_groups} requested"
                    )
                self._wait_locked(deadline, f"get_batch({num_groups}) at version {current_version}")
            chosen = sorted(self._held.values(), key=self._order_key)[:num_groups]
            batch_max_lag = 0
            for entry in chosen:
                del self._held[entry.seq]
                self._held_trajectories -= entry.num_trajectories
                self._held_tokens -= entry.num_tokens
                batch_max_lag = max(batch_max_lag, version_lag(current_version, entry.group))
            self._consumed += len(chosen)
            self._last_batch_max_lag = batch_max_lag
            self._consumed_max_lag = max(self._consumed_max_lag, batch_max_lag)
            self._cond.notify_all()  # space freed for blocked puts
            return [entry.group for entry in chosen]

    def _order_key(self, entry: _Held) -> tuple[int, int]:
        if self.config.order == "oldest_first":
            return (entry.oldest_version, entry.seq)
        if self.config.order == "newest_first":
            return (-entry.oldest_version, entry.seq)
        return (entry.seq, 0)  # fifo

    def _drop_stale_locked(self, current_version: int) -> None:
        eta = self.max_staleness
        stale = [e for e in self._held.values() if version_lag(current_version, e.group) > eta]
        for entry in stale:
            del self._held[entry.seq]
            self._held_trajectories -= entry.num_trajectories
            self._held_tokens -= entry.num_tokens
            self._filtered[FILTER_STALE] += 1
            if self.controller is not None:
                self.controller.on_discarded()
        if stale:
            self._cond.notify_all()

    # -- helpers ----------------------------------------------------------------------
    def _raise_if_closed(self, what: str) -> None:
        if self._closed:
            raise BufferClosed(f"{what} on a closed buffer")

    def _wait_locked(self, deadline: float | None, what: str) -> None:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError(f"timed out waiting for {what}; buffer stats: {self._stats_locked()}")
        self._cond.wait(remaining)

    # -- checkpoints ---------------------------------------------------------------------
    def snapshot(self) -> tuple[dict[str, Any], list[Group]]:
        """(counters, held groups in arrival order): what a checkpoint keeps of the buffer."""
        with self._cond:
            counters = {"put": self._put, "consumed": self._consumed, "filtered": dict(self._filtered),
                        "put_waits": self._put_waits, "consumed_max_lag": self._consumed_max_lag}
            return counters, [e.group for e in self._held.values()]

    def restore(self, counters: dict[str, Any], groups: list[Group]) -> None:
        """A resumed run: the checkpoint's held groups back, its counters continued. The controller
        is told separately (`StalenessController.load_state(..., held=len(groups))`)."""
        with self._cond:
            if self._held or self._put:
                raise RuntimeError("restore() into a buffer already in use")
            for group in groups:
                entry = _Held(self._next_seq, group, group.oldest_version, len(group.trajectories),
                              sum(t.num_tokens for t in group.trajectories))
                self._held[entry.seq] = entry
                self._next_seq += 1
                self._held_trajectories += entry.num_trajectories
                self._held_tokens += entry.num_tokens
            self._put, self._consumed = counters["put"], counters["consumed"]
            self._filtered = {reason: counters["filtered"].get(reason, 0) for reason in FILTER_REASONS}
            self._put_waits, self._consumed_max_lag = counters["put_waits"], counters["consumed_max_lag"]
            self._cond.notify_all()

    # -- lifecycle & stats --------------------------------------------------------------
    def close(self) -> None:
        """Refuse further puts and wake every waiter: blocked puts raise BufferClosed,
        blocked gets raise BufferClosed unless enough groups are held. Held groups stay
        available to get_batch."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return self._stats_locked()

    def _stats_locked(self) -> dict[str, Any]:
        return {
            "held_groups": len(self._held),
            "held_trajectories": self._held_trajectories,
            "held_tokens": self._held_tokens,
            "capacity_groups": self.config.capacity_groups,
            "put": self._put,
            "consumed": self._consumed,
            "filtered": dict(self._filtered),
            "put_waits": self._put_waits,
            "consumed_max_lag": self._consumed_max_lag,
            "last_batch_max_lag": self._last_batch_max_lag,
            "closed": self._closed,
        }
