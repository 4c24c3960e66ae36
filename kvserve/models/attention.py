"""The only attention op: write this step's K/V into the cache, then attend over the cache.

Prefill, chunked prefill, decode, contiguous and paged layouts all come through here; they differ
only in the ForwardBatch metadata (slots to write, slots to read, masks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.engine.batch import AttnGroup, ForwardBatch
from kvserve.kv.storage import KVCache
from kvserve.models import cpu_kernels


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
    for g in batch.groups:
        o = _decode(q, kv, layer, g) if g.q_len == 1 else _prefill(q, kv, layer, g)
        o = o.reshape(g.batch * g.q_len, q.shape[1], q.shape[2])
        if out is None:
            return o
        out[g.q_rows] = o
    return out


def _decode(q: torch.Tensor, kv: KVCache, layer: int, g: AttnGroup) -> torch.Tensor:
    """Single-token decodes of the group -> [B, Hkv, Hq/Hkv, D].

    Under GQA the Hq/Hkv query heads that share a KV head become that head's "query rows": plain
    attention, with no K/V repeated across query heads."""
    n_kv = kv.spec.num_kv_heads
    qg = q[g.q_rows].view(g.batch, n_kv, q.shape[1] // n_kv, q.shape[2])
    if g.lens is not None and decodes_in_place(kv, q.shape[1] // n_kv):
        # through the block table in place: each cached byte read once, no gathered copy
        return cpu_kernels.paged_decode(qg, *kv.blocks(layer), g.kv_read[0], g.lens)
    kc, vc = _read(kv, layer, g)
    return F.scaled_dot_product_attention(qg, kc, vc, attn_mask=g.mask)


def decodes_in_place(kv: KVCache, group: int) -> bool:
    """Whether decode attention reads the pool through block tables in place (the CPU kernel), for
    ``group`` query heads per KV head. Then a decode costs its own length whatever its neighbours'."""
    return kv.device.type == "cpu" and cpu_kernels.supports(kv.spec.head_dim, group)


def _prefill(q: torch.Tensor, kv: KVCache, layer: int, g: AttnGroup) -> torch.Tensor:
    """A prompt chunk of Q tokens after the cached ones -> [B, Q, Hq, D]."""
    kc, vc = _read(kv, layer, g)
    qg = q[g.q_rows].view(g.batch, g.q_len, q.shape[1], q.shape[2]).transpose(1, 2)  # [B, Hq, Q, D]
    o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=g.mask, is_causal=g.is_causal, enable_gqa=True)
    return o.transpose(1, 2)


def _read(kv: KVCache, layer: int, g: AttnGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's keys and values as [B, Hkv, L, D]: a view of the cache, or a gathered copy."""
    kc, vc = kv.read(layer, g.kv_read)  # [B, L, Hkv, D] or [L, Hkv, D]
    shape = (g.batch, -1, kv.spec.num_kv_heads, kv.spec.head_dim)
    return kc.view(shape).transpose(1, 2), vc.view(shape).transpose(1, 2)
