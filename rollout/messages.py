"""What a rollout worker and trainer rank 0 say to each other (areal/messages.py registers them
with the channel): prompts and evaluations in; finished groups, evaluation results, snapshots and
stats out. Every message round-trips through `to_dict()` / `from_dict()` as JSON, so a checkpoint's
state.json can hold the in-flight ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from areal.rollout.types import GenerationOutput, PartialSample
from areal.trajectory import Group


@dataclass
class Prompt:
    """A dataset row made ready to generate from."""

    index: int  # row index in its split
    text: str
    token_ids: list[int]
    fields: dict[str, Any]  # the row's other columns, passed to the reward

    def to_dict(self) -> dict:
        return dict(index=self.index, text=self.text, token_ids=list(self.token_ids), fields=dict(self.fields))

    @classmethod
    def from_dict(cls, d: dict) -> "Prompt":
        return cls(int(d["index"]), d["text"], [int(t) for t in d["token_ids"]], dict(d["fields"]))


@dataclass
class PromptBatch:
    """Admitted prompts for a worker; none may start before the worker holds `min_version` weights."""

    min_version: int
    group_ids: list[int]
    prompts: list[Prompt]

    def to_dict(self) -> dict:
        return dict(min_version=self.min_version, group_ids=list(self.group_ids), prompts=[p.to_dict() for p in self.prompts])

    @classmethod
    def from_dict(cls, d: dict) -> "PromptBatch":
        return cls(int(d["min_version"]), [int(g) for g in d["group_ids"]], [Prompt.from_dict(p) for p in d["prompts"]])


@dataclass
class EvalRequest:
    """Score `prompts` greedily with weights of at least `version`; the worker replies ("eval", results)."""

    version: int
    prompts: list[Prompt]
    max_new_tokens: int
    shard: int = 0  # which part of the test set, echoed as eval/shard

    def to_dict(self) -> dict:
        return dict(version=self.version, prompts=[p.to_dict() for p in self.prompts], max_new_tokens=self.max_new_tokens,
                    shard=self.shard)

    @classmethod
    def from_dict(cls, d: dict) -> "EvalRequest":
        return cls(int(d["version"]), [Prompt.from_dict(p) for p in d["prompts"]], int(d["max_new_tokens"]),
                   int(d.get("shard", 0)))


@dataclass
class SnapshotRequest:
    """Inbox: report the in-flight state as of now; the worker replies ("snapshot", WorkerSnapshot)
    and keeps generating (nothing is aborted)."""

    step: int

    def to_dict(self) -> dict:
        return {"step": self.step}

    @classmethod
    def from_dict(cls, d: dict) -> "SnapshotRequest":
        return cls(int(d["step"]))


@dataclass
class InFlightGroup:
    """One admitted group not yet shipped. `partial` are its samples still generating; a group with
    neither finished nor partial samples has not started."""

    group_id: int
    min_version: int
    prompt: Prompt
    finished: list[GenerationOutput] = field(default_factory=list)
    partial: list[PartialSample] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(group_id=self.group_id, min_version=self.min_version, prompt=self.prompt.to_dict(),
                    finished=[o.to_dict() for o in self.finished], partial=[p.to_dict() for p in self.partial])

    @classmethod
    def from_dict(cls, d: dict) -> "InFlightGroup":
        return cls(int(d["group_id"]), int(d["min_version"]), Prompt.from_dict(d["prompt"]),
                   [GenerationOutput.from_dict(o) for o in d["finished"]],
                   [PartialSample.from_dict(p) for p in d["partial"]])


@dataclass
class WorkerSnapshot:
    """Outbox: every group admitted and not yet shipped (pending and in flight, in admission order)
    and the worker's RNG state (JSON-able), as of the `SnapshotRequest` of `step`."""

    step: int
    groups: list[InFlightGroup]
    rng_state: dict

    def to_dict(self) -> dict:
        return dict(step=self.step, groups=[g.to_dict() for g in self.groups], rng_state=self.rng_state)

    @classmethod
    def from_dict(cls, d: dict) -> "WorkerSnapshot":
        return cls(int(d["step"]), [InFlightGroup.from_dict(g) for g in d["groups"]], d["rng_state"])


@dataclass
class ResumeGroups:
    """Inbox: continue these groups (from a checkpoint) before anything newer; each restarts once the
    worker holds weights of its min_version. `rng_state` (a snapshot's) is restored first if given."""

    groups: list[InFlightGroup]
    rng_state: dict | None = None

    def to_dict(self) -> dict:
        return dict(groups=[g.to_dict() for g in self.groups], rng_state=self.rng_state)

    @classmethod
    def from_dict(cls, d: dict) -> "ResumeGroups":
        return cls([InFlightGroup.from_dict(g) for g in d["groups"]], d.get("rng_state"))


@dataclass
class GroupsDone:
    """Outbox: finished, rewarded groups; those one engine step finished travel together (a batch's
    groups mostly finish together: one message and one reward call, not one per group)."""

    groups: list[Group]

    def to_dict(self) -> dict:
        return {"groups": [g.to_dict() for g in self.groups]}

    @classmethod
    def from_dict(cls, d: dict) -> "GroupsDone":
        return cls([Group.from_dict(g) for g in d["groups"]])


@dataclass
class EvalStarted:
    """Outbox: the shard `shard` of the evaluation of `version` runs on its own copy of the weights, so
    weights newer than those it scores may come (with no copy, the EvalResult says so)."""

    version: int
    shard: int


@dataclass
class EvalResult:
    """Outbox: this worker's shard of a held-out evaluation (areal.evaluate metrics plus eval/step)."""

    result: dict


@dataclass
class WorkerStats:
    """Outbox: running totals (engine counters, pauses, busy/idle seconds, reward failures)."""

    stats: dict = field(default_factory=dict)


@dataclass
class WeightGroup:
    """Join weight-broadcast group `generation` at `address` as `rank` (1..world_size-1; rank 0 sends).
    The trainer re-forms the group, with a new generation, whenever a worker dies or joins."""

    address: str
    rank: int
    world_size: int
    generation: int
