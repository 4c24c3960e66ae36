"""The only attention op: write this step's K/V into the cache, then attend over the cache.

Prefill, chunked prefill, decode, contiguous and paged layouts all come through here; they differ
only in the ForwardBatch metadata (slots to write, slots to read, masks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.engine.batch import ForwardBatch
from kvserve.kv.storage import KVCache


def attention(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    kv: KVCache,
    layer: int,
    batch: ForwardBatch,
) -> torch.Tensor:  # [T, Hq, D]
    kv.write(layer, k, v, batch.slot_mapping)
    out = None if len(batch.groups) == 1 else torch.empty_like(q)
    n_heads, head_dim = q.shape[1], q.shape[2]
    n_kv = k.shape[1]
    for g in batch.groups:
        kc, vc = kv.read(layer, g.kv_read)  # [B, L, Hkv, D] or [L, Hkv, D]
        kc = kc.view(g.batch, -1, n_kv, head_dim).transpose(1, 2)  # [B, Hkv, L, D]
        vc = vc.view(g.batch, -1, n_kv, head_dim).transpose(1, 2)
        if g.q_len == 1:
            # Decode under GQA: the Hq/Hkv query heads that share a KV head become that head's "query
            # rows", [B, Hkv, Hq/Hkv, D]: plain attention, with no K/V repeated across query heads.
            qg = q[g.q_rows].view(g.batch, n_kv, n_heads // n_kv, head_dim)
            o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=g.mask)
        else:  # [B*Q, Hq, D] -> [B, Hq, Q, D]
            qg = q[g.q_rows].view(g.batch, g.q_len, n_heads, head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=g.mask, is_causal=g.is_causal, enable_gqa=True)
            o = o.transpose(1, 2)
        o = o.reshape(g.batch * g.q_len, n_heads, head_dim)
        if out is None:
            return o
        out[g.q_rows] = o
    return out
