"""What KV memory each layer needs, and the arithmetic that turns it into bytes and blocks.

The seeds' formula, for a model whose layers are all alike:

    bytes = 2 (K and V) * layers * kv_heads * head_dim * seq_len * batch * bytes_per_value

Layers need not be alike: a layer may attend to everything (full) or to a sliding window, and a
cache may store K/V quantized with scales beside them. So the spec is per layer (``LayerKVSpec``),
and layers with equal specs form a **KV cache group** (vLLM v1's ``KVCacheGroupSpec``). Each request
has one block table per group, all drawn from the one block pool. Groups hold equally many layers,
so that one block id means the same number of bytes in every group (vLLM's hybrid allocator does
the same): a model with 15 sliding and 3 global layers gets 6 groups of 3.

    KVSpec(groups=[KVCacheGroup(spec=full, layers=(0..29))])      SmolLM2: one group
    Gemma 3 270M: 5 groups of 3 sliding layers (window 512) and 1 group of its 3 full layers
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from kvserve.config import ModelConfig
from kvserve.kv.quant import kv_quant


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class AttentionType(str, enum.Enum):
    FULL = "full"  # every earlier token
    SLIDING = "sliding"  # the last ``window`` tokens (plus ``num_sinks`` first ones)


@dataclass(frozen=True)
class LayerKVSpec:
    """The KV cache of one layer: what one token costs there, and which tokens it keeps."""

    num_kv_heads: int  # on this rank
    head_dim: int
    dtype: torch.dtype  # K and V as the model computes and reads them (the storage dtype unless quantized)
    attention: AttentionType = AttentionType.FULL
    window: int | None = None  # sliding layers: positions a query sees, its own included (HF's sliding_window)
    num_sinks: int = 0  # first tokens a sliding layer keeps too (StreamingLLM's attention sinks)
    # Storage format (``kv.quant``): "int8" | "int4" | "fp8_e4m3" | "fp8_e5m2" codes with one 16-bit
    # scale word per token and KV head beside them (K and V each); None: stored as ``dtype``.
    quant: str | None = None

    def __post_init__(self) -> None:
        if (self.attention == AttentionType.SLIDING) != (self.window is not None):
            raise ValueError("a sliding layer needs a window, and only a sliding layer has one")

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.dtype if self.quant is None else kv_quant(self.quant).key.code_dtype  # V's is the same

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token in this layer, scales included."""
        if self.quant is None:
            return 2 * self.num_kv_heads * self.head_dim * dtype_bytes(self.dtype)
        return self.num_kv_heads * kv_quant(self.quant).bytes_per_token_and_head(self.head_dim)


@dataclass(frozen=True)
class KVCacheGroup:
    """Layers with equal specs: one block table per request serves all of them."""

    spec: LayerKVSpec
    layers: tuple[int, ...]


@dataclass(frozen=True)
class KVSpec:
    """The KV cache of a whole model: its groups, and the memory arithmetic summed over them."""

    groups: tuple[KVCacheGroup, ...]

    def __post_init__(self) -> None:
        sizes = {len(g.layers) for g in self.groups}
        if len(sizes) != 1:
            raise ValueError(f"KV cache groups must hold equally many layers, got {sorted(sizes)}")
        shapes = {(g.spec.num_kv_heads, g.spec.head_dim, g.spec.dtype, g.spec.quant) for g in self.groups}
        if len(shapes) != 1:
            raise ValueError("KV cache groups must share one per-layer shape (heads, head_dim, dtype, quant)")

    @classmethod
    def from_model(cls, cfg: ModelConfig, dtype: torch.dtype, quant: str | None = None) -> "KVSpec":
        """Layers of one attention type form groups of equal size: the largest size that divides every
        type's count (Gemma 3 270M: 15 sliding and 3 full layers -> 5 sliding groups and 1 full group
        of 3 layers; a model whose layers are all full: one group of all of them)."""
        full = LayerKVSpec(cfg.num_kv_heads, cfg.head_dim, dtype, quant=quant)
        sliding = None
        if cfg.sliding_window:
            sliding = LayerKVSpec(cfg.num_kv_heads, cfg.head_dim, dtype, AttentionType.SLIDING,
                                  window=cfg.sliding_window, quant=quant)
        by_type: dict[LayerKVSpec, list[int]] = {}
        for i in range(cfg.num_layers):
            by_type.setdefault(sliding if cfg.is_sliding(i) else full, []).append(i)
        size = math.gcd(*(len(layers) for layers in by_type.values()))
        return cls(tuple(KVCacheGroup(spec, tuple(layers[j : j + size]))
                         for spec, layers in by_type.items() for j in range(0, len(layers), size)))

    # -- what the groups share (one per-layer shape, equally many layers) -------------------------
    @property
    def layer(self) -> LayerKVSpec:
        return self.groups[0].spec

    @property
    def num_kv_heads(self) -> int:
        return self.layer.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.layer.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.layer.dtype

    @property
    def quant(self) -> str | None:
        return self.layer.quant

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.layer.storage_dtype

    @property
    def storage_name(self) -> str:
        """What a user calls the storage format: "int8", "fp8_e4m3", "bfloat16", ..."""
        return self.quant or str(self.dtype).removeprefix("torch.")

    @property
    def layers_per_group(self) -> int:
        return len(self.groups[0].layers)

    @property
    def num_layers(self) -> int:
        return sum(len(g.layers) for g in self.groups)

    def group_of(self) -> list[tuple[int, int]]:
        """For each layer: (its group, its index inside the group)."""
        out = [(0, 0)] * self.num_layers
        for gi, g in enumerate(self.groups):
            for j, layer in enumerate(g.layers):
                out[layer] = (gi, j)
        return out

    # -- memory arithmetic ------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        """K and V of one token over all layers (every group keeps it, while it is in its window)."""
        return sum(len(g.layers) * g.spec.bytes_per_token for g in self.groups)

    def formula_bytes(self, seq_len: int, batch: int = 1) -> int:
        """The seeds' formula: 2 * layers * kv_heads * head_dim * seq * batch * bytes, where a sliding
        layer keeps only its window: min(seq, window) tokens."""
        return batch * sum(len(g.layers) * g.spec.bytes_per_token * min(seq_len, g.spec.window or seq_len)
                           for g in self.groups)

    def block_bytes(self, block_size: int) -> int:
        """One block of the pool: block_size tokens of one group's layers (groups hold equally many)."""
        return self.layers_per_group * self.layer.bytes_per_token * block_size

    def blocks_for_budget(self, budget_bytes: int, block_size: int) -> int:
        return budget_bytes // self.block_bytes(block_size)

    def max_tokens_for_budget(self, budget_bytes: int) -> int:
        return budget_bytes // self.bytes_per_token

    def blocks_for_tokens(self, num_tokens: int, block_size: int, chunk: int | None = None) -> int:
        """The most blocks one sequence of ``num_tokens`` holds at once, over all groups, when its tokens
        are computed ``chunk`` at a time (None: all at once). A full group holds every block; a sliding
        group gives back what its window has passed (``kv.manager``), so while computing tokens
        c .. c + n - 1 it holds those of positions c - W + 1 .. c + n - 1: at most
        ceil((W - 1 + n) / block_size) + 1 blocks."""
        n_blocks = math.ceil(num_tokens / block_size)
        chunk = min(chunk or num_tokens, num_tokens)
        return sum(n_blocks if g.spec.window is None
                   else min(n_blocks, math.ceil((g.spec.window - 1 + chunk) / block_size) + 1)
                   for g in self.groups)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError
