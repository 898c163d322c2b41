"""Held-out evaluation on rollout workers: sharding, merging and the Future the trainer logs from."""

import pytest

from areal.fleet import Fleet, RemoteEvaluator
from areal.evaluate import merge_eval_results
from areal.rollout.messages import EvalRequest, EvalStarted


def shard_result(step, n, accuracy, seconds):
    return {"eval/step": step, "eval/version": step, "eval/num_prompts": n, "eval/accuracy": accuracy,
            "eval/reward_mean": accuracy, "eval/response_length": 2.0 + n, "eval/seconds": seconds}


def test_merge_weights_each_shard_by_its_prompt_count():
    merged = merge_eval_results([shard_result(4, 3, 1.0, 0.5), shard_result(4, 1, 0.0, 0.2)])
    assert merged["eval/accuracy"] == pytest.approx(0.75)  # 3 of 4 correct
    assert merged["eval/response_length"] == pytest.approx((5.0 * 3 + 3.0 * 1) / 4)
    assert merged["eval/num_prompts"] == 4
    assert merged["eval/seconds"] == 0.5  # shards run in parallel: the slowest one
    assert merged["eval/step"] == 4


class Sent:
    """Stands in for the channel endpoint: records what trainer0 sends to whom."""

    def __init__(self):
        self.log = []

    def send(self, dest, msg):
        self.log.append((dest, msg))

    def to(self, dest):
        return [m for d, m in self.log if d == dest]


def fleet_of(n):
    endpoint = Sent()
    fleet = Fleet(endpoint, new_sender=None)
    for rank in range(n):
        fleet.join(rank)
    return fleet, endpoint


def shard_of(result, shard):
    return {**result, "eval/shard": shard}


def test_remote_evaluator_shards_prompts_and_resolves_when_every_shard_is_in():
    fleet, sent = fleet_of(2)
    evaluator = RemoteEvaluator(fleet, prompts=list("abcde"), max_new_tokens=7)
    future = evaluator(20)
    requests = sent.to("rollout0") + sent.to("rollout1")
    assert all(isinstance(r, EvalRequest) and r.version == 20 and r.max_new_tokens == 7 for r in requests)
    assert [r.prompts for r in requests] == [list("ace"), list("bd")]  # every prompt exactly once
    evaluator.deliver(shard_of(shard_result(20, 3, 2 / 3, 0.1), 0))
    evaluator.deliver(shard_of(shard_result(20, 3, 2 / 3, 0.1), 0))  # a shard answered twice counts once
    assert not future.done()
    evaluator.deliver(shard_of(shard_result(20, 2, 1.0, 0.3), 1))
    assert future.result(timeout=1)["eval/accuracy"] == pytest.approx(0.8)
    assert "eval/shard" not in future.result()


def test_remote_evaluator_keeps_concurrent_steps_apart_and_skips_empty_shards():
    fleet, sent = fleet_of(3)
    evaluator = RemoteEvaluator(fleet, prompts=["p", "q"], max_new_tokens=4)
    first, second = evaluator(0), evaluator(10)
    assert sent.to("rollout2") == []  # two prompts, three workers: the third gets no request
    evaluator.deliver(shard_of(shard_result(10, 1, 1.0, 0.1), 0))
    evaluator.deliver(shard_of(shard_result(0, 1, 0.0, 0.1), 0))
    evaluator.deliver(shard_of(shard_result(10, 1, 1.0, 0.1), 1))
    assert second.result(timeout=1)["eval/accuracy"] == 1.0 and not first.done()
    evaluator.deliver(shard_of(shard_result(0, 1, 1.0, 0.1), 1))
    assert first.result(timeout=1)["eval/accuracy"] == 0.5


def test_a_lost_workers_shard_goes_to_a_live_worker():
    fleet, sent = fleet_of(2)
    evaluator = RemoteEvaluator(fleet, prompts=list("abcd"), max_new_tokens=4)
    future = evaluator(5)
    evaluator.deliver(shard_of(shard_result(5, 2, 1.0, 0.1), 0))
    fleet.lose(1)
    evaluator.lose(1)
    resent = sent.to("rollout0")[-1]
    assert isinstance(resent, EvalRequest) and resent.shard == 1 and resent.prompts == list("bd")
    evaluator.deliver(shard_of(shard_result(5, 2, 0.0, 0.1), 1))
    assert future.result(timeout=1)["eval/accuracy"] == 0.5


def test_weights_stay_put_until_every_shard_runs_on_its_own_copy_or_is_scored():
    """`holds_weights` (no in-step weights meanwhile): from the request until each shard has said
    EvalStarted or answered; a shard moved to another worker holds them again until it starts there."""
    fleet, _ = fleet_of(2)
    evaluator = RemoteEvaluator(fleet, prompts=list("abcd"), max_new_tokens=4)
    assert not evaluator.holds_weights
    future = evaluator(5)
    assert evaluator.holds_weights
    evaluator.started(EvalStarted(5, 0))
    evaluator.started(EvalStarted(4, 1))  # another step's: changes nothing
    assert evaluator.holds_weights  # shard 1 evaluates on its worker's own engine
    evaluator.deliver(shard_of(shard_result(5, 2, 1.0, 0.1), 1))
    assert not evaluator.holds_weights and not future.done()  # shard 0 still running, on a copy
    fleet.lose(0)
    evaluator.lose(0)  # shard 0 goes to rollout1, which has not copied version 5's weights
    assert evaluator.holds_weights
    evaluator.started(EvalStarted(5, 0))
    assert not evaluator.holds_weights
    evaluator.deliver(shard_of(shard_result(5, 2, 0.0, 0.1), 0))
    assert future.result(timeout=1)["eval/accuracy"] == 0.5 and not evaluator.holds_weights


def test_a_stopped_run_fails_the_evaluations_still_pending():
    """The controller's Stop (a run that failed elsewhere) must not leave trainer0 waiting for a shard
    no worker will score (the Collector calls close())."""
    fleet, _ = fleet_of(1)
    evaluator = RemoteEvaluator(fleet, prompts=list("ab"), max_new_tokens=4)
    future = evaluator(8)
    fleet.lose(0)
    evaluator.lose(0)  # no live worker: the shard waits for one to join
    evaluator.close()
    with pytest.raises(RuntimeError, match="evaluation of step 8"):
        future.result(timeout=1)
    assert future.done() and not evaluator.holds_weights
