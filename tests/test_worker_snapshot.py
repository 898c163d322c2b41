"""A rollout worker's in-flight state survives a crash: `SnapshotRequest` reports every admitted group
not yet shipped (finished samples, samples still generating with their tokens so far) without
disturbing generation, and a fresh worker given `ResumeGroups` of it ships exactly the groups an
uninterrupted worker would have (seeded groups: same tokens, log-probs to float tolerance)."""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import pytest
import torch

from areal.rollout import Engine, GenerationOutput, SamplingParams
from areal.rollout.types import PartialSample
from areal.rollout.messages import (
    EvalRequest,
    EvalResult,
    EvalStarted,
    GroupsDone,
    InFlightGroup,
    Prompt,
    PromptBatch,
    ResumeGroups,
    SnapshotRequest,
    WorkerSnapshot,
    WorkerStats,
)
from areal.rollout.worker import RolloutWorker, reward_fields

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "assets" / "models" / "tiny-math")
# temperature 2: the samples of a group end at different steps, so a snapshot catches groups half done
PARAMS = SamplingParams(n=4, max_new_tokens=10, temperature=2.0)
EMPTY = object()


class ScriptedInbox(queue.Queue):
    """A queue.Queue that serve() reads one entry per loop iteration (one engine step each):
    EMPTY is an iteration without a message, so a snapshot lands at a known step."""

    def __init__(self, items):
        super().__init__()
        for item in items:
            self.put(item)

    def get(self, block=True, timeout=None):
        item = super().get(block=False)  # raises queue.Empty once the script is over
        if item is EMPTY:
            raise queue.Empty
        return item

    def get_nowait(self):
        return self.get(False)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def pool():
    from areal.rewards import RewardPool

    with RewardPool("areal.rewards.math:math_reward", num_workers=1, timeout_s=30.0) as p:
        yield p


@pytest.fixture(scope="module")
def prompts(tokenizer):
    rows = [json.loads(line) for line in (ROOT / "assets" / "data" / "arith" / "train.jsonl").open()][:6]
    out = []
    for i, row in enumerate(rows):
        text = f"Q: {row['question']}\nA: "
        out.append(Prompt(i, text, tokenizer(text, add_special_tokens=False)["input_ids"],
                          reward_fields(row, "question", "answer")))
    return out


def make_worker(model, pool, tokenizer, version=0, backend="engine"):
    if backend == "engine":
        # a 32-token budget: about one 23-token prompt prefilled per step, so groups start at different steps
        engine = Engine(model, num_blocks=128, block_size=8, max_num_batched_tokens=32, tokenizer=tokenizer,
                        version=version)
    else:
        from areal.rollout.hf_backend import HFGenerateBackend

        engine = HFGenerateBackend(model, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                                   version=version)
    return RolloutWorker(engine, pool, tokenizer, PARAMS, base_seed=11)


KINDS = {WorkerSnapshot: "snapshot", EvalStarted: "eval started", EvalResult: "eval"}


