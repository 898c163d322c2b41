"""Held-out evaluation on rollout workers: sharding, merging and the Future the trainer logs from."""

import queue

import pytest

from areal.async_loop import RemoteEvaluator
from areal.evaluate import merge_eval_results
from areal.rollout.worker import EvalRequest


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


def test_remote_evaluator_shards_prompts_and_resolves_when_every_shard_is_in():
    inboxes = [queue.Queue(), queue.Queue()]
    evaluator = RemoteEvaluator(inboxes, prompts=list("abcde"), max_new_tokens=7)
    future = evaluator(20)
    requests = [box.get_nowait() for box in inboxes]
    assert all(isinstance(r, EvalRequest) and r.version == 20 and r.max_new_tokens == 7 for r in requests)
    assert [r.prompts for r in requests] == [list("ace"), list("bd")]  # every prompt exactly once
    evaluator.deliver(shard_result(20, 3, 2 / 3, 0.1))
    assert not future.done()
    evaluator.deliver(shard_result(20, 2, 1.0, 0.3))
    assert future.result(timeout=1)["eval/accuracy"] == pytest.approx(0.8)


def test_remote_evaluator_keeps_concurrent_steps_apart_and_skips_empty_shards():
    inboxes = [queue.Queue(), queue.Queue(), queue.Queue()]
    evaluator = RemoteEvaluator(inboxes, prompts=["p", "q"], max_new_tokens=4)
    first, second = evaluator(0), evaluator(10)
    assert inboxes[2].empty()  # two prompts, three workers: the third gets no request
    evaluator.deliver(shard_result(10, 1, 1.0, 0.1))
    evaluator.deliver(shard_result(0, 1, 0.0, 0.1))
    evaluator.deliver(shard_result(10, 1, 1.0, 0.1))
    assert second.result(timeout=1)["eval/accuracy"] == 1.0 and not first.done()
    evaluator.deliver(shard_result(0, 1, 1.0, 0.1))
    assert first.result(timeout=1)["eval/accuracy"] == 0.5
