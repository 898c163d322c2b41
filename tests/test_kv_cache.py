"""Block pool (refcounts, copy-on-write) and scheduler (budget, preemption) bookkeeping."""

from __future__ import annotations

import pytest

from areal.rollout.kv_cache import BlockPool, OutOfBlocks
from areal.rollout.scheduler import Request, Scheduler, Sequence
from areal.rollout.types import SamplingParams


def test_allocate_share_release_refcounts():
    pool = BlockPool(num_blocks=4, block_size=4)
    table: list[int] = []
    pool.reserve(table, 0, 6)  # 6 tokens -> 2 blocks
    assert len(table) == 2 and pool.num_free == 2
    twin = pool.share(table)
    assert [pool.refcount[b] for b in table] == [2, 2] and pool.num_free == 2
    pool.release(table)
    assert table == [] and pool.num_free == 2  # twin still holds them
    pool.release(twin)
    assert pool.num_free == 4 and pool.num_used == 0


def test_copy_on_write_only_for_shared_partial_block():
    pool = BlockPool(num_blocks=6, block_size=4)
    leader: list[int] = []
    pool.reserve(leader, 0, 6)  # prompt of 6: block 0 full, block 1 half full
    child = pool.share(leader)
    # writing position 6 lands in the shared block 1: needs a private copy (1 extra block)
    assert pool.extra_blocks_for(child, 6, 1) == 1
    pool.reserve(child, 6, 1)
    assert child[0] == leader[0] and child[1] != leader[1]
    assert pool.take_copies() == [(leader[1], child[1])]
    # now the leader is the only holder of its block 1: writes in place, no copy
    assert pool.extra_blocks_for(leader, 6, 1) == 0
    pool.reserve(leader, 6, 1)
    assert pool.take_copies() == []
    # crossing into a new block allocates one, no copy of the full shared block 0
    assert pool.extra_blocks_for(child, 8, 1) == 1


def test_reserve_without_room_raises():
    pool = BlockPool(num_blocks=1, block_size=2)
    with pytest.raises(OutOfBlocks):
        pool.reserve([], 0, 3)


def _seq(rid, prompt_len, n=1):
    params = SamplingParams(n=n, max_new_tokens=4)
    req = Request(rid, rid, list(range(prompt_len)), params, seed=0, stop_ids=frozenset())
    return Sequence(req, 0, list(range(prompt_len)), prompt_len, fork_pending=n if n > 1 else 0)


def test_chunked_prefill_respects_token_budget():
    sched = Scheduler(BlockPool(32, 4), max_num_seqs=8, max_num_batched_tokens=5)
    a, b = _seq(0, 7), _seq(1, 3)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a] and batch.num_new == [5]
    a.num_computed += 5
    batch = sched.schedule()  # rest of a (2 tokens) then b's first 3 tokens
    assert batch.seqs == [a, b] and batch.num_new == [2, 3]


def test_preempts_newest_when_blocks_run_out():
    pool = BlockPool(4, 2)  # 8 slots
    sched = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = _seq(0, 3), _seq(1, 3)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.num_new == [3, 3] and pool.num_free == 0
    for s in (a, b):
        s.num_computed = 3
        s.token_ids += [9, 9]  # pretend both sampled: each now needs positions 3..4 -> one more block
    batch = sched.schedule()
    assert batch.seqs == [a] and batch.num_preempted == 1 and sched.num_preemptions == 1
    assert list(sched.waiting) == [b] and b.num_computed == 0 and b.block_table == []


def test_group_leader_takes_n_seats():
    sched = Scheduler(BlockPool(32, 4), max_num_seqs=4, max_num_batched_tokens=64)
    g, single = _seq(0, 3, n=3), _seq(1, 3)
    sched.add(g)
    sched.add(single)
    sched.add(_seq(2, 3))
    batch = sched.schedule()
    assert batch.seqs == [g, single]  # 3 + 1 seats = max_num_seqs
