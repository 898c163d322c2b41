"""A rollout worker: prompts in, rewarded whole groups out.

It owns a generation backend (areal's engine or HF `generate`) and a reward pool and knows
nothing of the trainer: weights arrive only through `update_weights` / a weight receiver.
`rollout()` serves the synchronous loop; `serve()` is the streaming loop of a worker process.
"""

from __future__ import annotations

import dataclasses
import queue
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from areal.rollout.types import GenerationOutput, SamplingParams

from areal.rewards import RewardRequest
from areal.trajectory import Group, Trajectory

_RESERVED = ("prompt", "completion")  # positional names of the reward signature


@dataclass
class Prompt:
    """A dataset row made ready to generate from."""

    index: int  # row index in its split
    text: str
    token_ids: list[int]
    fields: dict[str, Any]  # the row's other columns, passed to the reward


@dataclass
class PromptBatch:
    """Admitted prompts for a worker; none may start before the worker holds `min_version` weights."""

    min_version: int
    group_ids: list[int]
    prompts: list[Prompt]


@dataclass
class EvalRequest:
    """Score `prompts` greedily with weights of at least `version`; the worker replies ("eval", results)."""

    version: int
    prompts: list[Prompt]
    max_new_tokens: int


def reward_fields(row: dict[str, Any], prompt_key: str, answer_key: str) -> dict[str, Any]:
    fields = {k: v for k, v in row.items() if k != prompt_key and k not in _RESERVED}
    fields["answer"] = row[answer_key]  # the reward always sees the reference as `answer`
    return fields


def group_seed(base_seed: int, group_id: int) -> int:
    """Each group samples from its own seed, so results do not depend on batching or timing."""
    return (base_seed * 1_000_003 + group_id) % (1 << 31)


