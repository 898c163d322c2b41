"""Paged KV cache bookkeeping: a pool of fixed-size blocks, refcounts, copy-on-write.

A sequence owns a block table (list of block ids); logical position p lives in block
``table[p // block_size]`` at offset ``p % block_size``. Blocks of a GRPO group's prompt are
shared by refcount; a sequence about to write into a block that others still reference
copies it first (copy-on-write), so shared blocks are never mutated.
The tensors themselves live in the model runner; this module only hands out block ids and
records which (src, dst) copies the runner must perform before the next forward.
"""

from __future__ import annotations

from collections import deque


class OutOfBlocks(RuntimeError):
    """The pool cannot satisfy a reservation; the scheduler must preempt first."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.refcount = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) to apply before the next forward

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks("KV block pool exhausted")
        block = self._free.popleft()
        self.refcount[block] = 1
        return block

    def share(self, table: list[int]) -> list[int]:
        """A new table referencing the same blocks (refcount + 1 each)."""
        for block in table:
            self.refcount[block] += 1
        return list(table)

    def release(self, table: list[int]) -> None:
        """Drop one reference to every block of ``table``; blocks reaching 0 return to the pool."""
        for block in table:
            self.refcount[block] -= 1
            if self.refcount[block] == 0:
                self._free.append(block)
            elif self.refcount[block] < 0:
                raise AssertionError(f"block {block} released more times than referenced")
        table.clear()

    def extra_blocks_for(self, table: list[int], num_computed: int, num_new: int) -> int:
        """Blocks needed so positions [num_computed, num_computed + num_new) are writable by this table:
        new blocks past the end plus one copy if the first written block is shared."""
        if num_new <= 0:
            return 0
        bs = self.block_size
        first = num_computed // bs
        need = max(0, (num_computed + num_new + bs - 1) // bs - len(table))
        if first < len(table) and self.refcount[table[first]] > 1:
            need += 1
        return need

    def reserve(self, table: list[int], num_computed: int, num_new: int) -> None:
        """Make positions [num_computed, num_computed + num_new) writable (allocating / copying).
        Caller checks ``extra_blocks_for(...) <= num_free`` first."""
        if self.extra_blocks_for(table, num_computed, num_new) > self.num_free:
            raise OutOfBlocks("reserve() called without enough free blocks")
        first = num_computed // self.block_size
        if num_new > 0 and first < len(table) and self.refcount[table[first]] > 1:
            src = table[first]
            dst = self.allocate()
            self.refcount[src] -= 1  # still > 0: someone else holds it
            table[first] = dst
            self.pending_copies.append((src, dst))
        while len(table) < self.blocks_needed(num_computed + num_new):
            table.append(self.allocate())

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
