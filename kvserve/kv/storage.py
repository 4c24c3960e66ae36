"""KV tensors and the only two ways the model touches them: write by slot, read by slot.

Layout, per layer (K and V alike), flat over slots:

    slot = block_id * block_size + offset_in_block
    k[layer] : [num_blocks * block_size, kv_heads, head_dim]
               |-- block 0 (null, zeros) --|-- block 1 --|-- block 2 --| ...

A paged cache has many small blocks; the contiguous cache is the same tensor with one
``max_model_len``-token block per sequence. The model never knows which it has.
"""
from __future__ import annotations

import torch

from kvserve.kv.spec import KVSpec


class KVCache:
    """Preallocated K/V storage for all layers."""

    def __init__(self, spec: KVSpec, num_blocks: int, block_size: int, device: torch.device | str = "cpu"):
        self.spec, self.num_blocks, self.block_size = spec, num_blocks, block_size
        shape = (spec.num_layers, num_blocks * block_size, spec.num_kv_heads, spec.head_dim)
        # empty, not zeros: slots are always written before they are read, and untouched pages cost no RAM.
        self.k = torch.empty(shape, dtype=spec.dtype, device=device)
        self.v = torch.empty(shape, dtype=spec.dtype, device=device)
        # Block 0 is the null block: padded reads point here, so it must hold finite values
        # (a NaN times a zero attention weight is still NaN).
        self.k[:, :block_size].zero_()
        self.v[:, :block_size].zero_()

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store the new tokens' K/V ``[T, kv_heads, head_dim]`` at their slots ``[T]``."""
        if k.device != self.device:
            raise RuntimeError(f"KV write: tensors on {k.device} but the cache is on {self.device}")
        self.k[layer].index_copy_(0, slot_mapping, k)
        self.v[layer].index_copy_(0, slot_mapping, v)

    def read(self, layer: int, slots: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V at ``slots``: a slice gives a view (one request with contiguous slots), an index tensor a gather."""
        if isinstance(slots, slice):
            return self.k[layer, slots], self.v[layer, slots]
        return self.k[layer][slots], self.v[layer][slots]

    # -- moving whole blocks (swap preemption) --------------------------------------------------
    def block_slots(self, block_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor(block_ids, dtype=torch.long)
        return (ids[:, None] * self.block_size + torch.arange(self.block_size)).flatten().to(self.device)

    def copy_out(self, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.block_slots(block_ids)
        return self.k[:, slots].to("cpu"), self.v[:, slots].to("cpu")

    def copy_in(self, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        slots = self.block_slots(block_ids)
        self.k[:, slots] = k.to(self.device)
        self.v[:, slots] = v.to(self.device)
