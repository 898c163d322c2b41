"""TrajectoryBuffer: property tests (hypothesis state machine) plus targeted behaviour tests."""

import multiprocessing as mp
import threading
import time

import pytest

from areal.buffer import (
    FILTER_STALE,
    FILTER_UNIFORM_REWARD,
    BufferClosed,
    BufferConfig,
    StalenessController,
    TrajectoryBuffer,
)
from areal.trajectory import Group
from buffer_helpers import accounting_holds, make_group


# -- ordering ----------------------------------------------------------------------------
def _buffer(**kw):
    kw.setdefault("capacity_groups", 16)
    return TrajectoryBuffer(BufferConfig(**kw))


def _fill(buf, oldest_versions):
    for gid, v in enumerate(oldest_versions):
        buf.put(make_group(gid, versions=((v, v + 1), (v + 1,))))


@pytest.mark.parametrize(
    "order,expected",
    [
        ("oldest_first", [1, 3, 4, 0, 2]),  # versions 1,1,2 (ties in arrival order), then 3,3
        ("newest_first", [0, 2, 4, 1, 3]),
        ("fifo", [0, 1, 2, 3, 4]),
    ],
)
def test_order(order, expected):
    buf = _buffer(order=order)
    _fill(buf, [3, 1, 3, 1, 2])
    got = [g.group_id for g in buf.get_batch(3, current_version=4)]
    got += [g.group_id for g in buf.get_batch(2, current_version=5)]
    assert got == expected


# -- strict staleness ----------------------------------------------------------------------
def test_strict_mode_drops_and_counts_stale_and_frees_budget():
    ctl = StalenessController(groups_per_step=2, max_staleness=1, max_concurrent=8)
    buf = TrajectoryBuffer(BufferConfig(strict_staleness=True), ctl)
    for gid, v in enumerate([0, 1, 2, 3]):  # oldest token versions
        assert ctl.try_admit()
        buf.put(make_group(gid, versions=((v,), (v + 1,))))
    ctl.set_version(3)
    assert ctl.accepted == 4
    batch = buf.get_batch(2, current_version=3)  # lags 3, 2 (> η=1) dropped; 1, 0 kept
    assert sorted(g.group_id for g in batch) == [2, 3]
    stats = buf.stats()
    assert stats["filtered"] == {FILTER_UNIFORM_REWARD: 0, FILTER_STALE: 2}
    assert stats["consumed"] == 2 and stats["held_groups"] == 0 and accounting_holds(stats)
    assert stats["last_batch_max_lag"] == 1
    # the 2 dropped groups left `accepted`: accepted == consumed + held
    assert ctl.accepted == 2 and ctl.state()["discarded_total"] == 2


def test_out_of_order_completion_exceeds_eta_unless_strict():
    """AReaL's rule is enforced at admission only: with η=1, B=1, a slow group started at
    v=0 can be consumed at v=2 (lag 2). Strict mode drops it instead and a replacement
    can be admitted."""
    for strict in (False, True):
        ctl = StalenessController(groups_per_step=1, max_staleness=1, max_concurrent=8)
        buf = TrajectoryBuffer(BufferConfig(strict_staleness=strict), ctl)
        assert ctl.try_admit() and ctl.try_admit() and not ctl.try_admit()  # G0 slow, G1 fast
        buf.put(make_group(1, versions=((0,), (0,))))
        assert [g.group_id for g in buf.get_batch(1, 0)] == [1]
        ctl.set_version(1)
        assert ctl.try_admit()  # G2 at v=1
        buf.put(make_group(2, versions=((1,), (1,))))
        assert [g.group_id for g in buf.get_batch(1, 1)] == [2]
        ctl.set_version(2)
        buf.put(make_group(0, versions=((0,), (1, 2))))  # G0 finally finishes
        if not strict:
            assert [g.group_id for g in buf.get_batch(1, 2)] == [0]
            assert buf.stats()["last_batch_max_lag"] == 2  # > η
        else:
            with pytest.raises(TimeoutError):
                buf.get_batch(1, 2, timeout=0.01)
            assert buf.stats()["filtered"][FILTER_STALE] == 1
            assert ctl.try_admit()  # the drop freed budget for a replacement


