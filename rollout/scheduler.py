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
        self.prefill_tokens_saved = 0  # prompt tokens re-shared from siblings on re-prefill

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
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            need = pool.extra_blocks_for(seq.block_table, seq.num_computed, n)
            while need > pool.num_free:
                victim = running[-1]
                if victim is seq or id(victim) in scheduled:
                    break
                self.preempt(victim)
                preempted += 1
            if need > pool.num_free:
                if not seqs and len(running) == 1:
                    # alone and still does not fit: the pool is too small for this sequence
                    seq.finish_reason = "length"
                    seqs.append(seq)
                    num_new.append(0)
                    break
                self.preempt(seq)
                preempted += 1
                continue
            if need:
                pool.reserve(seq.block_table, seq.num_computed, n)
            seqs.append(seq)
            num_new.append(n)
            scheduled.add(id(seq))
            budget -= n
            i += 1
        # 2) admit waiting sequences (never by preempting: only into free blocks)
        if not preempted:
            seats = self.num_seats_used
            deferred: list[Sequence] = []
            while self.waiting and budget > 0:
                seq = self.waiting[0]
                if seats + seq.seats > self.max_num_seqs and self.running:
                    break
                if seq.num_computed == 0 and not seq.fork_pending and len(seq.request.sequences) > 1:
                    if self._adopt_sibling_prompt(seq) == "wait":
                        deferred.append(self.waiting.popleft())
                        continue
                n = min(seq.num_tokens - seq.num_computed, budget)
                # a group leader will need a copy-on-write block per sample soon: keep them free too
                reserve_extra = seq.fork_pending if seq.fork_pending > 1 and self.running else 0
                if pool.extra_blocks_for(seq.block_table, seq.num_computed, n) + reserve_extra > pool.num_free:
                    if seq.num_computed:  # give back adopted blocks; adopt again next time
                        self.prefill_tokens_saved -= seq.num_computed
                        pool.release(seq.block_table)
                        seq.num_computed = 0
                    break
                self.waiting.popleft()
                pool.reserve(seq.block_table, seq.num_computed, n)
                self.running.append(seq)
                seats += seq.seats
                seqs.append(seq)
                num_new.append(n)
                budget -= n
            self.waiting.extendleft(reversed(deferred))
        return ScheduledBatch(seqs, num_new, pool.take_copies(), preempted)

    def _adopt_sibling_prompt(self, seq: Sequence) -> str:
        """Re-prefill of a group sample (after preemption or a recompute update): share the full
        prompt blocks a running sibling already computed instead of recomputing them.
        Returns 'adopted', 'wait' (a sibling is computing the prompt right now) or 'none'."""
        bs = self.pool.block_size
        # at least the last token must be computed here, for its logits (a resumed sample may have none generated)
        full = min(seq.num_prompt_tokens, seq.num_tokens - 1) // bs
        if full == 0:
            return "none"
        waiting_for_sibling = False
        for sib in seq.request.sequences:
            if sib is seq or sib.finish_reason is not None or not sib.block_table:
                continue
            if sib.num_computed >= full * bs:
                seq.block_table = self.pool.share(sib.block_table[:full])
                seq.num_computed = full * bs
                self.prefill_tokens_saved += full * bs
                return "adopted"
            waiting_for_sibling = True
        return "wait" if waiting_for_sibling else "none"