def serve(worker, inbox, receiver=None) -> list[tuple[str, object]]:
    """Run serve() in a thread until it stops; returns its outbox as (kind, payload), stats left out."""
    outbox = queue.Queue()
    worker.receiver = receiver
    thread = threading.Thread(target=worker.serve, args=(inbox, outbox), daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "serve() did not stop"
    out = []
    while not outbox.empty():
        msg = outbox.get()
        if isinstance(msg, GroupsDone):
            out.extend(("group", group) for group in msg.groups)
        elif not isinstance(msg, WorkerStats):
            out.append((KINDS[type(msg)], msg))
    return out


def groups_of(messages) -> dict:
    return {p.group_id: p for kind, p in messages if kind == "group"}


def assert_same_groups(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for gid, e in expected.items():
        g = got[gid]
        assert g.rewards == e.rewards and g.fields == e.fields
        for a, b in zip(g.trajectories, e.trajectories, strict=True):
            assert a.prompt_ids == b.prompt_ids and a.completion_ids == b.completion_ids, gid
            assert a.versions == b.versions and a.finish_reason == b.finish_reason
            assert a.behaviour_logprobs == pytest.approx(b.behaviour_logprobs, abs=1e-5)


def json_round_trip(obj):
    return type(obj).from_dict(json.loads(json.dumps(obj.to_dict())))


def fifo(items) -> queue.Queue:
    q = queue.Queue()
    for item in items:
        q.put(item)
    return q


def test_snapshot_mid_generation_then_resume_on_a_fresh_worker(model, pool, tokenizer, prompts):
    batches = [PromptBatch(0, [0, 1, 2], prompts[:3]), PromptBatch(0, [3, 4, 5], prompts[3:])]
    # uninterrupted, with real-time message arrival: seeded groups do not depend on batching or timing
    reference = groups_of(serve(make_worker(model, pool, tokenizer), fifo([*batches, None])))
    assert len(reference) == 6

    # the snapshot is taken 6 engine steps in, one step after the second batch started
    first = serve(make_worker(model, pool, tokenizer),
                  ScriptedInbox([batches[0], *[EMPTY] * 4, batches[1], SnapshotRequest(step=7), None]))
    at = [kind for kind, _ in first].index("snapshot")
    snapshot = first[at][1]
    before, after = groups_of(first[:at]), groups_of(first[at + 1 :])
    assert isinstance(snapshot, WorkerSnapshot) and snapshot.step == 7
    # exactly the groups admitted and not yet shipped (every group shipped earlier precedes it), in admission order
    assert before and [g.group_id for g in snapshot.groups] == [g for g in range(6) if g not in before]
    for g in snapshot.groups:
        assert sorted([o.sample_index for o in g.finished] + [p.sample_index for p in g.partial]) == list(range(4))
        assert g.prompt == prompts[g.group_id] and g.min_version == 0
    kinds = {("finished" if g.finished else "") + ("+tokens" if any(p.token_ids for p in g.partial) else "")
             for g in snapshot.groups}
    assert {"finished+tokens", "+tokens", ""} <= kinds  # half-finished, all generating, leader not yet forked
    assert set(snapshot.rng_state) == {"python", "torch_cpu", "engine"}
    # the snapshot disturbed nothing: the first worker still ships every group, as if uninterrupted
    assert_same_groups({**before, **after}, reference)

    restored = json_round_trip(snapshot)
    assert restored == snapshot
    resumed = make_worker(model, pool, tokenizer)
    message = json_round_trip(ResumeGroups(restored.groups, restored.rng_state))
    assert json_round_trip(SnapshotRequest(step=7)) == SnapshotRequest(step=7)
    second = serve(resumed, ScriptedInbox([message, None]))
    assert_same_groups({**before, **groups_of(second)}, reference)
    assert resumed.backend.get_rng_state() == snapshot.rng_state["engine"]  # restored (seeded groups draw none)


class Update:
    """What `weight_receiver.apply` takes: weights of `version`."""

    def __init__(self, version: int, weights: dict):
        self.version, self.weights, self.pause_s, self._owner = version, weights, None, None

    def named_tensors(self):
        return list(self.weights.items())

    def release(self) -> None:
        pass


class Gate:
    """A receiver stand-in: weights of version 1 (the same tensors) become available once `open()` ran."""

    def __init__(self, model):
        self.update = Update(1, {n: p.detach().clone() for n, p in model.named_parameters()})
        self.is_open = False

    def open(self) -> None:
        self.is_open = True

    def poll(self):
        return self.wait_for(1) if self.is_open and self.update is not None else None

    def wait_for(self, version: int, timeout: float | None = None):
        if not self.is_open:
            raise TimeoutError
        update, self.update = self.update, None
        return update


class GatedInbox(ScriptedInbox):
    def get(self, block=True, timeout=None):
        item = super().get(block, timeout)
        if callable(item):  # a hook, run at this point of the script
            item()
            raise queue.Empty
        return item


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_pending_group_waiting_for_weights_is_snapshotted_and_restarts_whole(model, pool, tokenizer, prompts, backend):
    worker = make_worker(model, pool, tokenizer, backend=backend)
    gate = Gate(model)
    # min_version 1 at version 0: admitted, but it may not start before the weights of version 1 are in
    script = GatedInbox([PromptBatch(1, [9], [prompts[0]]), SnapshotRequest(step=3), gate.open, None])
    messages = serve(worker, script, receiver=gate)
    assert [k for k, _ in messages] == ["snapshot", "group"]
    snapshot, shipped = json_round_trip(messages[0][1]), groups_of(messages)
    assert snapshot.groups == [InFlightGroup(9, 1, prompts[0], [], [])]
    if backend == "hf":
        assert set(snapshot.rng_state) == {"python", "torch_cpu"}
        # the static-batch backend has no partial state: a resumed group restarts whole, whatever it carries
        snapshot.groups[0].finished = [GenerationOutput(0, [7], [-1.0], [0], "length", 0)]
        snapshot.groups[0].partial = [PartialSample(1, [7], [-1.0], [0])]
    second = serve(make_worker(model, pool, tokenizer, version=1, backend=backend),
                   ScriptedInbox([ResumeGroups(snapshot.groups, snapshot.rng_state), None]))
    assert_same_groups(groups_of(second), shipped)


def test_rng_state_round_trips_through_json(model, tokenizer):
    from areal.rollout.worker import rng_state, set_rng_state

    engine = Engine(model, num_blocks=16, block_size=8, tokenizer=tokenizer)
    state = json.loads(json.dumps(rng_state(engine)))
    draws = (torch.rand(3), engine._rng.random())
    set_rng_state(engine, state)
    again = (torch.rand(3), engine._rng.random())
    assert torch.equal(draws[0], again[0]) and draws[1] == again[1]


def test_an_evaluation_decodes_beside_training_groups_and_scores_as_a_blocking_one(model, pool, tokenizer, prompts):
    """A group admitted before an evaluation ships while the evaluation is still decoding (a blocking
    evaluation held it back until the evaluation was scored, and the trainer waited for it); the
    evaluation's result is the blocking evaluation's."""
    request = EvalRequest(0, prompts * 7, max_new_tokens=8)  # 42 prompts: ~42 prefill steps at 32 tokens/step
    worker = make_worker(model, pool, tokenizer)
    out = serve(worker, ScriptedInbox([PromptBatch(0, [1], [prompts[0]]), request, None]))
    assert [kind for kind, _ in out] == ["group", "eval"]
    streamed = out[1][1].result
    blocking = make_worker(model, pool, tokenizer).evaluate(request)
    for key in ("eval/accuracy", "eval/num_prompts", "eval/response_length", "eval/step", "eval/version"):
        assert streamed[key] == blocking[key], key


def test_an_evaluation_on_its_own_engine_scores_its_version_while_training_takes_newer_weights(model, pool, tokenizer,
                                                                                             prompts):
    """With an evaluation engine, weights of version 1 that arrive while version 0 is being evaluated are
    applied at once: a group admitted for version 1 is generated with them and ships first, and the
    evaluation still scores version 0 exactly (the blocking evaluation's result). `EvalStarted` tells
    the trainer it may send newer weights."""
    request = EvalRequest(0, prompts * 7, max_new_tokens=8)
    worker = make_worker(model, pool, tokenizer)
    worker.eval_backend = Engine(model, num_blocks=128, block_size=8, max_num_batched_tokens=32, tokenizer=tokenizer,
                                 version=-1)
    gate = Gate(model)
    gate.update.weights = {n: t * 0.5 for n, t in gate.update.weights.items()}  # version 1 is another model
    script = GatedInbox([request, EMPTY, gate.open, PromptBatch(1, [3], [prompts[1]]), None])
    out = serve(worker, script, receiver=gate)
    assert [kind for kind, _ in out] == ["eval started", "group", "eval"]
    assert (out[0][1].version, out[0][1].shard) == (0, 0)
    assert all(t.versions == [1] * len(t.completion_ids) for t in out[1][1].trajectories)
    scored = out[2][1].result
    blocking = make_worker(model, pool, tokenizer).evaluate(request)
    assert scored["eval/version"] == 0 and worker.backend.version == 1
    for key in ("eval/accuracy", "eval/num_prompts", "eval/response_length", "eval/step"):
        assert scored[key] == blocking[key], key


def test_groups_finished_in_one_engine_step_ship_in_one_message_with_their_own_reward_failures(
        model, tokenizer, prompts):
    # one message and one reward call per engine step, not one per group: each message woke trainer0's threads
    from dataclasses import replace

    from areal.rewards import RewardPool

    bad = ROOT / "tests" / "fixtures" / "rewards" / "bad_rewards.py"
    batch = PromptBatch(0, [0, 1, 2], [prompts[0], replace(prompts[1], fields={"fail": True}), prompts[2]])
    with RewardPool(f"{bad}:fail_when_told", num_workers=1, timeout_s=5.0, max_logged_failures=0) as pool:
        engine = Engine(model, num_blocks=128, block_size=8, tokenizer=tokenizer)  # all three prefilled in one step
        worker = RolloutWorker(engine, pool, tokenizer, SamplingParams(n=4, max_new_tokens=3, ignore_eos=True))
        outbox = queue.Queue()
        worker.serve(fifo([batch, None]), outbox)
    shipped = []
    while not outbox.empty():
        if isinstance(msg := outbox.get(), GroupsDone):
            shipped.append(msg)
    assert [[g.group_id for g in m.groups] for m in shipped] == [[0, 1, 2]]
    groups = shipped[0].groups
    assert [g.rewards for g in groups] == [[1.0] * 4, [0.0] * 4, [1.0] * 4]
    assert [g.reward_failures for g in groups] == [{}, {"error": 4}, {}]
