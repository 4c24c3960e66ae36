"""Block pool and KV cache manager, no model: exact block ids, order of reuse, and invariants under
random operation sequences."""
from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvserve.kv.block_pool import BlockPool
from kvserve.kv.manager import KVCacheManager
from kvserve.request import Request
from kvserve.sampling_params import SamplingParams


def req(n_tokens: int, rid: str = "r") -> Request:
    return Request(rid, list(range(n_tokens)), SamplingParams())


def test_allocate_takes_the_head_and_free_goes_to_the_tail():
    pool = BlockPool(6)  # block 0 is the null block: 1..5 usable
    assert pool.num_free == 5 and pool.num_usable == 5
    assert pool.allocate(2) == [1, 2]
    assert pool.allocate(1) == [3]
    pool.decref([2])
    assert pool.free_ids() == [4, 5, 2]
    assert pool.allocate(2) == [4, 5]
    assert pool.allocate(1) == [2]
    assert pool.num_free == 0
    pool.check_integrity()


def test_shared_block_is_freed_by_its_last_holder():
    pool = BlockPool(4)
    [b] = pool.allocate(1)
    pool.incref([b])
    pool.decref([b])
    assert b not in pool.free_ids()
    pool.decref([b])
    assert pool.free_ids()[-1] == b
    pool.check_integrity()


def test_manager_allocates_by_block_and_frees_tail_first():
    m = KVCacheManager(BlockPool(8), block_size=4)
    r = req(10)
    assert m.allocate_slots(r, 10) == [1, 2, 3]  # 10 tokens -> 3 blocks of 4
    r.num_computed_tokens = 10
    assert m.allocate_slots(r, 2) == []  # tokens 10, 11 fit the third block
    r.num_computed_tokens = 12
    assert m.allocate_slots(r, 1) == [4]
    assert m.block_ids("r") == [1, 2, 3, 4]
    other = req(4, "o")
    assert m.allocate_slots(other, 16) is None  # 4 blocks wanted, 3 free: all or nothing
    assert m.block_ids("o") == [] and m.pool.num_free == 3
    m.free(r)
    assert m.pool.free_ids() == [5, 6, 7, 4, 3, 2, 1]
    assert m.usage().blocks_used == 0


class PoolMachine(RuleBasedStateMachine):
    """Random allocate / append / share / free / preempt; after every step the pool accounts for
    every block and each ref count equals the number of holders."""

    def __init__(self):
        super().__init__()
        self.m = KVCacheManager(BlockPool(12), block_size=4)
        self.live: list[Request] = []
        self.shared: list[list[int]] = []  # extra references (as a prefix tree would hold)
        self.n = 0

    @rule(n_tokens=st.integers(1, 30))
    def add(self, n_tokens):
        r = req(n_tokens, f"r{self.n}")
        self.n += 1
        if self.m.allocate_slots(r, n_tokens) is not None:
            r.num_computed_tokens = n_tokens
            self.live.append(r)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), k=st.integers(1, 9))
    def append(self, i, k):
        r = self.live[i % len(self.live)]
        before = list(self.m.block_ids(r.request_id))
        if self.m.allocate_slots(r, k) is not None:
            r.num_computed_tokens += k
            r.prompt_token_ids += [0] * k
        else:
            assert self.m.block_ids(r.request_id) == before

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def share(self, i):
        r = self.live[i % len(self.live)]
        ids = self.m.block_ids(r.request_id)
        self.m.pool.incref(ids)
        self.shared.append(list(ids))

    @precondition(lambda self: self.shared)
    @rule()
    def unshare(self):
        self.m.pool.decref(self.shared.pop())

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        self.m.free(self.live.pop(i % len(self.live)))

    @precondition(lambda self: self.live)
    @rule()
    def preempt_newest(self):
        r = self.live.pop()
        self.m.free(r)
        r.num_computed_tokens = 0
        assert self.m.block_ids(r.request_id) == []

    @invariant()
    def accounted(self):
        pool = self.m.pool
        pool.check_integrity()
        holders = [0] * pool.num_blocks
        for r in self.live:
            for b in self.m.block_ids(r.request_id):
                holders[b] += 1
        for ids in self.shared:
            for b in ids:
                holders[b] += 1
        assert holders == pool.ref_cnt
        held = sum(1 for c in holders if c)
        assert pool.num_free + held == pool.num_usable
        for r in self.live:
            assert len(self.m.block_ids(r.request_id)) == -(-r.num_computed_tokens // 4)


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_sliding_group_gives_back_blocks_the_window_has_passed():
    """Two groups (full, window 6) with block_size 4: as a request grows, the sliding group's blocks
    wholly before c - W + 1 (c = tokens computed) go back to the pool and read as the null block 0;
    the full group keeps everything. Freeing the request returns exactly the live blocks."""
    pool = BlockPool(40)
    m = KVCacheManager(pool, block_size=4, num_groups=2, windows=[None, 6])
    r = req(10)
    assert m.allocate_slots(r, 10) is not None  # tokens 0-9: 3 blocks per group
    r.num_computed_tokens = 10
    full, sliding = m.block_tables("r")
    assert len(full) == len(sliding) == 3 and 0 not in sliding
    for c in range(10, 40):  # decode one token at a time
        assert m.allocate_slots(r, 1) is not None
        full, sliding = m.block_tables("r")
        first_visible = c - 6 + 1  # the query at position c sees c-5 .. c
        assert all(b == 0 for b in sliding[: first_visible // 4])
        assert all(b != 0 for b in sliding[first_visible // 4 :])
        assert sum(b != 0 for b in sliding) <= -(-6 // 4) + 1  # ceil(W / bs) + 1
        assert len(full) == len(sliding) == c // 4 + 1 and 0 not in full
        m.check_integrity()
        r.num_computed_tokens = c + 1
    held = pool.num_used
    assert held == len(full) + sum(b != 0 for b in sliding)
    m.free(r)
    assert pool.num_used == 0
    m.check_integrity()


def test_sink_window_on_a_hybrid_model_removes_the_same_entries_from_every_group():
    """sink_window on a full + sliding model: the full group decides what leaves (1 sink block + the
    window), the same entries leave the sliding table (null there already, so its null prefix
    shrinks), positions count within the cache, and each group's moved live blocks are re-rotated
    with that group's layers."""
    pool = BlockPool(60)
    m = KVCacheManager(pool, block_size=4, num_groups=2, windows=[None, 6], sink_window=(1, 8))
    r = req(4)
    for c in range(0, 60):
        assert m.allocate_slots(r, 1) is not None
        kv = m.requests["r"]
        full, sliding = m.block_tables("r")
        cache_len = c - kv.position_shift  # the new token's cache position
        assert len(full) == len(sliding) == cache_len // 4 + 1
        assert len(full) <= 1 + 8 // 4 + 2 and 0 not in full
        # the sliding group: null before its window (cache positions), live from there on
        first_visible = max(0, cache_len - 6 + 1)
        assert all(b == 0 for b in sliding[: first_visible // 4]) and all(b != 0 for b in sliding[first_visible // 4 :])
        assert kv.num_dropped[1] == first_visible // 4
        for group, blocks, delta in m.take_position_shifts():
            assert delta % 4 == 0 and delta > 0
            assert set(blocks) <= set(m.block_tables("r")[group]) and 0 not in blocks
        m.check_integrity()
        r.num_computed_tokens = c + 1
    assert m.requests["r"].position_shift > 40
    m.free(r)
    assert pool.num_used == 0
    m.check_integrity()
