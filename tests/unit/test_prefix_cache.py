"""Radix prefix cache, no model: matching, splitting, locks, exact eviction order, and a random
test against a naive longest-prefix reference. Every test ends with an integrity check."""
from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import given, settings

from kvserve.kv.block_pool import BlockPool
from kvserve.kv.manager import KVCacheManager
from kvserve.kv.prefix_cache import RadixPrefixCache
from kvserve.kv.spec import KVCacheGroup, KVSpec, LayerKVSpec
from kvserve.kv.storage import KVCache
from kvserve.request import Request
from kvserve.sampling_params import SamplingParams

BS = 2


def cache(num_blocks=16):
    pool = BlockPool(num_blocks)
    return pool, RadixPrefixCache(pool, BS)


def put(pool, tree, tokens):
    """Insert as a finishing request would: allocate, insert, drop the request's references."""
    ids = pool.allocate(len(tokens) // BS)
    tree.insert(tokens, ids)
    pool.decref(ids)
    return ids


def test_match_whole_blocks_only():
    pool, tree = cache()
    ids = put(pool, tree, [1, 2, 3, 4, 5, 6])
    assert tree.match_prefix([1, 2, 3, 4, 5, 6, 7]).block_ids == ids
    assert tree.match_prefix([1, 2, 3, 9]).block_ids == ids[:1]
    assert tree.match_prefix([1, 2, 3]).block_ids == ids[:1]  # the partial block [3] never matches
    assert tree.match_prefix([9, 9]).block_ids == []
    tree.check_integrity()
    pool.check_integrity()


def test_partial_match_splits_the_node_and_insert_reports_cached_length():
    pool, tree = cache()
    a = put(pool, tree, [1, 2, 3, 4, 5, 6])
    assert len(tree.root.children) == 1
    b_ids = pool.allocate(3)
    assert tree.insert([1, 2, 3, 4, 7, 8], b_ids) == 2  # first two blocks already cached
    pool.decref(b_ids)  # the request's duplicates of blocks 0-1 go back to the pool
    top = tree.root.children[(1, 2)]
    assert top.blocks == [(1, 2), (3, 4)] and top.block_ids == a[:2]
    assert sorted(c.blocks[0] for c in top.children.values()) == [(5, 6), (7, 8)]
    assert tree.num_blocks == 4
    assert pool.ref_cnt[b_ids[0]] == 0 and pool.ref_cnt[b_ids[2]] == 1
    tree.check_integrity()
    pool.check_integrity()


def test_eviction_is_lru_over_unlocked_leaves():
    pool, tree = cache(16)
    a = put(pool, tree, [1, 1, 2, 2])  # t=1
    b = put(pool, tree, [3, 3, 4, 4])  # t=2
    c = put(pool, tree, [5, 5])  # t=3
    tree.match_prefix([1, 1, 2, 2])  # touch a: now b is the least recently used
    free_before = pool.free_ids()
    assert tree.evict(1) == 2  # a whole leaf goes: b's two blocks
    assert pool.free_ids() == free_before + list(reversed(b))[::-1]
    assert tree.match_prefix([3, 3, 4, 4]).block_ids == []
    assert tree.evict(1) == 1 and tree.match_prefix([5, 5]).block_ids == []  # then c
    assert tree.match_prefix([1, 1, 2, 2]).block_ids == a
    assert tree.evicted_blocks == 3
    tree.check_integrity()
    pool.check_integrity()


def test_locked_nodes_are_not_evicted_and_parents_follow_children():
    pool, tree = cache(16)
    put(pool, tree, [1, 1, 2, 2])
    put(pool, tree, [1, 1, 3, 3])  # splits: [1,1] -> {[2,2], [3,3]}
    m = tree.match_prefix([1, 1, 2, 2])
    tree.lock(m.node)
    assert tree.evictable_blocks() == 1  # only [3,3]
    assert tree.evict(10) == 1  # [3,3] goes; [1,1] still has a locked child
    assert tree.match_prefix([1, 1, 2, 2]).block_ids == m.block_ids
    tree.unlock(m.node)
    assert tree.evict(10) == 2  # the leaf, then its parent which became a leaf
    assert tree.num_blocks == 0 and pool.num_free == pool.num_usable
    tree.check_integrity()
    pool.check_integrity()


def small_storage(num_blocks: int) -> KVCache:
    """A real (tiny) KV tensor store, so copy-on-write and swap copies really move values."""
    layer = LayerKVSpec(num_kv_heads=1, head_dim=2, dtype=torch.float32)
    return KVCache(KVSpec((KVCacheGroup(layer, (0,)),)), num_blocks, BS)


def manager(num_blocks=16, storage=True, swap_space=0) -> KVCacheManager:
    store = small_storage(num_blocks) if storage else None
    return KVCacheManager(BlockPool(num_blocks), BS, enable_prefix_caching=True, storage=store, swap_space=swap_space)


def run(m: KVCacheManager, r: Request) -> None:
    """Admit ``r`` as the scheduler does (prefix hit, then slots for the rest) and mark it computed."""
    hit = m.get_computed_blocks(r)
    assert m.allocate_slots(r, r.num_tokens - hit.num_tokens, hit) is not None
    m.record_hit(r, hit)
    r.num_computed_tokens = r.num_tokens


def test_manager_caps_a_full_hit_and_checks_integrity():
    m = manager(storage=False)  # no storage: no copy-on-write, the shared last block is recomputed
    r = Request("a", [1, 2, 3, 4], SamplingParams())
    assert m.get_computed_blocks(r).num_tokens == 0
    run(m, r)
    m.free(r)  # inserts both blocks
    r2 = Request("b", [1, 2, 3, 4], SamplingParams())
    hit = m.get_computed_blocks(r2)
    assert hit.num_tokens == 2  # not 4: the last token must be computed to get logits
    run(m, r2)
    m.check_integrity()
    assert m.usage().blocks_cached == 1  # the second block: tree only
    m.free(r2)
    m.check_integrity()
    assert m.prefix_queries == 8 and m.prefix_hits == 2


def test_partial_last_block_is_cached_and_copied_on_write():
    m = manager()
    r = Request("a", [1, 2, 3, 4, 5], SamplingParams())  # blocks (1, 2) (3, 4) and a partial (5,)
    run(m, r)
    a = m.block_ids("a")
    m.storage.k[0, a[2] * BS] = 7.0  # token 5's key
    m.free(r)
    assert m.prefix_cache.num_blocks == 3  # the partial block stays as a leaf
    m.check_integrity()
    # the same prompt again: 4 tokens in shared blocks, token 5 recomputed into a copy of the partial block
    r2 = Request("b", [1, 2, 3, 4, 5], SamplingParams())
    assert m.get_computed_blocks(r2).num_tokens == 4
    # a longer prompt through the partial block: its 1 cached token is copied, not shared
    r3 = Request("c", [1, 2, 3, 4, 5, 6, 7], SamplingParams())
    hit = m.get_computed_blocks(r3)
    assert (hit.blocks, hit.tail, hit.num_tokens) == (a[:2], a[2], 5)
    assert m.allocate_slots(r3, 2, hit) is not None
    own = m.block_ids("c")
    assert own[:2] == a[:2] and own[2] not in a
    assert bool((m.storage.k[0, own[2] * BS] == 7.0).all())  # the copy holds token 5's K/V
    m.check_integrity()


def test_token_granular_tail_inside_a_whole_block():
    pool, tree = cache()
    ids = put(pool, tree, [1, 2, 3, 4])
    m = tree.match_prefix([1, 2, 3, 9])
    assert m.block_ids == ids[:1] and (m.tail_block, m.tail_tokens) == (ids[1], 1)


def test_a_hit_that_cannot_allocate_takes_nothing():
    m = manager(num_blocks=6)  # 5 usable blocks
    r = Request("a", [1, 2, 3, 4], SamplingParams())
    run(m, r)
    m.free(r)  # 2 blocks in the tree
    big = Request("b", [1, 2, 3, 4] + list(range(10, 20)), SamplingParams())  # needs 7 blocks: 2 hit + 5 new
    refs = list(m.pool.ref_cnt)
    hit = m.get_computed_blocks(big)
    assert hit.num_tokens == 4
    assert m.allocate_slots(big, big.num_tokens - hit.num_tokens, hit) is None
    assert m.pool.ref_cnt == refs and m.prefix_cache.root.lock_ref == 1  # no pin, no lock left behind
    assert m.prefix_cache.num_blocks == 2  # the hit's own blocks were not evicted to make room
    m.check_integrity()


def test_swap_in_evicts_the_tree_like_any_allocation():
    m = manager(num_blocks=6, swap_space=1 << 20)
    r = Request("a", list(range(8)), SamplingParams())  # 4 blocks
    run(m, r)
    assert m.swap_out(r) and m.is_swapped(r)
    assert m.pool.num_free == 1 and m.prefix_cache.num_blocks == 4  # the tree kept its copies
    assert m.swap_in(r)  # 4 blocks: evicts tree leaves to make room
    assert len(m.block_ids("a")) == 4 and m.num_swapped_blocks == 0
    m.check_integrity()


token_lists = st.lists(st.lists(st.integers(0, 2), min_size=0, max_size=10), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(token_lists, st.lists(st.integers(0, 4), max_size=12), st.lists(st.integers(0, 2), min_size=1, max_size=10))
def test_random_insert_match_evict_against_naive_reference(inserts, evictions, query):
    """Sound: every matched block holds exactly the query's tokens up to it (the tree never returns
    a block for other tokens). Complete: without eviction the match is the naive longest cached
    prefix; with eviction it is never longer."""
    pool, tree = cache(64)
    reference: set[tuple] = set()  # every block-aligned prefix ever inserted
    holds: dict[int, tuple] = {}  # block id -> the token prefix ending with this block
    evicted = False
    for toks, ev in zip(inserts, evictions + [0] * len(inserts)):
        n = len(toks) // BS
        if n > pool.num_free:
            continue
        ids = pool.allocate(n)
        cached = tree.insert(toks, ids)
        for i in range(cached, n):
            holds[ids[i]] = tuple(toks[: (i + 1) * BS])
        pool.decref(ids)
        reference |= {tuple(toks[: i * BS]) for i in range(1, n + 1)}
        if ev:
            evicted |= tree.evict(ev) > 0
        tree.check_integrity()
        pool.check_integrity()
    got = tree.match_prefix(query).block_ids
    for i, b in enumerate(got):
        assert holds[b] == tuple(query[: (i + 1) * BS])
    best = max((len(p) for p in reference if list(p) == query[: len(p)]), default=0)
    assert len(got) * BS == best if not evicted else len(got) * BS <= best
    assert pool.num_free + tree.num_blocks == pool.num_usable


def test_tuple_entries_for_several_kv_cache_groups():
    """With two KV cache groups each block of tokens has one pool block per group: the tree stores the
    pair, holds a reference on both, evicts both, and refuses to add an entry naming the null block
    (a block a sliding group gave back)."""
    pool, tree = cache(20)
    ids = pool.allocate(6)
    pairs = [(ids[0], ids[3]), (ids[1], ids[4]), (ids[2], ids[5])]
    tree.insert([1, 2, 3, 4, 5, 6], pairs)
    pool.decref(ids)
    assert tree.match_prefix([1, 2, 3, 4, 9]).block_ids == pairs[:2]
    assert sorted(tree.block_ids()) == sorted(ids) and all(pool.ref_cnt[b] == 1 for b in ids)
    tree.check_integrity()
    # a path that would continue past a hole is not added
    more = pool.allocate(2)
    assert tree.insert([7, 8, 9, 10], [(0, more[0]), (more[1], 0)]) == 0
    assert tree.match_prefix([7, 8]).block_ids == [] and pool.ref_cnt[more[0]] == 1
    pool.decref(more)
    assert tree.evict(3) == 6 and pool.num_used == 0
    tree.check_integrity()