# -- dynamic filtering ---------------------------------------------------------------------
def test_dynamic_filtering_drops_uniform_groups_and_frees_budget():
    ctl = StalenessController(groups_per_step=2, max_staleness=0)
    buf = TrajectoryBuffer(BufferConfig(filter_uniform_rewards=True), ctl)
    assert ctl.try_admit() and ctl.try_admit() and not ctl.try_admit()
    assert buf.put(make_group(0, rewards=(1.0, 1.0))) is False
    assert buf.put(make_group(1, rewards=(0.0, 1.0))) is True
    assert ctl.accepted == 1 and ctl.try_admit()  # the filtered group freed its slot
    assert buf.put(make_group(2, rewards=(0.5,), versions=((0,),))) is False  # n=1 is uniform
    stats = buf.stats()
    assert stats["filtered"] == {FILTER_UNIFORM_REWARD: 2, FILTER_STALE: 0}
    assert stats["put"] == 3 and stats["held_groups"] == 1 and accounting_holds(stats)


def test_without_filtering_uniform_groups_are_kept():
    buf = _buffer()
    assert buf.put(make_group(0, rewards=(1.0, 1.0))) is True
    assert buf.stats()["filtered"][FILTER_UNIFORM_REWARD] == 0


# -- occupancy, backpressure, timeouts, close ----------------------------------------------
def test_occupancy_stats():
    buf = _buffer()
    buf.put(make_group(0, versions=((0, 0, 0), (0,)), prompt_len=5))  # tokens (5+3) + (5+1)
    buf.put(make_group(1, rewards=(0.0,), versions=((1,),), prompt_len=2))  # 2+1
    s = buf.stats()
    assert (s["held_groups"], s["held_trajectories"], s["held_tokens"]) == (2, 3, 17)
    buf.get_batch(1, 1)
    s = buf.stats()
    assert (s["held_groups"], s["held_trajectories"], s["held_tokens"]) == (1, 1, 3)


def test_put_blocks_when_full_then_times_out_never_drops():
    buf = _buffer(capacity_groups=2)
    buf.put(make_group(0))
    buf.put(make_group(1))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        buf.put(make_group(2), timeout=0.05)
    assert time.monotonic() - t0 >= 0.05
    s = buf.stats()
    assert s["put"] == 2 and s["held_groups"] == 2 and s["put_waits"] == 1  # not silently dropped


def test_blocked_put_resumes_when_space_frees():
    buf = _buffer(capacity_groups=1)
    buf.put(make_group(0))
    done = threading.Event()
    t = threading.Thread(target=lambda: (buf.put(make_group(1), timeout=5), done.set()))
    t.start()
    assert not done.wait(0.05)  # blocked: buffer full
    assert [g.group_id for g in buf.get_batch(1, 0)] == [0]
    assert done.wait(5)
    t.join()
    assert [g.group_id for g in buf.get_batch(1, 0)] == [1]


def test_get_batch_waits_then_times_out_and_validates():
    buf = _buffer(capacity_groups=4)
    with pytest.raises(ValueError):
        buf.get_batch(5, 0)  # can never be satisfied: would hang forever
    buf.put(make_group(0))
    with pytest.raises(TimeoutError, match="held_groups"):
        buf.get_batch(2, 0, timeout=0.02)
    threading.Timer(0.05, lambda: buf.put(make_group(1))).start()
    assert len(buf.get_batch(2, 0, timeout=5)) == 2


