"""Iteration-level scheduler: chunked prefill + decode under one token budget, with preemption.

Every step, each running sequence asks for the tokens whose KV is not cached yet
(``num_tokens - num_computed``: 1 in decode, the rest of the prompt in prefill, everything
after a preemption or a recompute-mode weight update). Running sequences are served first
(oldest first), then waiting ones are admitted while seats, budget and blocks allow.
When the KV pool runs dry, the newest running sequence is preempted: its blocks are freed
and it is recomputed later (prompt + generated tokens re-prefilled).

A GRPO group enters as ONE leader sequence holding the prompt; when its prefill completes,
the engine forks the n samples, which share the prompt blocks (see kv_cache.BlockPool).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from areal.rollout.kv_cache import BlockPool
from areal.rollout.types import SamplingParams


@dataclass
class Request:
    request_id: int
    prompt_index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]
    on_finish: object = None  # callable(GenerationOutput) or None
    sequences: list["Sequence"] = field(default_factory=list)
    num_finished: int = 0


@dataclass(eq=False)
class Sequence:
    request: Request
    sample_index: int
    token_ids: list[int]
    num_prompt_tokens: int
    fork_pending: int = 0  # >0: a group leader that forks into this many samples when prefill ends
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def seats(self) -> int:
        return max(1, self.fork_pending)


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new: list[int]  # tokens computed this step per sequence
    copies: list[tuple[int, int]]  # (src, dst) block copies to apply before the forward
    num_preempted: int = 0


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def num_seats_used(self) -> int:
        return sum(s.seats for s in self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def free(self, seq: Sequence) -> None:
        self.pool.release(seq.block_table)

    def preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks; it will be recomputed from scratch (front of the queue)."""
        self.running.remove(seq)
        self.pool.release(seq.block_table)
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def reset_all(self) -> None:
        """Recompute everything in flight (e.g. after a weight update): free all KV, keep order."""
        for seq in reversed(self.running):
            self.pool.release(seq.block_table)
            seq.num_computed = 0
            self.waiting.appendleft(seq)
        self.running.clear()
        for seq in self.waiting:
            self.pool.release(seq.block_table)
            seq.num_computed = 0

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.pool.release(seq.block_table)

    def schedule(self) -> ScheduledBatch:
        pool = self.pool
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        num_new: list[int] = []
        preempted = 0
        scheduled: set[int] = set()
        # 1) running sequences, oldest first; preempt the newest unscheduled ones when blocks run out
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            while pool.extra_blocks_for(seq.block_table, seq.num_computed, n) > pool.num_free:
                victim = self.running[-1]
                if id(victim) in scheduled:
                    victim = None
                if victim is None or victim is seq:
                    break
                self.preempt(victim)
                preempted += 1
            if pool.extra_blocks_for(seq.block_table, seq.num_computed, n) > pool.num_free:
                if len(seqs) == 0 and len(self.running) == 1:
                    # alone and still does not fit: the pool is too small for this sequence
                    seq.finish_reason = "length"
                    seqs.append(seq)
                    num_new.append(0)
                    break
                self.preempt(seq)
                preempted += 1
                continue
            pool.reserve(seq.block_table, seq.num_computed, n)
            seqs.append(seq)
            num_new.append(n)
            scheduled.add(id(seq))
            budget -= n
            i += 1
        # 2) admit waiting sequences (never by preempting: only into free blocks)
        if not preempted:
            seats = self.num_seats_used
            while self.waiting and budget > 0:
                seq = self.waiting[0]
                if seats + seq.seats > self.max_num_seqs and self.running:
                    break
                n = min(seq.num_tokens - seq.num_computed, budget)
                # a group leader will need a copy-on-write block per sample soon: keep them free too
                reserve_extra = seq.fork_pending if seq.fork_pending > 1 and self.running else 0
                if pool.extra_blocks_for(seq.block_table, seq.num_computed, n) + reserve_extra > pool.num_free:
                    break
                self.waiting.popleft()
                pool.reserve(seq.block_table, seq.num_computed, n)
                self.running.append(seq)
                seats += seq.seats
                seqs.append(seq)
                num_new.append(n)
                budget -= n
        return ScheduledBatch(seqs, num_new, pool.take_copies(), preempted)
