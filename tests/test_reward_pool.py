"""RewardPool: scores in order, every failure kind scored 0 and counted, hangs and crashed
workers replaced, fields passed through, failures logged up to a limit."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from areal.rewards import RewardConfig, RewardPool, RewardRequest
from areal.rewards._worker import classify
from areal.rewards.pool import FAILURE_KINDS

BAD = Path(__file__).parent / "fixtures" / "rewards" / "bad_rewards.py"
NO_FAILURES = dict.fromkeys(FAILURE_KINDS, 0)


def requests(*completions: str, **fields) -> list[RewardRequest]:
    return [RewardRequest("prompt", c, dict(fields)) for c in completions]


def make_pool(fn: str, *, timeout_s: float = 5.0, num_workers: int = 2, max_logged: int = 5) -> RewardPool:
    return RewardPool(f"{BAD}:{fn}", num_workers=num_workers, timeout_s=timeout_s, max_logged_failures=max_logged)


def test_scores_in_request_order():
    completions = ["x" * n for n in (5, 0, 17, 3, 3, 40, 1)] * 20  # 140 calls, several batches
    with make_pool("length_reward") as pool:
        result = pool.score(requests(*completions))
        assert result.rewards == [float(len(c)) for c in completions]
        assert result.failures == NO_FAILURES
        assert pool.score([]).rewards == []


def test_every_failure_kind_scores_zero_and_the_pool_keeps_working():
    completions = ["a", "raise", "nan", "str", "exit", "hang", "abc", "xy"]
    with make_pool("mixed_reward", timeout_s=0.5) as pool:
        start = time.monotonic()
        result = pool.score(requests(*completions))
        elapsed = time.monotonic() - start
        assert result.rewards == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 2.0]
        # "exit" kills its worker (error); "hang" is killed at the deadline (timeout).
        assert result.failures == {**NO_FAILURES, "error": 2, "timeout": 1, "nan": 1, "non_number": 1}
        # each request's own kind, so one call can score several groups and charge each its failures
        assert result.kinds == [None, "error", "nan", "non_number", "error", "timeout", None, None]
        assert elapsed < 5.0  # the hang cost one timeout, not 100 s
        # Replacement workers score the next batch normally; lifetime totals accumulate.
        again = pool.score(requests("abcd", "hang", "ab"))
        assert again.rewards == [4.0, 0.0, 2.0]
        assert again.failures == {**NO_FAILURES, "timeout": 1}
        assert pool.total_failures == {**NO_FAILURES, "error": 2, "timeout": 2, "nan": 1, "non_number": 1}


def test_hang_does_not_block_other_samples():
    # One worker sleeps 100 s; the other worker scores everything else meanwhile.
    completions = ["hang"] + ["ok"] * 30
    with make_pool("hang_on_hang", timeout_s=0.5) as pool:
        pool.score(requests("warm", "up"))
        start = time.monotonic()
        result = pool.score(requests(*completions))
        assert time.monotonic() - start < 3.0
        assert result.rewards == [0.0] + [2.0] * 30
        assert result.failures["timeout"] == 1
        assert pool.score(requests("after")).rewards == [5.0]


def test_hang_in_c_code_holding_the_gil_is_killed():
    with make_pool("regex_hang", timeout_s=0.5, num_workers=1) as pool:
        result = pool.score(requests("x"))
        assert result.rewards == [0.0] and result.failures["timeout"] == 1


def test_nan_inf_and_non_numbers():
    with make_pool("nan_reward") as pool:
        result = pool.score(requests("nan", "inf"))
        assert result.rewards == [0.0, 0.0] and result.failures == {**NO_FAILURES, "nan": 2}
    with make_pool("string_reward", num_workers=1) as pool:
        assert pool.score(requests("a")).failures == {**NO_FAILURES, "non_number": 1}
    with make_pool("none_reward", num_workers=1) as pool:
        assert pool.score(requests("a")).failures == {**NO_FAILURES, "non_number": 1}
    with make_pool("numpy_scalar_reward", num_workers=1) as pool:
        assert pool.score(requests("a")).rewards == [0.25]


@pytest.mark.parametrize(
    "value, kind, reward",
    [
        (True, "ok", 1.0), (3, "ok", 3.0), (0.5, "ok", 0.5), (Fraction(1, 4), "ok", 0.25),
        (np.float32(0.5), "ok", 0.5), (np.array(2), "ok", 2.0), (torch.tensor(1.5), "ok", 1.5),
        (float("-inf"), "nan", 0.0), (torch.tensor(float("nan")), "nan", 0.0), (10**400, "nan", 0.0),
        (torch.tensor([1.0]), "non_number", 0.0), (1j, "non_number", 0.0), ("1", "non_number", 0.0),
        (None, "non_number", 0.0), (1e6, "ok", 1e6), (1e30, "out_of_range", 0.0), (-1e7, "out_of_range", 0.0),
    ],
)
def test_classify_return_values(value, kind, reward):
    assert classify(value)[:2] == (kind, reward)


def test_worker_that_exits_is_replaced():
    with make_pool("exit_on_exit", num_workers=1) as pool:
        result = pool.score(requests("ab", "exit", "abc", "exit", "abcd"))
        assert result.rewards == [2.0, 0.0, 3.0, 0.0, 4.0]
        assert result.failures == {**NO_FAILURES, "error": 2}


def test_async_reward_fn():
    with make_pool("async_length_reward") as pool:
        assert pool.score(requests("a", "abc", "")).rewards == [1.0, 3.0, 0.0]


def test_fields_reach_the_reward_fn():
    with make_pool("answer_match_reward") as pool:
        batch = [RewardRequest("p", c, {"answer": a}) for c, a in [("42", "42"), ("41", "42"), ("x", "x")]]
        assert pool.score(batch).rewards == [1.0, 0.0, 1.0]


def test_calls_are_spread_over_all_workers():
    with make_pool("pid_reward", num_workers=2) as pool:
        pids = set(pool.score(requests(*["x"] * 40)).rewards)
        assert len(pids) == 2


def test_builtin_math_reward_through_the_pool():
    with RewardPool.from_config(RewardConfig(num_workers=2, timeout_s=10.0)) as pool:
        batch = [
            RewardRequest("q", "so 48 + 24 = 72 clips", {"answer": "Natalia ... #### 72"}),
            RewardRequest("q", "so 71 clips", {"answer": "#### 72"}),
            RewardRequest("q", r"\boxed{\frac{1}{2}}", {"answer": "0.5"}),
        ]
        assert pool.score(batch).rewards == [1.0, 0.0, 1.0]
        assert asyncio.run(pool.ascore(batch)).rewards == [1.0, 0.0, 1.0]


def test_first_failures_are_logged_with_traceback_then_only_counted(caplog):
    with caplog.at_level(logging.WARNING, logger="areal.rewards"):
        with make_pool("raising_reward", max_logged=2) as pool:
            pool.score([RewardRequest("the prompt", "first", {"answer": "7"}), RewardRequest("p", "second")])
            pool.score(requests("third", "fourth"))
            assert pool.total_failures["error"] == 4
    records = [r for r in caplog.records if r.name == "areal.rewards"]
    assert len(records) == 2
    first = records[0].getMessage()
    assert "[error]" in first and "'the prompt'" in first and "'first'" in first and "'answer': '7'" in first
    assert "Traceback" in first and "ZeroDivisionError: reward code blew up on first" in first
    assert "second" in records[1].getMessage() and "only counted" in records[1].getMessage()


def test_long_samples_are_truncated_in_the_log(caplog):
    with caplog.at_level(logging.WARNING, logger="areal.rewards"):
        with make_pool("raising_reward", num_workers=1) as pool:
            pool.score([RewardRequest("P" * 5000, "C" * 5000 + "THE END")])
    (record,) = [r for r in caplog.records if r.name == "areal.rewards"]
    message = record.getMessage()
    assert "THE END" in message  # the tail of a completion (its answer) is kept
    assert message.count("P") < 400 and len(message) < 5000


def test_bad_spec_fails_fast_at_construction():
    with pytest.raises(ValueError, match="no_such_module_q9:fn"):
        RewardPool("no_such_module_q9:fn", num_workers=2, timeout_s=1.0)
    with pytest.raises(FileNotFoundError, match="missing_q9.py"):
        RewardPool("missing_q9.py:fn", num_workers=2, timeout_s=1.0)
    with pytest.raises(ValueError, match="length_reward"):
        make_pool("no_such_fn")


def test_close_is_fast_idempotent_and_stops_workers():
    pool = make_pool("hang_on_hang", timeout_s=30.0)
    pool.score(requests("a"))
    processes = [w.proc for w in pool._workers]
    start = time.monotonic()
    pool.close()
    pool.close()
    assert time.monotonic() - start < 2.0
    assert all(p.poll() is not None for p in processes)
    with pytest.raises(RuntimeError, match="closed"):
        pool.score(requests("a"))


def test_large_samples_are_not_limited_by_the_pipe_buffer():
    big = ["y" * 300_000, "z" * 5, "w" * 200_000] * 3  # each item is larger than the pipe budget
    with make_pool("length_reward") as pool:
        assert pool.score(requests(*big)).rewards == [float(len(c)) for c in big]
        assert math.isclose(sum(pool.score(requests(*big)).rewards), 3 * 500_005)


def test_timeout_is_per_call_not_per_batch():
    # Four 0.3 s calls queued on one worker take 1.2 s in all, but each is within 0.5 s.
    with make_pool("sleepy_reward", timeout_s=0.5, num_workers=1) as pool:
        result = pool.score(requests("a", "bb", "ccc", "dddd", sleep=0.3))
        assert result.rewards == [1.0, 2.0, 3.0, 4.0] and result.failures == NO_FAILURES


def test_hang_in_the_middle_of_a_batch_blames_only_that_sample():
    with make_pool("hang_on_hang", timeout_s=0.5, num_workers=1) as pool:
        pool.score(requests("warm"))  # fast calls measured: the next batch is sent whole
        completions = ["a", "bb", "hang", "ccc", "dddd"] * 2
        result = pool.score(requests(*completions))
        assert result.rewards == [1.0, 2.0, 0.0, 3.0, 4.0] * 2
        assert result.failures == {**NO_FAILURES, "timeout": 2}


def _is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_workers_die_when_the_parent_is_killed(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    # Both workers are busy in time.sleep(100), so only PDEATHSIG (not pipe EOF) can end them.
    script = (
        "import threading, time\n"
        "from areal.rewards import RewardPool, RewardRequest\n"
        f"pool = RewardPool({str(BAD) + ':hang_on_hang'!r}, num_workers=2, timeout_s=100.0)\n"
        "pool.score([RewardRequest('p', 'c')] * 2)\n"
        "threading.Thread(target=pool.score, args=([RewardRequest('p', 'hang')] * 2,), daemon=True).start()\n"
        "time.sleep(0.5)\n"
        "print(*[w.proc.pid for w in pool._workers], flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker_pids = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(worker_pids) == 2 and all(_is_running(pid) for pid in worker_pids)
    os.kill(parent.pid, signal.SIGKILL)  # no atexit, no cleanup: only PDEATHSIG can act
    parent.wait()
    deadline = time.monotonic() + 5.0
    while any(_is_running(pid) for pid in worker_pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_is_running(pid) for pid in worker_pids)


def test_workers_that_cannot_load_the_fn_raise_a_clear_error(monkeypatch):
    import os

    monkeypatch.setenv("AREAL_TEST_PARENT_PID", str(os.getpid()))
    spec = f"{BAD.parent / 'parent_only_rewards.py'}:reward"
    pool = RewardPool(spec, num_workers=1, timeout_s=5.0)  # loads fine here, in the parent
    with pytest.raises(RuntimeError, match=r"(?s)failed to start 3 times in a row.*only loads in the test's own process"):
        pool.score(requests("a"))
    pool.close()
