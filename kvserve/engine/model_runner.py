"""SchedulerOutput -> ForwardBatch -> model -> sampled tokens.

Index arithmetic runs in numpy on the CPU (cheap, no per-element Python), and the finished index
tensors move to the model's device once per step, shared by all layers.
"""
from __future__ import annotations

import numpy as np
import torch

from kvserve.engine.batch import AttnGroup, ForwardBatch, SchedulerOutput
from kvserve.engine.sampler import Sampler
from kvserve.kv.block_pool import NULL_BLOCK
from kvserve.kv.storage import KVCache
from kvserve.models.attention import decodes_in_place
from kvserve.models.decoder import Decoder


def _adjacent(blocks: np.ndarray) -> bool:
    return len(blocks) == 1 or bool(np.all(np.diff(blocks) == 1))


def build_forward_batch(out: SchedulerOutput, kv: KVCache, split_decodes: bool = True) -> ForwardBatch:
    """Flatten the scheduled requests into one batch and describe each attention group.

    Reads of the cache come in two shapes: a slice of slots when a request's blocks sit side by side
    (always for the contiguous cache: a view, no copy), else a gather of whole blocks by block table.
    ``split_decodes``: group the decodes by length (``group_decodes``), for attention that pads every
    request to its group's longest; False when it reads each request's own length in place.
    """
    block_size, device = kv.block_size, kv.device
    ids, pos, slots, logits_idx = [], [], [], []
    groups: list[AttnGroup] = []
    decode_rows, decode_lens, decode_blocks = [], [], []
    t = 0
    as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long).to(device)  # noqa: E731
    as_mask = lambda a: torch.as_tensor(a).to(device)  # noqa: E731
    for s in out.scheduled:
        r = s.request
        c, n = r.num_computed_tokens, s.num_new_tokens
        L = c + n
        blocks = np.asarray(r.block_ids[: -(-L // block_size)], dtype=np.int64)
        kv.prepare(blocks)
        p = np.arange(c, L)
        ids.append(np.asarray(r.all_token_ids[c:L], dtype=np.int64))
        pos.append(p)
        slots.append(blocks[p // block_size] * block_size + p % block_size)
        if n == 1:  # decodes are batched into one group below
            decode_rows.append(t)
            decode_lens.append(L)
            decode_blocks.append(blocks)
        else:
            if _adjacent(blocks):
                read, width = slice(blocks[0] * block_size, blocks[0] * block_size + L), L
            else:
                width = len(blocks) * block_size
                read = (as_tensor(blocks[None, :]), width)
            mask = None
            if c > 0:  # a chunk after cached tokens: query i (position c+i) sees keys 0..c+i
                mask = as_mask(np.arange(width)[None, :] <= p[:, None]).view(1, 1, n, width)
            # c == 0: plain causal (top-left aligned), which also hides any padding keys past L
            groups.append(AttnGroup(slice(t, t + n), 1, n, read, mask, is_causal=c == 0))
        if s.samples:
            logits_idx.append(t + n - 1)
        t += n
    if decode_rows:
        runs = group_decodes(decode_lens, block_size) if split_decodes else [list(range(len(decode_rows)))]
        for members in runs:
            groups.insert(0, _decode_group(
                [decode_rows[i] for i in members], [decode_lens[i] for i in members],
                [decode_blocks[i] for i in members], block_size, as_tensor, as_mask))
    return ForwardBatch(
        input_ids=as_tensor(np.concatenate(ids)),
        positions=as_tensor(np.concatenate(pos)),
        slot_mapping=as_tensor(np.concatenate(slots)),
        groups=groups,
        logits_idx=as_tensor(logits_idx),
    )


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


def _decode_group(rows: list[int], lens: list[int], blocks: list[np.ndarray], block_size: int,
                  as_tensor, as_mask) -> AttnGroup:
    """Single-token decodes of several requests as one [B, 1] attention over their block tables."""
    B = len(rows)
    # decodes are scheduled first, so their rows are usually consecutive: a slice is a view, not a gather
    consecutive = rows == list(range(rows[0], rows[0] + B))
    q_rows = slice(rows[0], rows[0] + B) if consecutive else as_tensor(rows)
    if B == 1 and _adjacent(blocks[0]):  # a view of the cache, no gather
        start = blocks[0][0] * block_size
        return AttnGroup(q_rows, 1, 1, slice(start, start + lens[0]))
    n_max = max(len(b) for b in blocks)
    table = np.full((B, n_max), NULL_BLOCK, dtype=np.int64)  # padding reads the null block
    for i, b in enumerate(blocks):
        table[i, : len(b)] = b
    lens_a = np.asarray(lens)
    # one block per request (the contiguous cache): read only up to the longest length
    width = int(lens_a.max()) if n_max == 1 else n_max * block_size
    mask = as_mask(np.arange(width)[None, :] < lens_a[:, None]).view(B, 1, 1, width)
    return AttnGroup(q_rows, B, 1, (as_tensor(table), width), mask, lens=as_tensor(lens_a))


class ModelRunner:
    def __init__(self, model: Decoder, kv_cache: KVCache, sampler: Sampler):
        self.model, self.kv_cache, self.sampler = model, kv_cache, sampler
        cfg = model.cfg
        self.split_decodes = not decodes_in_place(kv_cache, cfg.num_heads // cfg.num_kv_heads)

    def execute(self, out: SchedulerOutput) -> list[tuple[int, dict[int, float] | None]]:
        """Run one step; a (token, logprobs) for each scheduled request that samples, in order."""
        batch = build_forward_batch(out, self.kv_cache, self.split_decodes)
        hidden = self.model.forward(batch, self.kv_cache)
        sampling = [s.request for s in out.scheduled if s.samples]
        if not sampling:
            return []
        logits = self.model.compute_logits(hidden)
        return self.sampler(logits, sampling)
