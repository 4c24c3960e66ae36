"""SchedulerOutput -> ForwardBatch -> model -> logits.

The runner lays the step's tokens out flat (ids, positions, which rows sample) and hands each
request's span and block tables to the attention backend, which builds the rest (slots, reads,
masks). Index arithmetic runs in numpy on the CPU, and the finished index tensors move to the
model's device once per step, shared by all layers. Sampling is the engine's: it holds the requests.
"""
from __future__ import annotations

import numpy as np
import torch

from kvserve.attn import AttentionBackend, ForwardBatch, SeqSpan
from kvserve.engine.batch import SchedulerOutput
from kvserve.models.decoder import Decoder


class ModelRunner:
    def __init__(self, model: Decoder, attn: AttentionBackend):
        self.model, self.attn = model, attn

    def prepare(self, out: SchedulerOutput) -> ForwardBatch:
        """Flatten the scheduled requests into one batch."""
        device = self.attn.kv.device
        ids, pos, spans, logits_idx = [], [], [], []
        t = 0
        for s in out.seqs:
            n = s.num_new_tokens
            start = s.start - s.position_offset  # in the cache (sink_window drops tokens from the middle)
            ids.append(np.asarray(s.token_ids, dtype=np.int64))
            pos.append(np.arange(start, start + n))
            spans.append(SeqSpan(start, n, [np.asarray(b, dtype=np.int64) for b in s.block_tables]))
            if s.all_logits:
                logits_idx.extend(range(t, t + n))
            elif s.sample:
                logits_idx.append(t + n - 1)
            t += n
        as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long).to(device)  # noqa: E731
        return ForwardBatch(
            input_ids=as_tensor(np.concatenate(ids)),
            positions=as_tensor(np.concatenate(pos)),
            logits_idx=as_tensor(logits_idx),
            attn=self.attn.prepare(spans),
        )

    def execute(self, out: SchedulerOutput) -> torch.Tensor | None:
        """Run one step; the fp32 logits [R, vocab]: in step order, all rows of a sequence with
        ``all_logits``, else the last row of one that samples (None when no row has logits: every
        request ran a prompt chunk short of its end)."""
        for group, block_ids, delta in out.position_shifts:  # sink_window / context shift: kept keys move down
            self.model.shift_keys(self.attn.kv, block_ids, delta, self.attn.kv.spec.groups[group].layers)
        batch = self.prepare(out)
        hidden = self.model.forward(batch, self.attn)
        if not any(s.sample or s.all_logits for s in out.seqs):
            return None
        return self.model.compute_logits(hidden)