def test_close_unblocks_waiters():
    buf = _buffer(capacity_groups=1)
    errors = []

    def blocked_get():
        try:
            buf.get_batch(1, 0)
        except BufferClosed as e:
            errors.append(("get", e))

    t = threading.Thread(target=blocked_get)
    t.start()
    time.sleep(0.05)
    buf.close()
    t.join(5)
    assert not t.is_alive() and errors and errors[0][0] == "get"
    with pytest.raises(BufferClosed):
        buf.put(make_group(9))

    buf2 = _buffer(capacity_groups=1)
    buf2.put(make_group(0))
    t = threading.Thread(target=lambda: pytest.raises(BufferClosed, buf2.put, make_group(1)))
    t.start()
    time.sleep(0.05)
    buf2.close()
    t.join(5)
    assert not t.is_alive()
    assert [g.group_id for g in buf2.get_batch(1, 0)] == [0]  # held groups still drain
    with pytest.raises(BufferClosed):
        buf2.get_batch(1, 0)


def test_many_producer_threads_one_consumer_small_buffer():
    buf = _buffer(capacity_groups=3, order="fifo")
    per_thread, producers = 40, 4

    def produce(k):
        for i in range(per_thread):
            buf.put(make_group(k * per_thread + i), timeout=10)

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(producers)]
    for t in threads:
        t.start()
    seen = []
    while len(seen) < per_thread * producers:
        seen += [g.group_id for g in buf.get_batch(2, 0, timeout=10)]
    for t in threads:
        t.join(10)
    assert sorted(seen) == list(range(per_thread * producers))  # each exactly once
    for k in range(producers):  # fifo keeps each producer's own order
        mine = [g for g in seen if g // per_thread == k]
        assert mine == sorted(mine)
    s = buf.stats()
    assert s["consumed"] == s["put"] == 160 and s["held_groups"] == 0 and s["put_waits"] > 0


def test_put_rejects_empty_group_and_controller_mismatch():
    with pytest.raises(ValueError):
        _buffer().put(Group(group_id=0, trajectories=[]))
    with pytest.raises(ValueError):
        TrajectoryBuffer(BufferConfig(), StalenessController(1, max_staleness=2), max_staleness=1)
    with pytest.raises(ValueError):
        BufferConfig(order="random")


# -- a real second process -------------------------------------------------------------------
def rollout_worker_process(tasks, results):
    """Child process: 'generate' a group for each (group_id, version) task."""
    while True:
        task = tasks.get()
        if task is None:
            results.put(None)
            return
        gid, version = task
        results.put(make_group(gid, rewards=(float(gid % 2), 0.5), versions=((version,), (version, version))))


def collect_into(buf, results):
    """Parent thread, as the trainer's collector: put every group a worker sends, until None."""
    while (group := results.get()) is not None:
        buf.put(group)


def test_cross_process_producer_feeds_parent_consumer():
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=rollout_worker_process, args=(tasks, results), daemon=True)
    child.start()
    B, eta, steps = 2, 1, 4
    ctl = StalenessController(B, max_staleness=eta, max_concurrent=3)
    buf = TrajectoryBuffer(BufferConfig(), ctl)
    collector = threading.Thread(target=collect_into, args=(buf, results), daemon=True)
    collector.start()
    next_id, consumed = 0, []
    try:
        for v in range(steps):
            while ctl.try_admit():  # admission is decided here, in the buffer's process
                tasks.put((next_id, v))
                next_id += 1
            batch = buf.get_batch(B, current_version=v, timeout=30)
            consumed += [g.group_id for g in batch]
            assert all(v - g.oldest_version <= eta for g in batch)
            assert all(len(g.trajectories) == 2 for g in batch)
            ctl.set_version(v + 1)
        tasks.put(None)
        child.join(30)
        assert child.exitcode == 0
        collector.join(30)
        assert not collector.is_alive()  # took the worker's last group and its stop
    finally:
        if child.is_alive():
            child.terminate()
        buf.close()
    assert consumed == list(range(steps * B))  # oldest-first == admission order here
    s = buf.stats()
    assert s["consumed"] == steps * B and accounting_holds(s)
    assert s["put"] + ctl.running == next_id  # every admitted group arrived or is in flight
