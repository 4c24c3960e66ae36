"""KV tensors and the only two ways the model touches them: write by slot, read by slot.

Layout, per layer (K and V alike), flat over slots:

    slot = block_id * block_size + offset_in_block
    k[j] : [num_blocks * block_size, kv_heads, head_dim]
           |-- block 0 (null, zeros) --|-- block 1 --|-- block 2 --| ...

A paged cache has many small blocks; the contiguous cache is the same tensor with one
``max_model_len``-token block per sequence. The model never knows which it has.

KV cache groups (``kv.spec``) share these tensors: layer ``l`` of group ``g`` lives in ``k[j]``, j its
index inside the group. A block id belongs to one group at a time (the pool hands each id out once),
so the groups never write over each other, and one block id costs the same bytes in every group.
"""
from __future__ import annotations

import numpy as np
import torch

from kvserve import hugepages
from kvserve.kv.spec import KVSpec


class KVCache:
    """Preallocated K/V storage for all layers."""

    def __init__(self, spec: KVSpec, num_blocks: int, block_size: int, device: torch.device | str = "cpu"):
        self.spec, self.num_blocks, self.block_size = spec, num_blocks, block_size
        self.layer_index = [j for _, j in spec.group_of()]  # layer -> its tensor index k[j], v[j]
        shape = (spec.layers_per_group, num_blocks * block_size, spec.num_kv_heads, spec.head_dim)
        # empty, not zeros: untouched pages cost no RAM, so a large contiguous reservation is cheap
        # until used. But reads cover whole blocks, and masked positions past a request's length
        # must hold finite values (a zero attention weight times NaN is still NaN): each block is
        # zeroed the first time it is allocated (``zero_new``, called by the manager); after that it
        # holds stale but finite K/V. Block 0, the null block that pads block tables, is zeroed now.
        # On the CPU, on 2 MiB pages: decode reads scattered blocks, and 4 KiB pages make each one a TLB miss.
        self.k = hugepages.empty(shape, spec.dtype, device)
        self.v = hugepages.empty(shape, spec.dtype, device)
        self._zeroed = np.zeros(num_blocks, dtype=bool)
        self.zero_new([0])

    def zero_new(self, block_ids: list[int]) -> None:
        """Zero the blocks among ``block_ids`` that have never been used (once per block)."""
        ids = np.asarray(block_ids, dtype=np.int64)
        fresh = ids[~self._zeroed[ids]]
        if fresh.size:
            for b in fresh.tolist():
                self.k[:, b * self.block_size : (b + 1) * self.block_size].zero_()
                self.v[:, b * self.block_size : (b + 1) * self.block_size].zero_()
            self._zeroed[fresh] = True

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
        j = self.layer_index[layer]
        self.k[j].index_copy_(0, slot_mapping, k)
        self.v[j].index_copy_(0, slot_mapping, v)

    def read(self, layer: int, where: slice | tuple[torch.Tensor, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the cached tokens of some requests.

        ``where`` is a slice of slots (one request whose blocks sit side by side: a view, no copy), or
        ``(block_table [B, n], width)``: a gather of whole blocks -> ``[B, width, kv_heads, head_dim]``,
        width = n * block_size, or less when each request has one (large) block. Positions past a
        request's length hold finite stale values; the caller masks them."""
        j = self.layer_index[layer]
        if isinstance(where, slice):
            return self.k[j, where], self.v[j, where]
        table, width = where
        B, n = table.shape
        blocks = table.reshape(-1)
        per_block = min(self.block_size, width)
        out = []
        for cache in (self.k[j], self.v[j]):
            view = cache.view(self.num_blocks, self.block_size, *cache.shape[1:])[:, :per_block]
            out.append(view.index_select(0, blocks).view(B, n * per_block, *cache.shape[1:])[:, :width])
        return out[0], out[1]

    def blocks(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's K and V pools as ``[num_blocks, block_size, kv_heads, head_dim]`` views."""
        shape = (self.num_blocks, self.block_size, *self.k.shape[2:])
        j = self.layer_index[layer]
        return self.k[j].view(shape), self.v[j].view(shape)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy block ``src``'s K/V, every layer, into block ``dst`` (copy-on-write of a shared block)."""
        bs = self.block_size
        self.k[:, dst * bs : (dst + 1) * bs] = self.k[:, src * bs : (src + 1) * bs]
        self.v[:, dst * bs : (dst + 1) * bs] = self.v[:, src * bs : (src + 1) * bs]
        self._zeroed[dst] = True  # holds data now: ``zero_new`` must not zero it

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
        self._zeroed[block_ids] = True
