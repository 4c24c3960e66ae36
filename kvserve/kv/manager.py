"""What the scheduler asks of KV memory, and the KV state of every request.

The manager owns each request's block tables (one per KV cache group), its lock in the prefix tree,
how many of its blocks the tree already holds, and its swapped-out copy. The scheduler only asks:

    get_computed_blocks(req)               -> PrefixHit      which cached blocks fit (no side effects)
    allocate_slots(req, n, hit)            -> new ids | None room for n more tokens, all or nothing
    cache_blocks(req) / free(req)                             feed the prefix tree, drop references
    swap_out(req) / swap_in(req)           -> bool            move a preempted request's K/V to the CPU and back

A request's blocks, in order, hold its tokens in order:

    block_table = [5, 9, 2]      block_size = 4
    tokens        0-3  4-7  8-9  (slots 20..23, 36..39, 8..9; slots 10, 11 free for the next tokens)

A sliding-window group (window W) gives back the blocks every later query has slid past: the next
token, at position c (= tokens computed), sees positions c - W + 1 .. c, so blocks wholly before
c - W + 1 return to the pool at once and their table entries point at the null block 0. Such a group
holds at most ceil(W / block_size) + 1 blocks per request however long the request grows:

    W = 6, block_size = 4, c = 13:  table = [0, 9, 2, 7]   (tokens 0-3 dropped; 8..13 visible)

The ``sink_window`` policy (StreamingLLM, any model) keeps the first
``sink_blocks`` blocks (the attention sinks) and the blocks of the last ``window`` tokens, and *removes*
the blocks in between from the table, so positions count within the cache, not within the text: the
tokens after a removed block move down by block_size positions, and their keys must be re-rotated by
that much (``take_position_shifts``: the runner does it before the step's forward, whole blocks at a
time, llama.cpp's ``seq_add`` RoPE shift). ``position_shift`` is how far a request's cache positions
lag its text positions.

    sink_blocks = 1, window = 8, block_size = 4, 20 tokens computed:
    text  0-3 | 4-7 | 8-11 | 12-15 | 16-19      table [5, 6, 2, 8, 3]
    ->    0-3 |             12-15 | 16-19       table [5, 8, 3], shift 8: tokens 12-19 at positions 4-11

On a hybrid model (Gemma 3) the full-attention groups decide what the policy drops, and the same
entries leave every group's table, since entry i holds cache positions i*block_size.. in all groups.
A sliding group's entries there are usually null already; where one is not, its layers lose those
tokens as the full layers do. Sliding windows count cache positions, and a sliding layer never reads
a null entry inside its window (after a shift the window can reach back over the sinks, which it
dropped long ago): its keys start at its first live block (``attn.backend``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvserve.kv.block_pool import NULL_BLOCK, BlockPool
from kvserve.kv.prefix_cache import BlockId, Node, RadixPrefixCache, flat
from kvserve.kv.storage import KVCache
from kvserve.kv.tiers import TieredStore, block_keys
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


@dataclass
class PrefixHit:
    """What the prefix tree holds of a request (``get_computed_blocks``): nothing is taken yet.

    ``blocks`` are shared as they are; ``tail`` is a tree block whose first ``tail_tokens`` tokens
    continue the hit, copied into a block of the request's own when the slots are allocated."""

    blocks: list[BlockId] = field(default_factory=list)  # with several KV cache groups: one id per group each
    node: Node | None = None
    tail: BlockId | None = None
    tail_tokens: int = 0
    num_tokens: int = 0  # tokens covered: len(blocks) * block_size + tail_tokens


