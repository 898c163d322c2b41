"""Checkpoint settings: when to snapshot, how many to keep, whether to resume, when to export."""

from __future__ import annotations

from dataclasses import dataclass

from areal.options import option


@dataclass
class CheckpointConfig:
    every_steps: int = option(25, "Checkpoint every N training steps (0 = off). The call returns at once: tensors "
                                  "are copied while the next step runs and written in the background.")
    every_seconds: float = option(0.0, "Also checkpoint when this many seconds passed since the last one (0 = off).")
    keep_last: int = option(2, "Complete checkpoints kept under run_dir/ckpt; older ones are deleted.")
    on_busy: str = option(
        "skip",
        "A checkpoint falls due while the previous one is still being written: skip it (logged and counted "
        "in ckpt/skipped) or wait for the previous one.",
        choices=("skip", "wait"),
    )
    resume: str = option(
        "auto",
        "auto: continue from the newest complete checkpoint of this run (run.run_dir, or the newest unfinished "
        "run of this recipe under runs/) and start fresh when there is none; never: always start fresh; must: "
        "fail when there is no checkpoint to resume from.",
        choices=("auto", "never", "must"),
    )
    export_every: int = option(0, "Also export the policy as a Hugging Face model to run_dir/exports/step_N every "
                                   "N steps (0 = off). The final model always goes to run_dir/model.")
