"""What the scheduler asks of KV memory: which blocks a request already has, room for n more tokens, free.

A request's blocks, in order, hold its tokens in order:

    block_ids = [5, 9, 2]      block_size = 4
    tokens      0-3  4-7  8-9  (slots 20..23, 36..39, 8..9; slots 10, 11 free for the next tokens)
"""
from __future__ import annotations

from dataclasses import dataclass

from kvserve.kv.block_pool import BlockPool
from kvserve.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class CacheUsage:
    blocks_total: int
    blocks_free: int
    blocks_used: int
    usage: float
    tokens_capacity: int


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int):
        self.pool = pool
        self.block_size = block_size

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Blocks already holding a prefix of this request's tokens, and how many tokens they cover.
        Without a prefix cache nothing is ever found."""
        return [], 0

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        total = request.num_computed_tokens + num_new_tokens
        return max(0, cdiv(total, self.block_size) - len(request.block_ids))

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        return self.blocks_needed(request, num_new_tokens) <= self.pool.num_free

    def allocate_slots(self, request: Request, num_new_tokens: int) -> list[int] | None:
        """Make room for ``num_new_tokens`` more tokens of ``request``; the new block ids, or None when
        the pool cannot hold them (the caller then preempts someone or waits). Allocates all or nothing."""
        need = self.blocks_needed(request, num_new_tokens)
        if need > self.pool.num_free:
            return None
        new = self.pool.allocate(need)
        request.block_ids.extend(new)
        return new

    def free(self, request: Request) -> None:
        """Drop the request's references, last block first, so its tail is reused before its head."""
        self.pool.decref(list(reversed(request.block_ids)))
        request.block_ids = []

    def usage(self) -> CacheUsage:
        p = self.pool
        return CacheUsage(p.num_usable, p.num_free, p.num_used, p.usage(), p.num_usable * self.block_size)
