"""A rollout worker: prompts in, rewarded whole groups out.

It owns a generation backend (areal's engine or HF `generate`) and a reward pool and knows
nothing of the trainer: weights arrive only through `update_weights` / a weight receiver.
`rollout()` serves the synchronous loop; `serve()` is the streaming loop of a worker process.

Exact resume: a `SnapshotRequest` makes `serve()` report every admitted group not yet shipped
(prompt, finished samples, the samples still generating with their tokens so far) without
stopping anything; `ResumeGroups` hands such groups to a fresh worker, which continues them
(re-prefilling prompt + tokens) before anything newer. The messages are in rollout/messages.py.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from areal.rewards import RewardRequest
from areal.rollout.messages import (EvalRequest, EvalResult, EvalStarted, GroupsDone, InFlightGroup, Prompt, PromptBatch,
                                    ResumeGroups, SnapshotRequest, WorkerSnapshot, WorkerStats)
from areal.rollout.types import GenerationOutput, PartialSample, SamplingParams
from areal.trajectory import Group, Trajectory

log = logging.getLogger("areal.rollout")
_RESERVED = ("prompt", "completion")  # positional names of the reward signature
# training groups step first; an evaluation on its own engine takes the steps they leave, and while they
# leave none, one step in EVAL_SHARE, so it still finishes when generation never pauses
EVAL_SHARE = 8


@dataclass
class _Running:
    """A group started on the backend: its samples so far and the engine request producing the rest."""

    group: InFlightGroup  # as admitted (group id, min_version, prompt)
    outputs: list[GenerationOutput]  # finished samples
    request_id: int | None = None  # None: nothing left to generate

    def snapshot(self, backend) -> InFlightGroup:
        partial = backend.unfinished(self.request_id) if self.request_id is not None else []
        return dataclasses.replace(self.group, finished=list(self.outputs), partial=partial)


@dataclass
class _Evaluating:
    """A held-out evaluation generating on `engine`: the worker's evaluation engine, holding a copy of
    the weights it scores, or (with none) the worker's own engine beside the training groups, which
    then applies no weight update until it is scored. Either way every evaluated token comes from
    one version."""

    request: EvalRequest
    engine: Any
    started: float  # perf_counter
    outputs: dict[int, GenerationOutput] = field(default_factory=dict)  # by prompt position

    def complete(self) -> bool:
        return len(self.outputs) == len(self.request.prompts)


def rng_state(backend) -> dict:
    """The RNG state a worker's generation draws on, JSON-able: the process's generators and (the
    engine's) the python Random that seeds unseeded requests."""
    from areal.runtime import rng_state as process_rng_state

    state = process_rng_state()
    if hasattr(backend, "get_rng_state"):
        state["engine"] = backend.get_rng_state()
    return state


def set_rng_state(backend, state: dict) -> None:
    from areal.runtime import set_rng_state as set_process_rng_state

    set_process_rng_state(state)
    if "engine" in state and hasattr(backend, "set_rng_state"):
        backend.set_rng_state(state["engine"])


def reward_fields(row: dict[str, Any], prompt_key: str, answer_key: str) -> dict[str, Any]:
    fields = {k: v for k, v in row.items() if k != prompt_key and k not in _RESERVED}
    fields["answer"] = row[answer_key]  # the reward always sees the reference as `answer`
    return fields


def group_seed(base_seed: int, group_id: int) -> int:
    """Each group samples from its own seed, so results do not depend on batching or timing."""
    return (base_seed * 1_000_003 + group_id) % (1 << 31)


class RolloutWorker:
    """`eval_backend`: a second engine of the same model that held-out evaluations run on, with a copy
    of the weights they score, so training generation takes newer weights meanwhile and the trainer
    never waits for a batch an evaluation held back (None: evaluations run on `backend`)."""

    def __init__(self, backend, reward_pool, tokenizer, params: SamplingParams, base_seed: int = 0, eval_backend=None):
        self.backend, self.reward_pool, self.tokenizer = backend, reward_pool, tokenizer
        self.eval_backend = eval_backend
        self.params, self.base_seed = params, base_seed
        self.streaming = hasattr(backend, "add_request")
        self.receiver = None  # a rollout.weight_receiver.WeightReceiver; serve() applies its updates

    @property
    def version(self) -> int:
        return self.backend.version

    def update_weights(self, version: int, named_tensors, mode: str = "keep") -> None:
        self.backend.update_weights(version, named_tensors, mode=mode)

    def _params(self, group_id: int) -> SamplingParams:
        return dataclasses.replace(self.params, seed=group_seed(self.base_seed, group_id))

    def _start(self, group_id: int, prompt: Prompt, on_finish, resume: list[PartialSample] | None = None) -> int:
        extra = {} if resume is None else {"resume": resume}
        return self.backend.add_request(prompt.token_ids, self._params(group_id), on_finish=on_finish, **extra)

    def _launch(self, group: InFlightGroup, on_finish) -> _Running:
        """Start an admitted group on the streaming backend; a resumed one keeps its finished samples
        and continues the others from their tokens so far (a missing sample starts fresh)."""
        running = _Running(group, list(group.finished))
        if not group.finished and not group.partial:
            running.request_id = self._start(group.group_id, group.prompt, on_finish)
            return running
        have = {o.sample_index for o in group.finished}
        partial = {p.sample_index: p for p in group.partial}
        resume = [partial.get(i, PartialSample(i)) for i in range(self.params.n) if i not in have]
        if resume:
            running.request_id = self._start(group.group_id, group.prompt, on_finish, resume=resume)
        return running

    def make_groups(self, finished: list[tuple[int, Prompt, list[GenerationOutput]]]) -> list[Group]:
        """Decode, score and package each (group id, prompt, its n samples): one reward call for all."""
        outputs = [(prompt, o) for _, prompt, outs in finished for o in outs]
        texts = self.tokenizer.batch_decode([o.token_ids for _, o in outputs], skip_special_tokens=True)
        scored = self.reward_pool.score(
            [RewardRequest(prompt=prompt.text, completion=t, fields=prompt.fields) for (prompt, _), t in zip(outputs, texts)]
        )
        groups, start = [], 0
        for group_id, prompt, outs in finished:
            end = start + len(outs)
            trajs = [Trajectory(prompt.token_ids, o.token_ids, o.logprobs, o.versions, reward, o.finish_reason, prompt.text,
                                text) for o, text, reward in zip(outs, texts[start:end], scored.rewards[start:end])]
            failures = dict(Counter(kind for kind in scored.kinds[start:end] if kind is not None))
            groups.append(Group(group_id=group_id, trajectories=trajs, fields=prompt.fields, reward_failures=failures,
                                prompt_index=prompt.index))
            start = end
        return groups

    def rollout(self, prompts: list[Prompt], group_ids: list[int]) -> tuple[list[Group], dict[str, float]]:
        """Generate n samples per prompt (all at once), score them; returns whole groups plus timings."""
        t0 = time.perf_counter()
        if self.streaming:
            samples: dict[int, list[GenerationOutput]] = {g: [] for g in group_ids}
            for g, p in zip(group_ids, prompts):
                self._start(g, p, lambda _rid, out, g=g: samples[g].append(out))
            while self.backend.has_unfinished():
                self.backend.step()
            outputs = [sorted(samples[g], key=lambda o: o.sample_index) for g in group_ids]
        else:
            params = dataclasses.replace(self.params, seed=group_seed(self.base_seed, group_ids[0]))
            flat = self.backend.generate([p.token_ids for p in prompts], params)
            n = self.params.n
            outputs = [flat[i * n : (i + 1) * n] for i in range(len(prompts))]
        t1 = time.perf_counter()
        groups = self.make_groups(list(zip(group_ids, prompts, outputs)))
        t2 = time.perf_counter()
        timings = {
            "time/generate_s": t1 - t0,
            "time/reward_s": t2 - t1,
            "rollout/generated_tokens": sum(len(t.completion_ids) for g in groups for t in g.trajectories),
        }
        return groups, timings

    def evaluate(self, request: EvalRequest) -> dict:
        """Held-out evaluation on a static-batch backend (HF generate): blocking, with its current weights."""
        from areal.evaluate import evaluate

        result = evaluate(self.backend, self.reward_pool, self.tokenizer, request.prompts, request.max_new_tokens)
        return self._eval_result(request, result, self.backend.version)

    def _start_eval(self, request: EvalRequest) -> _Evaluating:
        """Queue an evaluation's prompts on a streaming engine, never blocking: the groups admitted
        meanwhile keep flowing to the trainer (a blocking evaluation stalled them, and the trainer
        waited for its next batch after every evaluation). On the evaluation engine, with a copy of the
        current weights, when the worker has one; else on its own engine, in the same batches."""
        from areal.evaluate import eval_params

        engine = self.eval_backend or self.backend
        if engine is not self.backend:
            engine.copy_weights_from(self.backend)
        evaluating = _Evaluating(request, engine, time.perf_counter())
        params = eval_params(request.max_new_tokens)
        for i, prompt in enumerate(request.prompts):
            engine.add_request(prompt.token_ids, params, prompt_index=i,
                               on_finish=lambda _rid, out, i=i: evaluating.outputs.__setitem__(i, out))
        return evaluating

    def _finish_eval(self, evaluating: _Evaluating) -> dict:
        from areal.evaluate import score

        outputs = [evaluating.outputs[i] for i in range(len(evaluating.request.prompts))]
        result = score(self.reward_pool, self.tokenizer, evaluating.request.prompts, outputs, evaluating.started)
        return self._eval_result(evaluating.request, result, evaluating.engine.version)

    def _eval_result(self, request: EvalRequest, result: dict, version: int) -> dict:
        return {**result, "eval/step": request.version, "eval/version": version, "eval/shard": request.shard}

    def _snapshot(self, step: int, in_flight, pending) -> WorkerSnapshot:
        """Every admitted group not yet shipped, as of now (reads only: generation goes on untouched)."""
        groups = [r.snapshot(self.backend) for r in in_flight] + [dataclasses.replace(g) for g in pending]
        return WorkerSnapshot(step, groups, rng_state(self.backend))

    def _resume(self, msg: ResumeGroups, pending: deque) -> None:
        """Queue a checkpoint's groups ahead of everything admitted here (they are older)."""
        if msg.rng_state is not None:
            set_rng_state(self.backend, msg.rng_state)
        pending.extendleft(reversed(msg.groups))

    def serve(self, inbox, outbox, mode: str = "keep", on_control=None, stats_every_s: float = 0.2) -> None:
        """Streaming loop: start admitted prompts, step the engine, ship each group as it completes.

        inbox.get(timeout) / get_nowait() yield `PromptBatch`es, `EvalRequest`s, `SnapshotRequest`s and
        `ResumeGroups`, and finally None (stop once every admitted group has shipped); anything else goes
        to `on_control` (a new weight group, which swaps `self.receiver`). outbox.put() receives
        `GroupsDone`, `EvalStarted`, `EvalResult`, `WorkerSnapshot` and `WorkerStats`. Weight updates from `self.receiver`
        are applied between two engine steps; nothing here blocks for long, so control messages are
        always read (an evaluation waiting for newer weights waits in `evals`, not in a call).
        """
        from areal.rollout.weight_receiver import apply

        engine = self.backend
        pending: deque[InFlightGroup] = deque()  # admitted, waiting for weights of their min_version
        evals: deque[EvalRequest] = deque()  # waiting for weights of their version
        evaluating: _Evaluating | None = None  # the one generating now
        in_flight: dict[int, _Running] = {}  # started, by group id, in start order
        done: list[int] = []
        stopping, pause_s, updates, last_stats = False, 0.0, 0, time.perf_counter()
        busy_s, idle_s = 0.0, 0.0
        train_steps_in_a_row = 0  # engine steps taken while an evaluation on its own engine waited

        def holds_weights() -> bool:  # an evaluation on this engine: no update until it is scored
            return evaluating is not None and evaluating.engine is engine

        def evaluation_busy() -> bool:  # an evaluation on its own engine, still generating
            return evaluating is not None and evaluating.engine is not engine and evaluating.engine.has_unfinished()

        def take(update) -> None:  # apply a received update between two engine steps, and count it
            nonlocal pause_s, updates
            if update is not None:
                pause_s += apply(update, engine, mode)
                updates += 1

        def receive(receiver, call) -> None:
            """A broken weight group (a member died mid-broadcast) is left, not fatal: the trainer
            re-forms the group and `on_control` installs the new receiver (perhaps already)."""
            try:
                take(call())
            except (RuntimeError, ConnectionError) as e:
                log.warning("weight group left after an error (the trainer re-forms it): %s", e)
                receiver.abandon()
                if self.receiver is receiver:
                    self.receiver = None

        def on_finish(group_id: int, out: GenerationOutput) -> None:
            outs = in_flight[group_id].outputs
            outs.append(out)
            if len(outs) == self.params.n:
                done.append(group_id)

        def ship(group_ids: list[int]) -> None:
            running = [(g, in_flight.pop(g)) for g in group_ids]
            outbox.put(GroupsDone(self.make_groups([(g, r.group.prompt, sorted(r.outputs, key=lambda o: o.sample_index))
                                                    for g, r in running])))

        while not (stopping and not pending and not in_flight and not evals and evaluating is None):
            t0 = time.perf_counter()
            receiver = self.receiver
            if receiver is not None and not holds_weights():
                receive(receiver, receiver.poll)
            idle = not (self.streaming and (engine.has_unfinished() or evaluation_busy()))
            try:
                # nothing to step: wait a little for a message (admitted groups waiting for weights need no hot loop)
                msg = inbox.get(timeout=0.02) if idle else inbox.get_nowait()
            except queue.Empty:
                msg = False
            if msg is None:
                stopping = True
            elif isinstance(msg, EvalRequest):
                evals.append(msg)
            elif isinstance(msg, SnapshotRequest):
                outbox.put(self._snapshot(msg.step, in_flight.values(), pending))
            elif isinstance(msg, ResumeGroups):
                self._resume(msg, pending)
            elif isinstance(msg, PromptBatch):
                pending.extend(InFlightGroup(g, msg.min_version, p) for g, p in zip(msg.group_ids, msg.prompts))
            elif msg is not False and on_control is not None:
                on_control(msg)
            receiver = self.receiver  # on_control may have just replaced it
            wanted = min([e.version for e in evals] + ([pending[0].min_version] if pending else []), default=None)
            if wanted is not None and wanted > engine.version and idle and receiver is not None and not holds_weights():
                try:  # eta=0, a fast worker or an evaluation: waiting for weights not yet here
                    receive(receiver, lambda: receiver.wait_for(wanted, timeout=0.05))
                except TimeoutError:
                    pass
            ready: list[InFlightGroup] = []
            while pending and pending[0].min_version <= engine.version:
                ready.append(pending.popleft())
            if ready and not self.streaming:  # a static-batch backend (HF generate): one batch at a time
                groups, _ = self.rollout([r.prompt for r in ready], [r.group_id for r in ready])  # resumed: whole
                outbox.put(GroupsDone(groups))
                ready = []
            for group in ready:
                g = group.group_id
                in_flight[g] = self._launch(group, lambda _rid, out, g=g: on_finish(g, out))
                if in_flight[g].request_id is None:  # resumed with every sample already finished
                    done.append(g)
            if evaluating is None and evals and evals[0].version <= engine.version:  # after the ready groups
                if self.streaming:
                    evaluating = self._start_eval(evals.popleft())
                    if evaluating.engine is not engine:  # the trainer may send newer weights (even within a step)
                        outbox.put(EvalStarted(evaluating.request.version, evaluating.request.shard))
                else:
                    outbox.put(EvalResult(self.evaluate(evals.popleft())))
            if evaluation_busy() and (train_steps_in_a_row >= EVAL_SHARE or not engine.has_unfinished()):
                evaluating.engine.step()
                train_steps_in_a_row = 0
            elif self.streaming and engine.has_unfinished():
                engine.step()
                train_steps_in_a_row += evaluation_busy()
            if done:
                ship(done)
                done.clear()
            if evaluating is not None and evaluating.complete():
                outbox.put(EvalResult(self._finish_eval(evaluating)))
                evaluating = None
            spent = time.perf_counter() - t0
            busy_s, idle_s = (busy_s + spent, idle_s) if not idle or in_flight else (busy_s, idle_s + spent)
            if time.perf_counter() - last_stats > stats_every_s or (stopping and not in_flight and not pending):
                last_stats = time.perf_counter()
                # the pool's own counters: evaluation's failures too, as a sync run reports them
                outbox.put(WorkerStats({**engine.stats(), "pause_s": pause_s, "weight_updates": updates,
                                        "busy_s": busy_s, "idle_s": idle_s,
                                        "reward_failures": dict(self.reward_pool.total_failures)}))