class RolloutWorker:
    def __init__(self, backend, reward_pool, tokenizer, params: SamplingParams, base_seed: int = 0):
        self.backend, self.reward_pool, self.tokenizer = backend, reward_pool, tokenizer
        self.params, self.base_seed = params, base_seed
        self.streaming = hasattr(backend, "add_request")
        self.reward_failures: dict[str, int] = {}

    @property
    def version(self) -> int:
        return self.backend.version

    def update_weights(self, version: int, named_tensors, mode: str = "keep") -> None:
        self.backend.update_weights(version, named_tensors, mode=mode)

    def _params(self, group_id: int) -> SamplingParams:
        return dataclasses.replace(self.params, seed=group_seed(self.base_seed, group_id))

    def _start(self, group_id: int, prompt: Prompt, on_finish) -> None:
        self.backend.add_request(prompt.token_ids, self._params(group_id), on_finish=on_finish)

    def make_group(self, group_id: int, prompt: Prompt, outputs: list[GenerationOutput]) -> Group:
        """Decode, score and package one prompt's n samples."""
        texts = self.tokenizer.batch_decode([o.token_ids for o in outputs], skip_special_tokens=True)
        scored = self.reward_pool.score(
            [RewardRequest(prompt=prompt.text, completion=t, fields=prompt.fields) for t in texts]
        )
        for kind, count in scored.failures.items():
            self.reward_failures[kind] = self.reward_failures.get(kind, 0) + count
        trajs = [
            Trajectory(prompt.token_ids, o.token_ids, o.logprobs, o.versions, reward, o.finish_reason, prompt.text, text)
            for o, text, reward in zip(outputs, texts, scored.rewards)
        ]
        failures = {kind: count for kind, count in scored.failures.items() if count}
        return Group(group_id=group_id, trajectories=trajs, fields=prompt.fields, reward_failures=failures)

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
        groups = [self.make_group(g, p, outs) for g, p, outs in zip(group_ids, prompts, outputs)]
        t2 = time.perf_counter()
        timings = {
            "time/generate_s": t1 - t0,
            "time/reward_s": t2 - t1,
            "rollout/generated_tokens": sum(len(t.completion_ids) for g in groups for t in g.trajectories),
        }
        return groups, timings

    def evaluate(self, request: EvalRequest) -> dict:
        """Held-out evaluation on this worker's engine with its current weights (`serve` first waits
        for version >= request.version and applies no other update until this returns, so every
        evaluated token comes from one version). Requests in flight keep running meanwhile."""
        from areal.evaluate import evaluate

        result = evaluate(self.backend, self.reward_pool, self.tokenizer, request.prompts, request.max_new_tokens)
        return {**result, "eval/step": request.version, "eval/version": self.backend.version}

    def serve(self, inbox, outbox, receiver=None, mode: str = "keep", stats_every_s: float = 0.2) -> None:
        """Streaming loop: start admitted prompts, step the engine, ship each group as it completes.

        inbox yields `PromptBatch`es and `EvalRequest`s, finally None; outbox receives ("group",
        Group), ("eval", dict) and ("stats", dict). Weight updates are applied between two engine steps.
        """
        from areal.rollout.weight_receiver import apply

        engine = self.backend
        pending: deque[tuple[int, int, Prompt]] = deque()  # (min_version, group_id, prompt)
        in_flight: dict[int, tuple[Prompt, list[GenerationOutput]]] = {}
        done: list[int] = []
        stopping, pause_s, updates, last_stats = False, 0.0, 0, time.perf_counter()
        busy_s, idle_s = 0.0, 0.0

        def take(update) -> None:  # apply a received update between two engine steps, and count it
            nonlocal pause_s, updates
            if update is not None:
                pause_s += apply(update, engine, mode)
                updates += 1

        def on_finish(group_id: int, out: GenerationOutput) -> None:
            outs = in_flight[group_id][1]
            outs.append(out)
            if len(outs) == self.params.n:
                done.append(group_id)

        while not (stopping and not pending and not in_flight):
            t0 = time.perf_counter()
            take(receiver.poll() if receiver is not None else None)
            idle = not (self.streaming and engine.has_unfinished())
            try:
                msg = inbox.get(timeout=0.02) if idle and not pending else inbox.get_nowait()
            except queue.Empty:
                msg = False
            if msg is None:
                stopping = True
            elif isinstance(msg, EvalRequest):
                if engine.version < msg.version and receiver is not None:
                    take(receiver.wait_for(msg.version, timeout=600.0))
                outbox.put(("eval", self.evaluate(msg)))
            elif msg:
                pending.extend((msg.min_version, g, p) for g, p in zip(msg.group_ids, msg.prompts))
            if pending and pending[0][0] > engine.version and idle and receiver is not None:
                try:  # eta=0 or a fast worker: the admitted prompts need weights not yet here
                    take(receiver.wait_for(pending[0][0], timeout=0.05))
                except TimeoutError:
                    pass
            ready = []
            while pending and pending[0][0] <= engine.version:
                ready.append(pending.popleft()[1:])
            if ready and not self.streaming:  # a static-batch backend (HF generate): one batch at a time
                groups, _ = self.rollout([p for _, p in ready], [g for g, _ in ready])
                for group in groups:
                    outbox.put(("group", group))
                ready = []
            for g, p in ready:
                in_flight[g] = (p, [])
                self._start(g, p, lambda _rid, out, g=g: on_finish(g, out))
            if self.streaming and engine.has_unfinished():
                engine.step()
            for g in done:
                prompt, outs = in_flight.pop(g)
                outbox.put(("group", self.make_group(g, prompt, sorted(outs, key=lambda o: o.sample_index))))
            done.clear()
            spent = time.perf_counter() - t0
            busy_s, idle_s = (busy_s + spent, idle_s) if not idle or in_flight else (busy_s, idle_s + spent)
            if time.perf_counter() - last_stats > stats_every_s or (stopping and not in_flight and not pending):
                last_stats = time.perf_counter()
                outbox.put(("stats", {**engine.stats(), "pause_s": pause_s, "weight_updates": updates,
                                      "busy_s": busy_s, "idle_s": idle_s, "reward_failures": dict(self.reward_failures)}))
