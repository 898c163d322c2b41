"""Every message the processes of a run exchange over `areal.channel`, in one place.

    controller -> role       Stop, RoleLost (to trainer0: a rollout worker died)
    role -> controller       Hello, Heartbeat (the channel sends both), RoleError, RunPlaced, RunFinished
    trainer0 -> rollout r    WeightGroup, PromptBatch, EvalRequest, SnapshotRequest, ResumeGroups, Stop
    rollout r -> trainer0    WorkerReady, GroupsDone, EvalStarted, EvalResult, WorkerSnapshot, WorkerStats
    trainer0 -> trainer k    TrainerGroup, RunPlaced, TrainStep, SaveCheckpoint, ExportModel, Stop
    trainer k -> trainer0    ShardSaved

Each is a dataclass registered with `areal.channel.message`; fields are plain data or types with
`to_dict()` / `from_dict()` (Group, Prompt, InFlightGroup). Weights never travel here: they go
over torch.distributed broadcasts (areal/transport.py), whose group `WeightGroup` describes.
"""

from __future__ import annotations

from dataclasses import dataclass

from areal.channel import message
from areal.rollout.messages import (EvalRequest, EvalResult, EvalStarted, GroupsDone, InFlightGroup, PromptBatch,
                                    ResumeGroups, SnapshotRequest, WeightGroup, WorkerSnapshot, WorkerStats)
from areal.trajectory import Group


# ------------------------------------------------------------------ control
@message
@dataclass
class Hello:
    """First message of every connection (the channel sends it): the role is up and reachable."""

    role: str


@message
@dataclass
class Heartbeat:
    """Sent by the channel every second, so a role that stops answering is noticed."""


@message
@dataclass
class Stop:
    reason: str = ""


@message
@dataclass
class RoleError:
    """A role failed. `kind` is the exception's class name: bad input (ConfigError, DataError,
    FileNotFoundError) is re-raised by the controller as one line, anything else with `traceback`."""

    role: str
    kind: str
    message: str
    traceback: str


@message
@dataclass
class RunPlaced:
    """trainer0 validated every input and chose the run folder and the checkpoint to resume from."""

    run_dir: str
    checkpoint: str | None


@message
@dataclass
class RunFinished:
    """trainer0's summary of the run (it holds "preempted_step" when pre-empted)."""

    summary: dict


@message
@dataclass
class RoleLost:
    """The controller saw a role die (or fall silent); `restarting`: a replacement is being started."""

    role: str
    reason: str
    restarting: bool


# ------------------------------------------------------------------ rollout
@message
@dataclass
class WorkerReady:
    """A rollout worker loaded its model and can join the weight broadcast group."""

    rank: int
    incarnation: int = 0  # 0 for the first process of this rank, +1 per restart


# the rollout worker's own protocol, defined beside it (rollout/messages.py)
for _cls in (PromptBatch, EvalRequest, SnapshotRequest, ResumeGroups, WeightGroup, GroupsDone, EvalStarted, EvalResult,
             WorkerStats, WorkerSnapshot):
    message(_cls)


# ------------------------------------------------------------------ trainer ranks
@message
@dataclass
class TrainerGroup:
    """The trainer ranks' own process group (DDP / ZeRO): its store is hosted by trainer0 at `address`."""

    address: str
    world_size: int


@message
@dataclass
class TrainStep:
    """The groups of one update: every rank receives all of them and trains its token-balanced
    share (areal.trainer.engine); advantages are group-normalised over the whole batch."""

    step: int
    groups: list[Group]

    def to_dict(self) -> dict:
        return {"step": self.step, "groups": [g.to_dict() for g in self.groups]}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainStep":
        return cls(int(d["step"]), [Group.from_dict(g) for g in d["groups"]])


__all__ = [
    "Hello", "Heartbeat", "Stop", "RoleError", "RunPlaced", "RunFinished", "RoleLost", "WorkerReady", "WeightGroup",
    "GroupsDone", "EvalStarted", "EvalResult", "WorkerStats", "PromptBatch", "EvalRequest", "SnapshotRequest", "ResumeGroups",
    "WorkerSnapshot", "InFlightGroup", "TrainerGroup", "TrainStep", "ExportModel", "SaveCheckpoint", "ShardSaved",
]


@message
@dataclass
class ExportModel:
    """Join the export of the policy to `path` (a gather every trainer rank takes part in; rank 0 writes)."""

    path: str


@message
@dataclass
class SaveCheckpoint:
    """Write this rank's shard of checkpoint `step` (ZeRO over several ranks; trainer0 commits it)."""

    step: int
    wait: bool = False


@message
@dataclass
class ShardSaved:
    """Rank `rank` started its shard of checkpoint `step`; `meta` is its train-engine meta (JSON), which
    trainer0 keeps in the checkpoint's state so the rank can load its own partition on resume."""

    step: int
    rank: int
    meta: dict
