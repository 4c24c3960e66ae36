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
from kvserve.engine.batch import ScheduledSeq, SchedulerOutput
from kvserve.kv import compress as kvc
from kvserve.models.decoder import Decoder


class ModelRunner:
    def __init__(self, model: Decoder, attn: AttentionBackend):
        self.model, self.attn = model, attn
        # KV compression: request -> the queries of its prompt's last window, [layers, W, Hq, D]
        self.window_queries: dict[str, torch.Tensor] = {}
        # h2o: request -> (budget, accumulated attention of its cached tokens [layers, Hkv, cache length])
        self.h2o: dict[str, tuple[int, torch.Tensor]] = {}

    def prepare(self, out: SchedulerOutput) -> ForwardBatch:
        """Flatten the scheduled requests into one batch."""
        device = self.attn.kv.device
        ids, pos, spans, logits_idx = [], [], [], []
        t = 0
        for s in out.seqs:
            n = s.num_new_tokens
            start = s.start - s.position_offset  # in the cache (sink_window, compression: tokens dropped)
            ids.append(np.asarray(s.token_ids, dtype=np.int64))
            rope = s.start if s.rope_at_text else start  # compressed keys keep their text positions' RoPE
            pos.append(np.arange(rope, rope + n))
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

    def execute(self, out: SchedulerOutput, logits: bool = True) -> torch.Tensor | None:
        """Run one step; the fp32 logits [R, vocab]: in step order, all rows of a sequence with
        ``all_logits``, else the last row of one that samples (None when no row has logits: every
        request ran a prompt chunk short of its end, or ``logits`` is False: a tensor-parallel worker,
        which runs the layers but leaves the LM head and sampling to rank 0)."""
        for group, block_ids, delta in out.position_shifts:  # sink_window / context shift: kept keys move down
            self.model.shift_keys(self.attn.kv, block_ids, delta, self.attn.kv.spec.groups[group].layers)
        batch = self.prepare(out)
        self.attn.capture = self._captures(out)
        try:
            hidden = self.model.forward(batch, self.attn)
        finally:
            self.attn.capture = []
        if not logits or not any(s.sample or s.all_logits for s in out.seqs):
            return None
        return self.model.compute_logits(hidden)

    # ------------------------------------------------------------------ KV compression (kv.compress)
    def _captures(self, out: SchedulerOutput) -> list[tuple[slice, torch.Tensor, int]]:
        """Where this step's rows inside a compressing request's query window go (see ``attn.capture``)."""
        caps, t = [], 0
        cfg = self.model.cfg
        for s in out.seqs:
            if s.capture is not None:
                first, size = s.capture
                buf = self.window_queries.get(s.request_id)
                if buf is None or buf.shape[1] != size:
                    buf = self.window_queries[s.request_id] = torch.empty(
                        cfg.num_layers, size, cfg.num_heads, cfg.head_dim, dtype=self.model.dtype, device=self.attn.kv.device)
                lo = max(s.start, first)
                caps.append((slice(t + lo - s.start, t + s.num_new_tokens), buf, lo - first))
            t += s.num_new_tokens
        return caps

    def _layer_keys(self, table: list[int], length: int):
        """Each layer's cached keys of one request's first ``length`` tokens, [Hkv, length, D] (a
        quantized cache dequantized), one layer at a time."""
        kv = self.attn.kv
        read = (torch.as_tensor([table], dtype=torch.long, device=kv.device), length)
        for layer in range(self.model.cfg.num_layers):
            yield kv.read(layer, read, values=False)[0][0].transpose(0, 1)

    def drop_queries(self, request_id: str) -> None:
        """A request finished, was aborted or lost its KV (recompute): forget its queries and scores."""
        self.window_queries.pop(request_id, None)
        self.h2o.pop(request_id, None)

    @torch.inference_mode()
    def compress(self, s: ScheduledSeq) -> int:
        """Score the request's ``length`` cached tokens in every layer and pack each (layer, KV head)'s
        best ``n_kept`` into its first cache positions; returns how many it kept."""
        c, kv = s.compress, self.attn.kv
        length = s.start + s.num_new_tokens
        queries = self.window_queries.pop(s.request_id, None)
        n = kvc.n_kept(length, c.ratio)
        table = s.block_tables[0]
        keep, scores = [], []
        recent = c.recent(n) if c.method == "h2o" else 0
        for layer, keys in enumerate(self._layer_keys(table, length)):
            q = None if queries is None else queries[layer].transpose(0, 1)  # [Hq, W, D]
            scores.append(kvc.scores(c, keys, q))
            keep.append(kvc.select(scores[-1], n, recent))
        keep = torch.stack(keep)
        kvc.pack(kv, list(range(self.model.cfg.num_layers)), table, keep)
        if c.method == "h2o":  # the kept tokens' scores go on accumulating while it decodes
            self.h2o[s.request_id] = (n, torch.stack(scores).gather(2, keep))
        return n

    @torch.inference_mode()
    def observe(self, s: ScheduledSeq) -> int | None:
        """h2o, after a decode step: add the step's attention to each cached token's score; once the
        cache holds a block more than the budget, each (layer, head) keeps its budget (the recent
        window and the heaviest hitters) packed at the front. Returns the tokens kept when it evicted."""
        c, kv, L = s.observe, self.attn.kv, self.model.cfg.num_layers
        budget, acc = self.h2o[s.request_id]
        q = self.window_queries.pop(s.request_id)  # [layers, 1, Hq, D]
        length = s.start - s.position_offset + 1  # cached tokens, this step's included
        table = s.block_tables[0]
        step = [kvc.attention(keys, q[layer, 0]) for layer, keys in enumerate(self._layer_keys(table, length))]
        acc = torch.nn.functional.pad(acc, (0, 1)) + torch.stack(step)  # [layers, Hkv, length]
        if length < budget + kv.block_size:
            self.h2o[s.request_id] = (budget, acc)
            return None
        keep = torch.stack([kvc.select(acc[layer], budget, c.recent(budget)) for layer in range(L)])
        kvc.pack(kv, list(range(L)), table, keep)
        self.h2o[s.request_id] = (budget, acc.gather(2, keep))
        return budget
