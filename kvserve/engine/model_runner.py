"""SchedulerOutput -> ForwardBatch -> model -> sampled tokens.

Index arithmetic runs in numpy on the CPU (cheap, no per-element Python), and the finished index
tensors move to the model's device once per step, shared by all layers.
"""
from __future__ import annotations

import numpy as np
import torch

from kvserve.engine.batch import AttnGroup, ForwardBatch, SchedulerOutput
from kvserve.engine.sampler import Sampler
from kvserve.kv.storage import KVCache
from kvserve.models.decoder import Decoder


def _token_slots(block_ids: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    return block_ids[positions // block_size] * block_size + positions % block_size


def _read_slots(block_ids: np.ndarray, length: int, block_size: int) -> np.ndarray | slice:
    """Slots of tokens 0..length-1: a slice when the blocks sit side by side (always, for the
    contiguous cache), else an index array for a gather."""
    n = -(-length // block_size)
    b = block_ids[:n]
    if b[-1] - b[0] == n - 1 and (n == 1 or np.all(np.diff(b) == 1)):
        start = int(b[0]) * block_size
        return slice(start, start + length)
    return _token_slots(b, np.arange(length), block_size)


def build_forward_batch(out: SchedulerOutput, block_size: int, device: torch.device) -> ForwardBatch:
    ids, pos, slots, logits_idx = [], [], [], []
    groups: list[AttnGroup] = []
    decode_rows, decode_lens, decode_blocks = [], [], []
    t = 0
    as_tensor = lambda a: torch.as_tensor(a, dtype=torch.long).to(device)  # noqa: E731
    for s in out.scheduled:
        r = s.request
        c, n = r.num_computed_tokens, s.num_new_tokens
        L = c + n
        blocks = np.asarray(r.block_ids, dtype=np.int64)
        p = np.arange(c, L)
        ids.append(np.asarray(r.all_token_ids[c:L], dtype=np.int64))
        pos.append(p)
        slots.append(_token_slots(blocks, p, block_size))
        if n == 1:  # decodes are batched into one group below
            decode_rows.append(t)
            decode_lens.append(L)
            decode_blocks.append(blocks)
        else:
            read = _read_slots(blocks, L, block_size)
            mask = None
            if c > 0:  # a chunk after cached tokens: query i sees keys 0..c+i
                mask = as_tensor(np.arange(L)[None, :] <= p[:, None]).bool().view(1, 1, n, L)
            groups.append(AttnGroup(slice(t, t + n), 1, n, read if isinstance(read, slice) else as_tensor(read),
                                    mask, is_causal=c == 0))
        if s.samples:
            logits_idx.append(t + n - 1)
        t += n
    if decode_rows:
        B = len(decode_rows)
        rows = slice(decode_rows[0], decode_rows[0] + 1) if B == 1 else as_tensor(decode_rows)
        if B == 1 and isinstance(read := _read_slots(decode_blocks[0], decode_lens[0], block_size), slice):
            groups.insert(0, AttnGroup(rows, 1, 1, read))
        else:
            Lmax = max(decode_lens)
            table = np.zeros((B, Lmax), dtype=np.int64)  # padding reads the null block (slot 0)
            for i, (blocks, L) in enumerate(zip(decode_blocks, decode_lens)):
                table[i, :L] = _token_slots(blocks, np.arange(L), block_size)
            lens = np.asarray(decode_lens)
            mask = None
            if (lens != Lmax).any():
                mask = as_tensor(np.arange(Lmax)[None, :] < lens[:, None]).bool().view(B, 1, 1, Lmax)
            groups.insert(0, AttnGroup(rows, B, 1, as_tensor(table), mask))
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
        batch = build_forward_batch(out, self.kv_cache.block_size, self.model.device)
        hidden = self.model.forward(batch, self.kv_cache)
        sampling = [s.request for s in out.scheduled if s.samples]
        if not sampling:
            return []
        logits = self.model.compute_logits(hidden)
        return self.sampler(logits, sampling)
