"""Radix-tree prefix cache (SGLang's RadixAttention, over blocks of the one pool).

Keys are token ids cut into whole blocks; each node holds a run of blocks and the block ids that
hold their K/V. A new request walks down the tree and reuses the longest cached prefix.

A finished request also leaves its last, partial block, as a leaf of fewer than ``block_size``
tokens. Below the whole blocks a match is token-granular (as in SGLang): the child block that shares
the most leading tokens with the rest of the request is its *tail*, which the request copies into a
block of its own before writing after those tokens (copy-on-write), so a repeated prompt of any
length computes one token.

    root
     └─ [sys prompt: 4 blocks]                 lock 2   (two running requests use it)
          ├─ [question A + answer: 2 blocks]    lock 0   <- evictable leaf
          └─ [question B: 1 block]              lock 1

The tree holds one reference on each of its blocks (from the same BlockPool the requests use), so
a block is free only when neither the tree nor any request holds it. When the pool runs short,
unlocked leaves are evicted least recently used first; their parents may become evictable leaves.

A model with several KV cache groups (Gemma 3: sliding-window and full layers) has one block per group
for each block of tokens: the tree then stores a tuple of ids, one per group, for each block, and a
hit gives every group its blocks. The tree keeps a sliding group's blocks even after they left a
running request's window (the request gave its reference back, the tree's stays): so any cached prefix
is a valid hit for every group, and those blocks count as cached (evictable), not used.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Callable

from kvserve.kv.block_pool import NULL_BLOCK, BlockPool

Block = tuple[int, ...]  # the block_size token ids of one block (fewer in a partial leaf)
BlockId = int | tuple[int, ...]  # the pool block holding one Block: one id, or one per KV cache group


def flat(ids: list[BlockId]) -> list[int]:
    """Pool block ids of tree entries (a tuple entry is one block per KV cache group)."""
    return [b for x in ids for b in (x if isinstance(x, tuple) else (x,))]


def _common_prefix(block: Block, tokens: list[int]) -> int:
    n = 0
    for a, b in zip(block, tokens):
        if a != b:
            break
        n += 1
    return n


@dataclass(eq=False)
class Node:
    blocks: list[Block] = field(default_factory=list)  # token ids, one tuple per block
    block_ids: list[BlockId] = field(default_factory=list)
    parent: "Node | None" = None
    children: dict[Block, "Node"] = field(default_factory=dict)  # keyed by the child's first block
    lock_ref: int = 0
    last_access: int = 0

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)


class MatchResult:
    """Whole blocks matched (down to ``node``), and the best tail below them: a block whose first
    ``tail_tokens`` tokens continue the match (0 when none)."""

    __slots__ = ("block_ids", "node", "tail_block", "tail_tokens")

    def __init__(self, block_ids: list[BlockId], node: Node, tail_block: BlockId | None = None, tail_tokens: int = 0):
        self.block_ids, self.node = block_ids, node
        self.tail_block, self.tail_tokens = tail_block, tail_tokens


class RadixPrefixCache:
    def __init__(self, pool: BlockPool, block_size: int):
        self.pool, self.block_size = pool, block_size
        self.root = Node()
        self.root.lock_ref = 1  # never evicted
        self._clock = itertools.count(1)  # logical time: exact, testable LRU order
        self.num_blocks = 0  # blocks held by the tree
        self.evicted_blocks = 0
        self.on_evict: Callable[[Node], None] | None = None  # KV tiers: write an evicted leaf down first

    # ------------------------------------------------------------------ helpers
    def _split_tokens(self, token_ids: list[int]) -> list[Block]:
        bs = self.block_size
        n = len(token_ids) // bs
        return [tuple(token_ids[i * bs : (i + 1) * bs]) for i in range(n)]

    def _split_node(self, node: Node, k: int) -> Node:
        """Cut ``node`` after its first k blocks; returns the new upper part (node becomes its child)."""
        upper = Node(node.blocks[:k], node.block_ids[:k], node.parent, {}, node.lock_ref, node.last_access)
        node.parent.children[node.blocks[0]] = upper
        node.blocks, node.block_ids, node.parent = node.blocks[k:], node.block_ids[k:], upper
        upper.children[node.blocks[0]] = node
        return upper

    # ------------------------------------------------------------------ match / insert
    def _descend(self, node: Node, blocks: list[Block], i: int, now: int) -> tuple[Node, int] | None:
        """Follow the child of ``node`` that starts with ``blocks[i]`` as far as it matches, splitting it
        where the match ends. Returns (that child, blocks matched), or None when no child starts so."""
        child = node.children.get(blocks[i])
        if child is None:
            return None
        k = 0
        while k < child.num_blocks and i + k < len(blocks) and child.blocks[k] == blocks[i + k]:
            k += 1
        if k < child.num_blocks:
            child = self._split_node(child, k)
        child.last_access = now
        return child, k

    def match_prefix(self, token_ids: list[int]) -> MatchResult:
        """Longest cached block-aligned prefix of ``token_ids``: its block ids and the deepest node
        (lock that node while the blocks are in use), then the best tail block below it. Touches the
        path (LRU); changes nothing else but where a node is split."""
        blocks = self._split_tokens(token_ids)
        node, ids, i = self.root, [], 0
        now = next(self._clock)
        while i < len(blocks) and (step := self._descend(node, blocks, i, now)) is not None:
            node, k = step
            ids += node.block_ids
            i += k
        rest = token_ids[len(ids) * self.block_size :]
        best, best_len = None, 0
        if rest:
            for child in node.children.values():
                n = _common_prefix(child.blocks[0], rest)
                if n > best_len:
                    best, best_len = child, n
        if best is None:
            return MatchResult(ids, node)
        best.last_access = now
        return MatchResult(ids, node, best.block_ids[0], best_len)

    def insert(self, token_ids: list[int], block_ids: list[BlockId]) -> int:
        """Cache the whole blocks of ``token_ids`` (held in ``block_ids``) and, when ``block_ids`` holds
        one more block for the tokens past the last whole one, that partial block as a leaf. Returns
        how many whole blocks were cached already: for those the caller's own copies are duplicates (it
        frees them as usual); the tree takes a reference on each block it adds."""
        blocks = self._split_tokens(token_ids)[: len(block_ids)]
        node, i = self.root, 0
        now = next(self._clock)
        cached = None
        while i < len(blocks):
            step = self._descend(node, blocks, i, now)
            if step is None:
                cached = i
                if NULL_BLOCK in flat(block_ids[i : len(blocks)]):
                    # a sliding group gave these back (and the tree has since evicted its copies): a
                    # path cannot continue past a hole
                    return cached
                node = self._add_child(node, blocks[i:], block_ids[i : len(blocks)], now)
                break
            node, k = step
            i += k
        n_full = len(blocks)
        partial = tuple(token_ids[n_full * self.block_size :])
        if (partial and len(block_ids) > n_full and len(partial) < self.block_size and partial not in node.children
                and NULL_BLOCK not in flat(block_ids[n_full : n_full + 1])):
            self._add_child(node, [partial], [block_ids[n_full]], now)
        return n_full if cached is None else cached

    def _add_child(self, node: Node, blocks: list[Block], block_ids: list[BlockId], now: int) -> Node:
        new = Node(list(blocks), list(block_ids), node, {}, 0, now)
        node.children[blocks[0]] = new
        self.pool.incref(flat(new.block_ids))
        self.num_blocks += new.num_blocks
        return new

    # ------------------------------------------------------------------ locks
    def lock(self, node: Node) -> None:
        """A running request uses the path root..node: none of it may be evicted."""
        while node is not None:
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not None:
            node.lock_ref -= 1
            assert node.lock_ref >= 0
            node = node.parent

    # ------------------------------------------------------------------ eviction
    def path_tokens(self, node: Node) -> list[int]:
        """The token ids from the root down to the end of ``node``."""
        blocks = []
        while node is not self.root:
            blocks = node.blocks + blocks
            node = node.parent
        return [t for b in blocks for t in b]

    def _nodes(self):
        stack = [self.root]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def evictable_blocks(self) -> int:
        return sum(n.num_blocks for n in self._nodes() if n.lock_ref == 0)

    def evict(self, num_blocks: int) -> int:
        """Free at least ``num_blocks`` blocks (if possible) by dropping unlocked leaves, least
        recently used first. Returns how many blocks the pool got back."""
        heap = [(n.last_access, id(n), n) for n in self._nodes() if self._evictable_leaf(n)]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_blocks:
            _, _, leaf = heapq.heappop(heap)
            before = self.pool.num_free
            if self.on_evict is not None:
                self.on_evict(leaf)
            self.pool.decref(flat(leaf.block_ids))
            freed += self.pool.num_free - before
            self.num_blocks -= leaf.num_blocks
            self.evicted_blocks += leaf.num_blocks
            parent = leaf.parent
            del parent.children[leaf.blocks[0]]
            if parent is not self.root and self._evictable_leaf(parent):
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def _evictable_leaf(self, node: Node) -> bool:
        """An unlocked leaf whose blocks only the tree holds: dropping it gives memory back (a running
        request's freshly cached blocks are held by the request too, and stay)."""
        return (node is not self.root and not node.children and node.lock_ref == 0
                and all(self.pool.ref_cnt[b] == 1 for b in flat(node.block_ids)))

    # ------------------------------------------------------------------ inspection
    def check_integrity(self) -> None:
        """Tree bookkeeping is consistent and each of its blocks is held in the pool; a partial block
        is a leaf of one block."""
        count = 0
        for n in self._nodes():
            if n is self.root:
                continue
            assert n.num_blocks == len(n.blocks) > 0
            if len(n.blocks[-1]) < self.block_size:
                assert n.num_blocks == 1 and not n.children, "a partial block must be a leaf of its own"
            assert n.parent.children[n.blocks[0]] is n
            assert n.lock_ref >= sum(c.lock_ref for c in n.children.values())
            for b in flat(n.block_ids):
                assert self.pool.ref_cnt[b] >= 1, f"tree block {b} is free in the pool"
            count += n.num_blocks
        assert count == self.num_blocks

    def block_ids(self) -> list[int]:
        """Every pool block the tree holds (each group's, for a model with several)."""
        return [b for n in self._nodes() for b in flat(n.block_ids)]

    def dump(self, decode: Callable[[list[int]], str] | None = None, width: int = 40) -> str:
        """The tree, one node a line: tokens, blocks, lock count, last access, a text preview."""
        lines = [f"root ({self.num_blocks} blocks cached, {self.evictable_blocks()} evictable)"]

        def walk(node: Node, depth: int) -> None:
            for child in sorted(node.children.values(), key=lambda c: c.last_access):
                toks = [t for b in child.blocks for t in b]
                preview = ""
                if decode is not None:
                    text = decode(toks).replace("\n", "\\n")
                    preview = " " + repr(text if len(text) <= width else text[: width - 3] + "...")
                lines.append(f"{'  ' * depth}└─ {len(toks)} tokens / {child.num_blocks} blocks, "
                             f"lock={child.lock_ref}, last_access={child.last_access}{preview}")
                walk(child, depth + 1)

        walk(self.root, 1)
        return "\n".join(lines)
