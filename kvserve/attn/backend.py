"""The attention backend interface, and the backend that every device can run (PyTorch SDPA).

A backend does two things (mini-sglang's ``BaseAttnBackend``, vLLM's attention backends):

    prepare(seqs)                 once per step: slots to write, cached keys to read, masks  -> AttnMetadata per KV group
    forward(q, k, v, layer, meta) once per layer: write this step's K/V into the cache, attend over the cache

so the model runner only says which tokens run where, and the model only calls ``forward``. Prefill,
chunked prefill and decode are the same call; they differ in the metadata.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kvserve.attn.metadata import AttnGroup, AttnMetadata, SeqSpan
from kvserve.kv.block_pool import NULL_BLOCK
from kvserve.kv.storage import KVCache


class AttentionBackend:
    """Interface. ``kv`` is the cache the backend reads and writes; the model never touches it."""

    name = "base"

    def __init__(self, kv: KVCache):
        self.kv = kv
        self.group_of = [g for g, _ in kv.spec.group_of()]  # layer -> its KV cache group
        # set by the model runner for one step: (rows of the batch, buffer [layers, W, Hq, D], offset):
        # the queries KV compression scores with (kv.compress), kept as every layer computes them
        self.capture: list[tuple[slice, torch.Tensor, int]] = []

    def keep_queries(self, q: torch.Tensor, layer: int) -> None:
        for rows, buf, at in self.capture:
            buf[layer, at : at + rows.stop - rows.start] = q[rows]

    def prepare(self, seqs: list[SeqSpan]) -> list[AttnMetadata]:
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                meta: list[AttnMetadata]) -> torch.Tensor:
        raise NotImplementedError


def _adjacent(blocks: np.ndarray) -> bool:
    return len(blocks) == 1 or bool(np.all(np.diff(blocks) == 1))


# What one more attention group costs, in padded key slots: each group is a gather, a mask and an
# SDPA call in every layer (~0.1 ms each), about the cost of reading this many more keys per layer.
GROUP_COST_SLOTS = 256


def group_decodes(lens: list[int], block_size: int, group_cost: int = GROUP_COST_SLOTS) -> list[list[int]]:
    """Split the step's decodes into attention groups of similar length.

    One group pads every request to the longest context: a 2,000-token request in a batch of 100-token
    ones makes each of them read 2,000 keys. Sorted by length, the cheapest split into runs (each run
    pays its longest member's width for every member, plus ``group_cost``) is a small dynamic program.
    Returns lists of indices into ``lens``.
    """
    order = sorted(range(len(lens)), key=lambda i: lens[i])
    # reads cover whole blocks, except a request's only block (the contiguous cache) reads just its length
    width = [lens[i] if lens[i] <= block_size else -(-lens[i] // block_size) * block_size for i in order]
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest split of the j shortest
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # last run = order[i:j], padded to width[j - 1]
            cost = best[i] + (j - i) * width[j - 1] + group_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs, j = [], n
    while j > 0:
        runs.append(sorted(order[cut[j] : j]))  # batch order inside a run: one run alone is the identity
        j = cut[j]
    return runs[::-1]


class SDPABackend(AttentionBackend):
    """Reads the cache as a view (a request whose blocks sit side by side: always for the contiguous
    cache) or a gather of whole blocks by block table, then runs ``F.scaled_dot_product_attention``.

    A prompt chunk is one SDPA call (causal, or an explicit mask when it follows cached tokens). The
    step's single-token decodes share calls: grouped by length (``group_decodes``), since each call
    pads its members to the longest."""

    name = "sdpa"
    split_decodes = True  # padding makes a short decode beside a long one pay the long one's length
    view_lone_decode = True  # a lone decode whose blocks sit side by side reads a view, no gather

    # ------------------------------------------------------------------ prepare
    def prepare(self, seqs: list[SeqSpan]) -> list[AttnMetadata]:
        return [self._prepare_group(seqs, g) for g in range(len(self.kv.spec.groups))]

    def _prepare_group(self, seqs: list[SeqSpan], group: int) -> AttnMetadata:
        block_size, device = self.kv.block_size, self.kv.device
        window = self.kv.spec.groups[group].spec.window  # None: full attention
        as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long).to(device)  # noqa: E731
        as_mask = lambda a: torch.as_tensor(a).to(device)  # noqa: E731
        slots, groups = [], []
        decode_rows, decode_lens, decode_blocks = [], [], []
        t = 0
        decode_first = []
        for s in seqs:
            c, n, L = s.start, s.num_new, s.end
            blocks = s.block_tables[group][: -(-L // block_size)]
            p = np.arange(c, L)
            slots.append(blocks[p // block_size] * block_size + p % block_size)
            # a sliding group reads from its first live block: the null entries before it (given back
            # as they left the window) hold nothing to see
            first = int(np.argmax(blocks != NULL_BLOCK)) if window is not None else 0
            if n == 1:  # decodes are batched into groups below
                decode_rows.append(t)
                decode_lens.append(L)
                decode_blocks.append(blocks)
                decode_first.append(first * block_size)
            else:
                live = blocks[first:]
                if _adjacent(live):
                    start = live[0] * block_size
                    read, width = slice(start, start + L - first * block_size), L - first * block_size
                else:
                    width = len(live) * block_size
                    read = (as_tensor(live[None, :]), width)
                mask = None
                if c > 0 or (window is not None and n > window):
                    # query i (position c+i) sees keys 0..c+i, or under a window c+i-W+1..c+i
                    keys = first * block_size + np.arange(width)[None, :]
                    visible = keys <= p[:, None]
                    if window is not None:
                        visible &= keys > p[:, None] - window
                    mask = as_mask(visible).view(1, 1, n, width)
                # else plain causal (top-left aligned), which also hides any padding keys past L
                groups.append(AttnGroup(slice(t, t + n), 1, n, read, mask, is_causal=mask is None))
            t += n
        if decode_rows:
            runs = group_decodes(decode_lens, block_size) if self.split_decodes else [list(range(len(decode_rows)))]
            for members in runs:
                groups.insert(0, self._decode_group(
                    [decode_rows[i] for i in members], [decode_lens[i] for i in members],
                    [decode_blocks[i] for i in members], as_tensor, as_mask, window,
                    [decode_first[i] for i in members]))
        return AttnMetadata(as_tensor(np.concatenate(slots)), groups)

    def _decode_group(self, rows: list[int], lens: list[int], blocks: list[np.ndarray], as_tensor, as_mask,
                      window: int | None = None, first: list[int] | None = None) -> AttnGroup:
        """Single-token decodes of several requests as one [B, 1] attention over their block tables
        (under a sliding window, each sees its last ``window`` keys, none before ``first``: its first
        live block's position)."""
        block_size = self.kv.block_size
        B = len(rows)
        # decodes are scheduled first, so their rows are usually consecutive: a slice is a view, not a gather
        consecutive = rows == list(range(rows[0], rows[0] + B))
        q_rows = slice(rows[0], rows[0] + B) if consecutive else as_tensor(rows)
        begins = np.maximum(np.asarray(lens) - window, first) if window is not None else np.zeros(B, dtype=np.int64)
        if B == 1 and self.view_lone_decode and _adjacent(blocks[0]):  # a view of the cache, no gather
            start = blocks[0][0] * block_size
            return AttnGroup(q_rows, 1, 1, slice(start + int(begins[0]), start + lens[0]))
        n_max = max(len(b) for b in blocks)
        table = np.full((B, n_max), NULL_BLOCK, dtype=np.int64)  # padding reads the null block
        for i, b in enumerate(blocks):
            table[i, : len(b)] = b
        lens_a = np.asarray(lens)
        # one block per request (the contiguous cache): read only up to the longest length
        width = int(lens_a.max()) if n_max == 1 else n_max * block_size
        keys = np.arange(width)[None, :]
        mask = as_mask((keys < lens_a[:, None]) & (keys >= begins[:, None])).view(B, 1, 1, width)
        return AttnGroup(q_rows, B, 1, (as_tensor(table), width), mask, lens=as_tensor(lens_a),
                         begins=as_tensor(begins) if window is not None else None)

    # ------------------------------------------------------------------ forward
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                meta: list[AttnMetadata]) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
        m = meta[self.group_of[layer]]
        if self.capture:
            self.keep_queries(q, layer)
        self.kv.write(layer, k, v, m.slot_mapping)
        out = None if len(m.groups) == 1 else torch.empty_like(q)
        for g in m.groups:
            o = self._decode(q, layer, g) if g.q_len == 1 else self._prefill(q, layer, g)
            o = o.reshape(g.batch * g.q_len, q.shape[1], q.shape[2])
            if out is None:
                return o
            out[g.q_rows] = o
        return out

    def _decode(self, q: torch.Tensor, layer: int, g: AttnGroup) -> torch.Tensor:
        """Single-token decodes of the group -> [B, Hkv, Hq/Hkv, D].

        Under GQA the Hq/Hkv query heads that share a KV head become that head's "query rows": plain
        attention, with no K/V repeated across query heads."""
        qg = self._group_queries(q, g)
        kc, vc = self._read(layer, g)
        return F.scaled_dot_product_attention(qg, kc, vc, attn_mask=g.mask)

    def _group_queries(self, q: torch.Tensor, g: AttnGroup) -> torch.Tensor:
        n_kv = self.kv.spec.num_kv_heads
        return q[g.q_rows].view(g.batch, n_kv, q.shape[1] // n_kv, q.shape[2])

    def _prefill(self, q: torch.Tensor, layer: int, g: AttnGroup) -> torch.Tensor:
        """A prompt chunk of Q tokens after the cached ones -> [B, Q, Hq, D]."""
        kc, vc = self._read(layer, g)
        qg = q[g.q_rows].view(g.batch, g.q_len, q.shape[1], q.shape[2]).transpose(1, 2)  # [B, Hq, Q, D]
        o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=g.mask, is_causal=g.is_causal, enable_gqa=True)
        return o.transpose(1, 2)

    def _read(self, layer: int, g: AttnGroup) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's keys and values as [B, Hkv, L, D]: a view of the cache, or a gathered copy."""
        kc, vc = self.kv.read(layer, g.kv_read)  # [B, L, Hkv, D] or [L, Hkv, D]
        shape = (g.batch, -1, self.kv.spec.num_kv_heads, self.kv.spec.head_dim)
        return kc.view(shape).transpose(1, 2), vc.view(shape).transpose(1, 2)
