"""Attention: the per-step metadata (``metadata``) and the backends that consume it.

``select_backend`` picks the backend for a cache: the C++ paged-decode kernel on CPU when it builds,
else PyTorch SDPA (CUDA, fallback)."""
from __future__ import annotations

from kvserve.attn.backend import AttentionBackend, SDPABackend
from kvserve.attn.metadata import AttnGroup, AttnMetadata, ForwardBatch, SeqSpan
from kvserve.kv.storage import KVCache


def select_backend(kv: KVCache, num_heads: int) -> AttentionBackend:
    from kvserve.attn.cpu_paged import CPUPagedBackend

    if CPUPagedBackend.supports(kv, num_heads // kv.spec.num_kv_heads):
        return CPUPagedBackend(kv)
    return SDPABackend(kv)


__all__ = ["AttentionBackend", "SDPABackend", "AttnGroup", "AttnMetadata", "ForwardBatch", "SeqSpan", "select_backend"]
