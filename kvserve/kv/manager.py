"""What the scheduler asks of KV memory: which blocks a request already has, room for n more tokens, free.

A request's blocks, in order, hold its tokens in order:

    block_ids = [5, 9, 2]      block_size = 4
    tokens      0-3  4-7  8-9  (slots 20..23, 36..39, 8..9; slots 10, 11 free for the next tokens)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kvserve.kv.block_pool import BlockPool
from kvserve.kv.prefix_cache import RadixPrefixCache
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
    blocks_cached: int = 0  # held by the prefix tree (evictable unless a running request uses them)


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, enable_prefix_caching: bool = False,
                 copy_block: Callable[[int, int], None] | None = None):
        self.pool = pool
        self.block_size = block_size
        self.copy_block = copy_block  # copies one block's K/V to another (KVCache.copy_block)
        self.prefix_cache = RadixPrefixCache(pool, block_size) if enable_prefix_caching else None
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Blocks already holding a prefix of this request's tokens, and how many tokens they cover.

        The request takes a reference on each block and locks their tree path. A hit stops at least one
        token short of the whole sequence: the last token must still run to produce logits.

        A full hit (a block-aligned sequence seen before) would then recompute its whole last block,
        as vLLM does, because the last token's K/V goes into that block and the tree shares it. Instead
        the block is copied into one of the request's own (copy-on-write) and only the last token runs:
        a repeated 1,088-token prompt computes 1 token instead of 16."""
        if self.prefix_cache is None:
            return [], 0
        tokens = request.all_token_ids
        match = self.prefix_cache.match_prefix(tokens)
        self.prefix_cache.lock(match.node)
        request.prefix_node = match.node
        blocks = list(match.block_ids)
        hit = len(blocks) * self.block_size
        own = None
        if blocks and hit == len(tokens):  # a full hit: the last token would write into a shared block
            last = blocks.pop()
            hit -= self.block_size
            if self.copy_block is not None and self.pool.num_free > 0:  # else recompute the last block
                own = self.pool.allocate(1)[0]
                self.copy_block(last, own)
        self.pool.incref(blocks)
        if own is not None:
            blocks.append(own)
            hit += self.block_size - 1
        self.prefix_queries += len(tokens)
        self.prefix_hits += hit
        return blocks, hit

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        total = request.num_computed_tokens + num_new_tokens
        return max(0, cdiv(total, self.block_size) - len(request.block_ids))

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        return self.blocks_needed(request, num_new_tokens) <= self.pool.num_free

    def allocate_slots(self, request: Request, num_new_tokens: int) -> list[int] | None:
        """Make room for ``num_new_tokens`` more tokens of ``request``; the new block ids, or None when
        the pool cannot hold them (the caller then preempts someone or waits). Allocates all or nothing."""
        need = self.blocks_needed(request, num_new_tokens)
        if need > self.pool.num_free and self.prefix_cache is not None:
            self.prefix_cache.evict(need - self.pool.num_free)
        if need > self.pool.num_free:
            return None
        new = self.pool.allocate(need)
        request.block_ids.extend(new)
        return new

    def cache_blocks(self, request: Request) -> None:
        """Put the request's whole computed blocks (prompt and generated tokens alike) into the prefix
        tree as soon as they are computed, not only when it finishes: requests that share a prefix
        and arrive together then hit what the first one has already prefilled (vLLM does the same)."""
        if self.prefix_cache is None:
            return
        n_full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        if n_full > request.num_blocks_in_tree:
            self.prefix_cache.insert(request.all_token_ids[: n_full * self.block_size], request.block_ids[:n_full])
            request.num_blocks_in_tree = n_full

    def free(self, request: Request) -> None:
        """Drop the request's references, last block first, so its tail is reused before its head.

        With a prefix cache, its computed blocks stay in the tree (``cache_blocks``), so a later request
        (or the next turn of a chat) finds them."""
        if self.prefix_cache is not None:
            self.cache_blocks(request)
            request.num_blocks_in_tree = 0
            if request.prefix_node is not None:
                self.prefix_cache.unlock(request.prefix_node)
                request.prefix_node = None
        self.pool.decref(list(reversed(request.block_ids)))
        request.block_ids = []

    def check_integrity(self, requests: list[Request]) -> None:
        """Every block's ref count equals its holders (the tree, live requests); free + held == total."""
        holders = [0] * self.pool.num_blocks
        tree_blocks = self.prefix_cache.block_ids() if self.prefix_cache is not None else []
        for b in tree_blocks:
            holders[b] += 1
        for r in requests:
            for b in r.block_ids:
                holders[b] += 1
        assert holders == self.pool.ref_cnt, "block ref counts differ from their holders"
        held = sum(1 for h in holders[1:] if h)
        assert self.pool.num_free + held == self.pool.num_usable
        self.pool.check_integrity()
        if self.prefix_cache is not None:
            self.prefix_cache.check_integrity()

    def usage(self) -> CacheUsage:
        """free + cached + used == total. "cached" blocks are held by the prefix tree alone: they keep
        K/V for later hits but are evicted on demand, so (as in vLLM) they do not count as used."""
        p = self.pool
        cached = 0
        if self.prefix_cache is not None:
            cached = sum(1 for b in self.prefix_cache.block_ids() if p.ref_cnt[b] == 1)
        used = p.num_used - cached
        return CacheUsage(p.num_usable, p.num_free, used, used / p.num_usable, p.num_usable * self.block_size, cached)
