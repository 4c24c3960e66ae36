"""Configuration dataclasses: what the model is, how its KV cache is laid out, how the scheduler batches.

Validation lives in ``__post_init__`` so a bad value fails where it is written, with a message that names it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

KV_CACHE_MODES = ("paged", "contiguous", "off")
PREEMPTION_MODES = ("recompute", "swap")


@dataclass
class ModelConfig:
    """Architecture of a Llama-family decoder, read from GGUF metadata or a HF config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        per_layer = attn + mlp + 2 * self.hidden_size
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + self.hidden_size


def parse_bytes(value: str | int | float) -> int:
    """'1GiB', '512MiB', '2GB', 1e9 -> bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", value, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse a memory size from {value!r} (try '1GiB' or '512MiB')")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary or not unit else 1000
    return int(number * base ** " KMGT".index(unit or " "))


@dataclass
class CacheConfig:
    """How KV memory is laid out.

    * ``paged``: a pool of ``block_size``-token blocks shared by all requests (vLLM's PagedAttention).
    * ``contiguous``: the seeds' preallocated cache: one block of ``max_model_len`` tokens per sequence slot,
      i.e. paged with one block per sequence, so the same write/read code serves both.
    * ``off``: no reuse at all: every step recomputes the whole sequence (the O(n^2) reference).
    """

    kv_cache: str = "paged"
    block_size: int = 16
    kv_cache_memory: int | str | None = None  # bytes for the pool (paged); default 1 GiB
    num_kv_blocks: int | None = None  # overrides kv_cache_memory
    kv_cache_dtype: torch.dtype | None = None  # default: the model dtype
    enable_prefix_caching: bool | None = None  # default: on for paged, off otherwise
    preemption_mode: str = "recompute"
    swap_space: int | str = "2GiB"

    def __post_init__(self) -> None:
        if self.kv_cache not in KV_CACHE_MODES:
            raise ValueError(f"kv_cache must be one of {KV_CACHE_MODES}, got {self.kv_cache!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {self.preemption_mode!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be >= 2 (one is the null block), got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
        self.swap_space = parse_bytes(self.swap_space)
        if self.enable_prefix_caching is None:
            self.enable_prefix_caching = self.kv_cache == "paged"
        if self.enable_prefix_caching and self.kv_cache != "paged":
            raise ValueError("enable_prefix_caching needs kv_cache='paged'")


@dataclass
class SchedulerConfig:
    """Per-step limits: how many sequences run at once and how many tokens one forward may hold."""

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            # Without chunking a whole prompt must fit one step's budget.
            self.max_num_batched_tokens = self.max_model_len