@dataclass
class RequestKV:
    """The KV state of one request."""

    tables: list[list[int]]  # per KV cache group
    prefix_node: Node | None = None  # the tree node this request locked
    num_blocks_in_tree: int = 0  # leading blocks already inserted into the prefix tree
    num_dropped: list[int] = field(default_factory=list)  # per group: leading entries given back (now null)
    position_shift: int = 0  # sink_window: tokens removed from the middle (cache position = text position - this)
    keys: list[str] = field(default_factory=list)  # KV tiers: chained keys of its whole blocks so far
    rope_at_text: bool = False  # compressed (kv.compress): kept keys carry their text positions' RoPE


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, enable_prefix_caching: bool = False,
                 storage: KVCache | None = None, num_groups: int = 1, swap_space: int = 0,
                 windows: list[int | None] | None = None, sink_window: tuple[int, int] | None = None,
                 max_model_len: int | None = None, num_keep_tokens: int = 4, tiers: TieredStore | None = None):
        if windows is None and storage is not None:
            windows = [g.spec.window for g in storage.spec.groups]
        self.windows = windows or [None] * num_groups  # per group: sliding window, or None (full)
        if len(self.windows) != num_groups:
            raise ValueError(f"{len(self.windows)} windows for {num_groups} KV cache groups")
        # (sink blocks, window tokens) under the sink_window policy
        if sink_window is not None and (enable_prefix_caching or all(self.windows)):
            raise ValueError("the sink_window policy needs a full-attention layer, and no prefix cache")
        self.sink_window = sink_window
        self.full_group = next((g for g, w in enumerate(self.windows) if w is None), 0)  # decides what sink_window drops
        # context_overflow="shift": a request about to pass max_model_len keeps its first keep blocks and
        # drops the older half of the rest (llama.cpp's context shift)
        self.max_model_len, self.keep_blocks = max_model_len, cdiv(num_keep_tokens, block_size)
        self._shifts: list[tuple[int, list[int], int]] = []  # (group, blocks, positions) whose keys move down
        self.pool = pool
        self.block_size = block_size
        self.storage = storage  # the K/V tensors: copy-on-write and swap copies go through it
        self.num_groups = num_groups
        self.prefix_cache = RadixPrefixCache(pool, block_size) if enable_prefix_caching else None
        # KV tiers (kv.tiers): evicted tree blocks go down, matches continue there, computed blocks are
        # written through to disk
        self.tiers = tiers if self.prefix_cache is not None else None
        if self.tiers is not None:
            if storage is None:
                raise ValueError("KV tiers need the K/V storage to copy blocks out of and into")
            self.prefix_cache.on_evict = self._write_down
            # the shape of one tree entry's data (one block per group), for checking what comes back
            self._like = [torch.empty((t.shape[0], num_groups * block_size, *t.shape[2:]), dtype=t.dtype, device="meta")
                          for t in storage.tensors]
        self.requests: dict[str, RequestKV] = {}
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found
        # swap preemption: request id -> (CPU copies of K, V, blocks per group)
        self.swap_space = swap_space
        # id -> (CPU copies, per group (leading null entries, live blocks), position shift, rope_at_text)
        self._swapped: dict[str, tuple[list[torch.Tensor], list[tuple[int, int]], int, bool]] = {}
        self.swap_bytes_used = 0
        self.num_swapped_blocks = 0  # blocks currently held in the CPU pool
        # since the start, for traces (--explain): blocks copied on write, swapped out, swapped in
        self.num_copied_blocks = self.num_swapped_out_blocks = self.num_swapped_in_blocks = 0

    # ------------------------------------------------------------------ state
    def block_tables(self, request_id: str) -> list[list[int]]:
        """The request's blocks, one list per KV cache group (empty lists when it holds none)."""
        kv = self.requests.get(request_id)
        return kv.tables if kv is not None else [[] for _ in range(self.num_groups)]

    def block_ids(self, request_id: str) -> list[int]:
        """The request's blocks in the first (with one group: the only) KV cache group."""
        return self.block_tables(request_id)[0]

    def _kv(self, request_id: str) -> RequestKV:
        kv = self.requests.get(request_id)
        if kv is None:
            kv = self.requests[request_id] = RequestKV([[] for _ in range(self.num_groups)], num_dropped=[0] * self.num_groups)
        return kv

    def position_shift(self, request_id: str) -> int:
        kv = self.requests.get(request_id)
        return kv.position_shift if kv is not None else 0

    def rope_at_text(self, request_id: str) -> bool:
        kv = self.requests.get(request_id)
        return kv is not None and kv.rope_at_text

    def compressed(self, request: Request, length: int, kept: int) -> int:
        """The request's first ``length`` tokens were packed into its first ``kept`` cache positions
        (``kv.compress.pack``): the blocks past them go back to the pool at once, and its later tokens
        are written after the kept ones while keeping their text positions. Returns the blocks given
        back (all groups)."""
        kv = self.requests[request.request_id]
        keep = cdiv(kept, self.block_size)
        returned = 0
        for table in kv.tables:
            freed = table[keep:]
            del table[keep:]
            self.pool.decref(list(reversed(freed)))  # the tail first, as ``free`` does
            returned += len(freed)
        kv.position_shift, kv.rope_at_text = length - kept, True
        return returned

    def take_position_shifts(self) -> list[tuple[int, list[int], int]]:
        """The re-rotations owed since the last call (sink_window, context shift): (group, block ids,
        delta), the keys of those blocks in that group's layers to move down by delta positions before
        the next forward."""
        out, self._shifts = self._shifts, []
        return out

    def _drop_middle(self, request: Request) -> None:
        """sink_window: remove the blocks between the sinks and the window (see the module docstring)."""
        kv = self.requests.get(request.request_id)
        if kv is None:
            return
        sink_blocks, window = self.sink_window
        table = kv.tables[self.full_group]
        cache_len = request.num_computed_tokens - kv.position_shift
        # the next token, at cache position cache_len, keeps the blocks from the one holding
        # cache_len - window + 1 on, and the sinks
        n = min((cache_len - window + 1) // self.block_size, len(table)) - sink_blocks
        if n > 0:
            self._remove_blocks(kv, sink_blocks, n)

    def _shift_context(self, request: Request, num_new_tokens: int) -> None:
        """context_overflow="shift": while the next ``num_new_tokens`` would pass max_model_len, drop
        the older half of the blocks after the kept first ones (at least one block)."""
        kv = self.requests.get(request.request_id)
        if kv is None or self.max_model_len is None:
            return
        table, keep = kv.tables[self.full_group], self.keep_blocks
        while request.num_computed_tokens - kv.position_shift + num_new_tokens > self.max_model_len:
            n = max(1, (len(table) - keep) // 2)
            if len(table) - keep < n + 1:  # nothing left to drop but the block being filled
                raise MemoryError(f"context_overflow='shift': {num_new_tokens} new tokens do not fit "
                                  f"max_model_len={self.max_model_len} beside the {keep} kept blocks")
            self._remove_blocks(kv, keep, n)

    def _remove_blocks(self, kv: RequestKV, start: int, n: int) -> None:
        """Take entries start .. start+n-1 out of every group's table; the later ones move down n blocks'
        worth of positions, and their keys are re-rotated before the next forward. A sliding group's
        removed entries may be null (given back already): its null prefix shrinks by those."""
        delta = n * self.block_size
        for g, table in enumerate(kv.tables):
            removed = table[start : start + n]
            del table[start : start + n]
            self.pool.decref([b for b in removed if b != NULL_BLOCK])
            kv.num_dropped[g] -= sum(1 for b in removed if b == NULL_BLOCK)
            moved = [b for b in table[start:] if b != NULL_BLOCK]
            if moved:
                self._shifts.append((g, moved, delta))
        kv.position_shift += delta

    def _drop_out_of_window(self, request: Request) -> None:
        """Give back the sliding groups' blocks that no later query can see (see the module docstring)."""
        kv = self.requests.get(request.request_id)
        if kv is None:
            return
        for g, window in enumerate(self.windows):
            if window is None:
                continue
            first_visible = request.num_computed_tokens - kv.position_shift - window + 1  # cache positions
            table = kv.tables[g]
            end = min(max(0, first_visible) // self.block_size, len(table))
            if end > kv.num_dropped[g]:
                dropped = table[kv.num_dropped[g] : end]
                table[kv.num_dropped[g] : end] = [NULL_BLOCK] * len(dropped)
                kv.num_dropped[g] = end
                self.pool.decref(dropped)

    # ------------------------------------------------------------------ prefix hits
    def get_computed_blocks(self, request: Request) -> PrefixHit:
        """Which cached blocks hold a prefix of this request's tokens. Takes nothing: the blocks are
        shared, and their tree path locked, only when ``allocate_slots`` succeeds with this hit.

        A hit stops at least one token short of the whole sequence: the last token must still run to
        produce logits. That token's K/V, and any token after a partial-block hit, go into a block
        the tree shares, so that block (the tail) is copied into one of the request's own first
        (copy-on-write) and only the tokens after the hit run: a repeated prompt of any length
        computes one token, where vLLM recomputes its whole last block."""
        if self.prefix_cache is None:
            return PrefixHit()
        tokens = request.all_token_ids
        m = self.prefix_cache.match_prefix(tokens)
        if self.tiers is not None and self._load_from_tiers(tokens, m):
            m = self.prefix_cache.match_prefix(tokens)  # now down to the blocks just loaded
        blocks, tail, tail_tokens = list(m.block_ids), m.tail_block, m.tail_tokens
        if len(blocks) * self.block_size >= len(tokens):  # everything cached: the last block becomes the tail
            tail, tail_tokens = blocks.pop(), self.block_size
        tail_tokens = min(tail_tokens, len(tokens) - 1 - len(blocks) * self.block_size)
        if tail_tokens <= 0 or self.storage is None:
            tail, tail_tokens = None, 0
        return PrefixHit(blocks, m.node, tail, tail_tokens, len(blocks) * self.block_size + tail_tokens)

    # ------------------------------------------------------------------ KV tiers
    def _entry_data(self, entry: BlockId) -> list[torch.Tensor]:
        return self.storage.copy_out(flat([entry]))

    def _write_down(self, leaf: Node) -> None:
        """The tree evicts ``leaf``: its whole blocks go down a tier instead of being dropped."""
        full = [i for i, b in enumerate(leaf.blocks) if len(b) == self.block_size]
        if not full:
            return  # a partial leaf (fewer than block_size tokens) has no key
        keys = block_keys(self.tiers.identity, self.prefix_cache.path_tokens(leaf), self.block_size)
        keys = keys[len(keys) - len(leaf.blocks) :]
        for i in full:
            if self.tiers.wants(keys[i]):  # copy out only what no tier holds yet
                self.tiers.evicted(keys[i], self._entry_data(leaf.block_ids[i]))

    def _load_from_tiers(self, tokens: list[int], m) -> bool:
        """Extend a tree match with the request's next whole blocks found in the tiers: copy them up into
        new pool blocks and add them to the tree (which then holds them alone, like any cached block).
        At least one token is left to compute. True when any block came up."""
        bs, start = self.block_size, len(m.block_ids)
        last = (len(tokens) - 1) // bs
        if start >= last:  # (a match walks whole blocks only: it never ends in a partial leaf)
            return False
        keys = block_keys(self.tiers.identity, tokens[: last * bs], bs)
        n = 0
        while start + n < last and self.tiers.has(keys[start + n]):
            n += 1
        if n == 0:
            return False
        self.prefix_cache.lock(m.node)  # making room evicts leaves: never the path this match stands on
        try:
            new = self._take(n * self.num_groups)
            if new is None:
                return False
            entries = []
            for j in range(n):
                data = self.tiers.load(keys[start + j], self._like)
                if data is None:  # gone or unreadable (counted): compute from here on
                    break
                ids = new[j * self.num_groups : (j + 1) * self.num_groups]
                self.storage.copy_in(ids, data)
                entries.append(ids[0] if self.num_groups == 1 else tuple(ids))
            if entries:
                self.prefix_cache.insert(tokens[: (start + len(entries)) * bs], list(m.block_ids) + entries)
            self.pool.decref(new)  # the tree keeps what it took; the rest goes back
        finally:
            self.prefix_cache.unlock(m.node)
        return bool(entries)

    def prefetch(self, request: Request) -> None:
        """A request was queued: start reading its blocks from disk into the host pool now."""
        if self.tiers is not None and not self.bypasses_prefix_cache(request):
            tokens = request.all_token_ids
            self.tiers.prefetch(block_keys(self.tiers.identity, tokens[: len(tokens) - 1], self.block_size), self._like)

    def _write_through(self, request: Request, kv: RequestKV, first: int, n_full: int) -> None:
        """Blocks first .. n_full-1 of the request were just computed in full: to the disk tier."""
        if self.tiers is None or self.tiers.disk is None or not self.tiers.write_through:
            return
        keys = kv.keys = block_keys(self.tiers.identity, request.all_token_ids[: n_full * self.block_size],
                                    self.block_size, kv.keys)
        entries = self._tree_ids(kv)
        for i in range(first, n_full):
            if keys[i] not in self.tiers.disk:
                self.tiers.computed(keys[i], self._entry_data(entries[i]))

    # ------------------------------------------------------------------ allocation
    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        """New blocks per group for ``num_new_tokens`` more tokens after the computed ones."""
        total = request.num_computed_tokens - self.position_shift(request.request_id) + num_new_tokens
        return max(0, cdiv(total, self.block_size) - len(self.block_ids(request.request_id)))

    def _take(self, n: int) -> list[int] | None:
        """``n`` free blocks, evicting prefix-tree leaves for them if need be; None when even that fails."""
        if n > self.pool.num_free and self.prefix_cache is not None:
            self.prefix_cache.evict(n - self.pool.num_free)
        if n > self.pool.num_free:
            return None
        new = self.pool.allocate(n)
        if self.storage is not None:
            self.storage.zero_new(new)  # never-used memory may hold NaN; reads cover whole blocks
        return new

    def allocate_slots(self, request: Request, num_new_tokens: int, hit: PrefixHit | None = None) -> list[int] | None:
        """Make room for ``num_new_tokens`` more tokens of ``request`` (after ``hit``'s tokens, when the
        request starts with a prefix hit); the new block ids of the first group, or None when the pool
        cannot hold them (the caller then preempts someone or waits). All or nothing: on None the
        request holds exactly what it held before."""
        if hit is None or not (hit.blocks or hit.tail is not None):
            self._drop_out_of_window(request)  # first: what it gives back may be what it needs
            if self.sink_window is not None:
                self._drop_middle(request)
            if request.params.context_overflow == "shift":
                self._shift_context(request, num_new_tokens)
            need = self.blocks_needed(request, num_new_tokens) * self.num_groups
            new = self._take(need)
            if new is None:
                return None
            kv = self._kv(request.request_id)
            per = len(new) // self.num_groups
            for g in range(self.num_groups):
                kv.tables[g].extend(new[g * per : (g + 1) * per])
            return new[:per]
        # A prefix hit: protect its blocks from the eviction that making room may need.
        assert not self.block_ids(request.request_id), "a prefix hit is for a request that holds nothing"
        self.prefix_cache.lock(hit.node)
        tail = [] if hit.tail is None else flat([hit.tail])  # one block per group
        self.pool.incref(tail)
        need = cdiv(hit.num_tokens + num_new_tokens, self.block_size) - len(hit.blocks)
        new = self._take(need * self.num_groups)
        if new is not None:
            for g, t in enumerate(tail):  # copy-on-write: each group's tail into its first new block
                self.storage.copy_block(t, new[g * need])
                self.num_copied_blocks += 1
        self.pool.decref(tail)
        if new is None:
            self.prefix_cache.unlock(hit.node)
            return None
        self.pool.incref(flat(hit.blocks))
        kv = self._kv(request.request_id)
        for g in range(self.num_groups):
            shared = hit.blocks if self.num_groups == 1 else [ids[g] for ids in hit.blocks]
            kv.tables[g] = shared + new[g * need : (g + 1) * need]
        kv.prefix_node = hit.node
        return new[:need]

    def record_hit(self, request: Request, hit: PrefixHit) -> None:
        """Count an admitted request's lookup in the hit rate (tokens asked for, tokens found)."""
        if self.prefix_cache is not None:
            self.prefix_queries += request.num_tokens
            self.prefix_hits += hit.num_tokens

    # ------------------------------------------------------------------ prefix tree
    @staticmethod
    def bypasses_prefix_cache(request: Request) -> bool:
        """Requests that neither look up nor feed the prefix tree. prompt_logprobs scores every
        position, so it computes the prompt whole; fed back, its copy of a cached prefix would branch
        off the tree's own blocks and pin them (a node with a child held by a running request is not
        a leaf, so never evicted). A shifting request re-rotates its blocks in place, and a compressed one
        packs its kept tokens over its blocks (and what it keeps depends on its whole prompt, the
        question included): none of their blocks may be shared."""
        return (request.params.prompt_logprobs is not None or request.params.context_overflow == "shift"
                or request.compression is not None)

    def cache_blocks(self, request: Request) -> None:
        """Put the request's whole computed blocks (prompt and generated tokens alike) into the prefix
        tree as soon as they are computed, not only when it finishes: requests that share a prefix
        and arrive together then hit what the first one has already prefilled (vLLM does the same)."""
        kv = self.requests.get(request.request_id)
        if self.prefix_cache is None or kv is None or self.bypasses_prefix_cache(request):
            return
        ids = self._tree_ids(kv)
        n_full = min(request.num_computed_tokens // self.block_size, len(ids))
        if n_full > kv.num_blocks_in_tree:
            self.prefix_cache.insert(request.all_token_ids[: n_full * self.block_size], ids[:n_full])
            self._write_through(request, kv, kv.num_blocks_in_tree, n_full)
            kv.num_blocks_in_tree = n_full

    def _tree_ids(self, kv: RequestKV) -> list[BlockId]:
        """The request's blocks as the tree stores them: ids of the one group, or a tuple per block of
        every group's ids. Entries a sliding group has given back read as the null block; they were
        inserted before they left the window (a block is cached as soon as it is full), and the tree
        refuses to add an entry that names the null block."""
        if self.num_groups == 1:
            return kv.tables[0]
        return list(zip(*kv.tables))

    def free(self, request: Request) -> None:
        """Drop the request's references, last block first, so its tail is reused before its head.

        With a prefix cache, its computed blocks stay in the tree, the partial last one too, so a
        later request (or the next turn of a chat) finds them."""
        kv = self.requests.pop(request.request_id, None)
        if kv is None:
            return
        if self.prefix_cache is not None:
            ids = self._tree_ids(kv)
            n = min(request.num_computed_tokens, len(ids) * self.block_size)
            if n and not self.bypasses_prefix_cache(request):
                self.prefix_cache.insert(request.all_token_ids[:n], ids[: cdiv(n, self.block_size)])
            if kv.prefix_node is not None:
                self.prefix_cache.unlock(kv.prefix_node)
        for table, dropped in zip(reversed(kv.tables), reversed(kv.num_dropped)):
            self.pool.decref(list(reversed(table[dropped:])))

    # ------------------------------------------------------------------ swap preemption
    def swap_out(self, request: Request) -> bool:
        """Copy the request's blocks to the CPU pool and free them; False (nothing done) when the CPU
        pool (``swap_space`` bytes) cannot take them."""
        kv = self.requests.get(request.request_id)
        if kv is None or self.storage is None:
            return False
        ids = [b for t, d in zip(kv.tables, kv.num_dropped) for b in t[d:]]
        nbytes = len(ids) * self.storage.spec.block_bytes(self.block_size)
        if self.swap_bytes_used + nbytes > self.swap_space:
            return False
        # per group: (leading null entries, live blocks)
        layout = [(d, len(t) - d) for t, d in zip(kv.tables, kv.num_dropped)]
        self._swapped[request.request_id] = (self.storage.copy_out(ids), layout, kv.position_shift, kv.rope_at_text)
        self.swap_bytes_used += nbytes
        self.num_swapped_blocks += len(ids)
        self.num_swapped_out_blocks += len(ids)
        self.free(request)
        return True

    def swap_in(self, request: Request) -> bool:
        """Bring a swapped-out request's blocks back (evicting from the prefix tree if need be, like
        any allocation); False when the pool cannot hold them yet."""
        data, layout, shift, rope = self._swapped[request.request_id]
        new = self._take(sum(live for _, live in layout))
        if new is None:
            return False
        self.storage.copy_in(new, data)
        self.num_swapped_in_blocks += len(new)
        kv = self._kv(request.request_id)
        kv.tables, at = [], 0
        for dropped, live in layout:
            kv.tables.append([NULL_BLOCK] * dropped + new[at : at + live])
            at += live
        kv.num_dropped = [dropped for dropped, _ in layout]
        kv.position_shift, kv.rope_at_text = shift, rope
        self.drop_swap(request)
        return True

    def swapped_blocks(self) -> dict[str, int]:
        """Request id -> how many of its blocks the CPU swap pool holds."""
        return {rid: sum(live for _, live in entry[1]) for rid, entry in self._swapped.items()}

    def is_swapped(self, request: Request) -> bool:
        return request.request_id in self._swapped

    def drop_swap(self, request: Request) -> None:
        """Forget a request's CPU copy (it came back, or finished while swapped out)."""
        entry = self._swapped.pop(request.request_id, None)
        if entry is not None:
            n = sum(live for _, live in entry[1])
            self.swap_bytes_used -= n * self.storage.spec.block_bytes(self.block_size)
            self.num_swapped_blocks -= n

    # ------------------------------------------------------------------ inspection
    def check_integrity(self) -> None:
        """Every block's ref count equals its holders (the tree, live requests); free + held == total."""
        holders = [0] * self.pool.num_blocks
        tree_blocks = self.prefix_cache.block_ids() if self.prefix_cache is not None else []
        for b in tree_blocks:
            holders[b] += 1
        for kv in self.requests.values():
            for table, dropped in zip(kv.tables, kv.num_dropped):
                assert all(b == NULL_BLOCK for b in table[:dropped]), "a dropped entry still names a block"
                for b in table[dropped:]:
                    holders[b] += 1
        assert holders == self.pool.ref_cnt, "block ref counts differ from their holders"
        held = sum(1 for h in holders[1:] if h)
        assert self.pool.num_free + held == self.pool.num_usable
        self.pool.check_integrity()
        if self.prefix_cache is not None:
            self.prefix_cache.check_integrity()
            locks = sum(1 for kv in self.requests.values() if kv.prefix_node is not None)
            assert self.prefix_cache.root.lock_ref == 1 + locks, "tree locks differ from the requests holding them"

    def usage(self) -> CacheUsage:
        """free + cached + used == total. "cached" blocks are held by the prefix tree alone: they keep
        K/V for later hits but are evicted on demand, so (as in vLLM) they do not count as used."""
        p = self.pool
        cached = 0
        if self.prefix_cache is not None:
            cached = sum(1 for b in self.prefix_cache.block_ids() if p.ref_cnt[b] == 1)
        used = p.num_used - cached
        return CacheUsage(p.num_usable, p.num_free, used, used / p.num_usable, p.num_usable * self.block_size, cached)
