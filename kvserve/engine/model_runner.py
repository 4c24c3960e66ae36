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
from kvserve.models.decoder import Decoder


def _adjacent(blocks: np.ndarray) -> bool:
    return len(blocks) == 1 or bool(np.all(np.diff(blocks) == 1))


def build_forward_batch(out: SchedulerOutput, kv: KVCache) -> ForwardBatch:
    """Flatten the scheduled requests into one batch and describe each attention group.

    Reads of the cache come in two shapes: a slice of slots when a request's blocks sit side by side
    (always for the contiguous cache: a view, no copy), else a gather of whole blocks by block table.
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
        B = len(decode_rows)
        rows = slice(decode_rows[0], decode_rows[0] + 1) if B == 1 else as_tensor(decode_rows)
        if B == 1 and _adjacent(decode_blocks[0]):
            start = decode_blocks[0][0] * block_size
            groups.insert(0, AttnGroup(rows, 1, 1, slice(start, start + decode_lens[0])))
        else:
            n_max = max(len(b) for b in decode_blocks)
            table = np.full((B, n_max), NULL_BLOCK, dtype=np.int64)  # padding reads the null block
            for i, b in enumerate(decode_blocks):
                table[i, : len(b)] = b
            lens = np.asarray(decode_lens)
            # one block per request (the contiguous cache): read only up to the longest length
            width = int(lens.max()) if n_max == 1 else n_max * block_size
            mask = as_mask(np.arange(width)[None, :] < lens[:, None]).view(B, 1, 1, width)
            groups.insert(0, AttnGroup(rows, B, 1, (as_tensor(table), width), mask))
    return ForwardBatch(
        input_ids=as_tensor(np.concatenate(ids)),
        positions=as_tensor(np.concatenate(pos)),
        slot_mapping=as_tensor(np.concatenate(slots)),
        groups=groups,
        logits_idx=as_tensor(logits_idx),
    )


class ModelRunner:
    def __init__(self, model: Decoder, kv_cache: KVCache, sampler: Sampler):
        self.model, self.kv_cache, self.sampler = model, kv_cache, sampler

    def execute(self, out: SchedulerOutput) -> list[tuple[int, dict[int, float] | None]]:
        """Run one step; a (token, logprobs) for each scheduled request that samples, in order."""
        batch = build_forward_batch(out, self.kv_cache)
        hidden = self.model.forward(batch, self.kv_cache)
        sampling = [s.request for s in out.scheduled if s.samples]
        if not sampling:
            return []
        logits = self.model.compute_logits(hidden)
        return self.sampler(logits, sampling)
