"""One allocator for all KV memory: fixed-size blocks with reference counts.

Everything that holds KV (a running request, the prefix tree, a swapped-out request once it is
back) holds *block ids from this pool* and a reference on each. A block returns to the free queue
when its last reference goes. Block 0 is the null block: never handed out, it pads block tables.

    free queue (FIFO: the longest-free block is reused first)
    head -> [7] [3] [12] ... <- tail (just freed)
"""
from __future__ import annotations

from collections import OrderedDict

NULL_BLOCK = 0


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        # since the start, for traces (--explain): allocated - freed == num_used at every moment
        self.num_allocated_total = 0
        self.num_freed_total = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        """All blocks but the null block."""
        return self.num_blocks - 1

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    def usage(self) -> float:
        return self.num_used / self.num_usable

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the head of the free queue, each with one reference."""
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        ids = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            self.ref_cnt[block_id] = 1
            ids.append(block_id)
        self.num_allocated_total += n
        return ids

    def incref(self, block_ids: list[int]) -> None:
        """Another holder shares these (already held) blocks."""
        for b in block_ids:
            assert self.ref_cnt[b] > 0, f"incref of free block {b}"
            self.ref_cnt[b] += 1

    def decref(self, block_ids: list[int]) -> None:
        """Drop one reference each; a block whose count reaches 0 goes to the tail of the free queue."""
        for b in block_ids:
            assert self.ref_cnt[b] > 0, f"decref of free block {b}"
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self._free[b] = None
                self.num_freed_total += 1

    def free_ids(self) -> list[int]:
        return list(self._free)

    def check_integrity(self) -> None:
        """Every usable block is either free (ref 0, in the queue) or held (ref > 0, not in it)."""
        assert NULL_BLOCK not in self._free and self.ref_cnt[NULL_BLOCK] == 0
        for b in range(1, self.num_blocks):
            assert (self.ref_cnt[b] == 0) == (b in self._free), f"block {b}: ref {self.ref_cnt[b]}"
