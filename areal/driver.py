"""Driving a run, whatever its mode: log every step, evaluate, checkpoint, export, summarise.

`drive()` takes a loop that yields (step, groups, metrics) after every policy update and can
`capture()` its resumable state: `areal.sync_loop.SyncLoop` (one process) or
`areal.async_loop.AsyncLoop` (trainer rank 0 of an async run).
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from areal.checkpoint.session import CheckpointSession, Preempted, Restored, truncate_metrics
from areal.config import to_dict
from areal.console import RunView, console
from areal.evaluate import CORRECT_ABOVE
from areal.metrics import MetricsSink, read_metrics
from areal.report import write_report
from areal.rewards.pool import FAILURE_KINDS
from areal.setup import Setup


def group_metrics(groups) -> dict[str, float]:
    trajs = [t for g in groups for t in g.trajectories]
    rewards = [t.reward for t in trajs]
    failures = {f"reward/failures_{kind}": 0 for kind in FAILURE_KINDS}
    for g in groups:
        for kind, count in g.reward_failures.items():
            failures[f"reward/failures_{kind}"] = failures.get(f"reward/failures_{kind}", 0) + count
    return {
        **failures,
        "reward/mean": sum(rewards) / len(rewards),
        "reward/accuracy": sum(r > CORRECT_ABOVE for r in rewards) / len(rewards),
        "rollout/response_length": sum(len(t.completion_ids) for t in trajs) / len(trajs),
        "rollout/truncated_fraction": sum(t.finish_reason == "length" for t in trajs) / len(trajs),
    }


def drive(s: Setup, loop, eval_fn, session: CheckpointSession, restored: Restored | None = None,
          extra_summary=None) -> dict:
    """Log every step, evaluate every `run.eval_every`, checkpoint when due, export the model, and
    write report.png; returns the summary.

    `loop` yields (step, groups, metrics) after every update and `capture()`s its resumable state.
    eval_fn(step) returns the held-out metrics, or a Future of them (async runs evaluate on a
    rollout worker while training goes on): a step's row is logged once its evaluation is in,
    so rows stay in step order with the accuracy of that step's weights.
    A resumed run (`restored`) keeps metrics.jsonl up to its checkpoint and continues after it.
    """
    recipe, run_dir, last_step = s.recipe, s.run_dir, s.recipe.trainer.steps
    prior = truncate_metrics(run_dir, restored.step) if restored else []
    carried = restored.state["drive"] if restored else {"generated": 0, "wall_s": 0.0, "wandb_id": None}
    start = time.perf_counter() - carried["wall_s"]  # the wall clock continues across a resume
    sink = MetricsSink(run_dir, recipe.logging, to_dict(recipe), wandb_id=carried["wandb_id"])
    waiting: deque[tuple[int, dict, object]] = deque()  # (step, metrics, evaluation or None), in step order
    # held-out accuracy of the first and of the latest evaluation (not of every one: a long run makes thousands)
    evaluated = [r["eval/accuracy"] for r in prior if "eval/accuracy" in r]
    accuracy = [evaluated[0], evaluated[-1]] if evaluated else [None, None]
    generated = carried["generated"]

    def request_eval(step: int) -> Future:
        evaluation = eval_fn(step)
        if not isinstance(evaluation, Future):  # evaluated in place: already done
            done, evaluation = evaluation, Future()
            evaluation.set_result(done)
        # stamp when the result is in, not when it is logged
        evaluation.add_done_callback(lambda f: setattr(f, "wall_s", time.perf_counter() - start))
        return evaluation

    def flush(view, block: bool) -> None:
        while waiting and (block or waiting[0][2] is None or waiting[0][2].done()):
            step, metrics, evaluation = waiting.popleft()
            if evaluation is not None:
                result = _result(evaluation)  # done() can come a moment before the stamping callback
                wall = getattr(evaluation, "wall_s", time.perf_counter() - start)
                metrics.update({**result, "eval/wall_s": wall})
                if accuracy[0] is None:
                    accuracy[0] = result["eval/accuracy"]
                accuracy[1] = result["eval/accuracy"]
            sink.log(step, metrics)
            if step == 0:
                console.print(f"initial held-out accuracy {metrics['eval/accuracy']:.3f}")
            else:
                view.step(step, metrics)

    def checkpoint(view, step: int, wait: bool) -> None:
        if session.busy() and recipe.checkpoint.on_busy == "skip" and not wait:
            session.skip(step)  # the previous one is still being written
            return
        if wait or recipe.checkpoint.on_busy == "wait":
            flush(view, block=True)  # a pending checkpoint may wait for these rows
            session.wait_idle()  # the previous cut is recorded whole before the next one starts
        state, extras = loop.capture()
        state["drive"] = {"generated": generated, "wall_s": time.perf_counter() - start, "wandb_id": sink.wandb_id}
        session.save(step, state, [*extras, sink.on_disk(step)], wait=wait)

    try:
        with RunView(last_step, recipe.logging.progress_bar, recipe.logging.console_every) as view:
            if restored is None:
                waiting.append((0, {"time/wall_s": 0.0}, request_eval(0)))
            else:
                console.print(f"resumed from step {restored.step} ({restored.path})")
            flush(view, block=False)
            for step, groups, metrics in loop:
                metrics.update(group_metrics(groups))
                metrics.update(session.metrics())
                metrics["version"] = step
                metrics["data/group_ids"] = [g.group_id for g in groups]  # nothing lost or trained twice, across resumes
                metrics["data/sample_ids"] = [g.prompt_index for g in groups]
                generated += sum(len(t.completion_ids) for g in groups for t in g.trajectories)
                metrics["time/wall_s"] = time.perf_counter() - start
                due = step % recipe.run.eval_every == 0 or step == last_step
                waiting.append((step, metrics, request_eval(step) if due else None))
                flush(view, block=False)
                if session.preempt:
                    checkpoint(view, step, wait=True)
                    raise Preempted(step, str(session.path_of(step)))
                if session.due(step, last_step):
                    checkpoint(view, step, wait=False)
                if recipe.checkpoint.export_every and step % recipe.checkpoint.export_every == 0:
                    session.export(run_dir / "exports" / f"step_{step}")
            flush(view, block=True)
        session.export(run_dir / "model")
        session.close()
    finally:
        sink.close()
    summary = {
        "eval_accuracy_initial": accuracy[0],
        "eval_accuracy_final": accuracy[1],
        "steps": last_step,
        "resumed_from_step": restored.step if restored else None,
        "loop_seconds": time.perf_counter() - start,  # first evaluation to the last step, across resumes
        "generated_tokens": generated,
        "mode": recipe.run.mode,
        "backend": recipe.rollout.backend,
        "model_dir": str(run_dir / "model"),
        **session.summary(),
        **(extra_summary() if extra_summary else {}),
    }
    write_report(read_metrics(run_dir / "metrics.jsonl"), run_dir / "report.png", title=run_dir.name)
    return summary


def _result(evaluation: Future, timeout_s: float = 600.0) -> dict:
    try:
        return evaluation.result(timeout=timeout_s)
    except TimeoutError:
        raise TimeoutError(f"no held-out evaluation result within {timeout_s:.0f} s (rollout workers stuck?)") from None


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


