"""The memory arithmetic of a KV cache (the seeds' formula) and how a byte budget becomes blocks.

    bytes = 2 (K and V) * layers * kv_heads * head_dim * seq_len * batch * bytes_per_value
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.config import ModelConfig


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class KVSpec:
    """Shape of the KV cache of one model: what one token costs."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def from_model(cls, cfg: ModelConfig, dtype: torch.dtype) -> "KVSpec":
        return cls(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes(self.dtype)

    def formula_bytes(self, seq_len: int, batch: int = 1) -> int:
        """The seeds' formula: 2 * layers * kv_heads * head_dim * seq * batch * bytes."""
        return self.bytes_per_token * seq_len * batch

    def block_bytes(self, block_size: int) -> int:
        return self.bytes_per_token * block_size

    def blocks_for_budget(self, budget_bytes: int, block_size: int) -> int:
        return budget_bytes // self.block_bytes(block_size)

    def max_tokens_for_budget(self, budget_bytes: int) -> int:
        return budget_bytes // self.bytes_per_token


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError
