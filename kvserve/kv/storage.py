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

A quantized cache (``spec.quant``: int8, int4, fp8; ``kv.quant``) stores codes in ``k``/``v`` and one
float16 scale per token and KV head in ``k_scale``/``v_scale`` ``[layers, slots, kv_heads]``: the same
slot order, so everything that moves slots (copy-on-write, swap, zeroing) moves codes and scales alike.
``write`` quantizes, ``read`` dequantizes into the model dtype; the C++ decode kernel reads the codes in
place (``blocks``).
"""
from __future__ import annotations

import numpy as np
import torch

from kvserve import hugepages
from kvserve.kv.quant import dequantize, kv_quant, quantize, rotation
from kvserve.kv.spec import KVSpec
from kvserve.models import cpu_quant_kernels


def _raw(t: torch.Tensor) -> torch.Tensor:
    """fp8 codes as bytes: CPU index_copy_ / index_select have no float8 kernels (a view, no copy)."""
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


class KVCache:
    """Preallocated K/V storage for all layers."""

    def __init__(self, spec: KVSpec, num_blocks: int, block_size: int, device: torch.device | str = "cpu"):
        self.spec, self.num_blocks, self.block_size = spec, num_blocks, block_size
        self.layer_index = [j for _, j in spec.group_of()]  # layer -> its tensor index k[j], v[j]
        self.quant = None if spec.quant is None else kv_quant(spec.quant)
        slots = (spec.layers_per_group, num_blocks * block_size, spec.num_kv_heads)
        # code bytes per head row: K and V may differ (int4: q5 keys, q4 values)
        kdim, vdim = ((spec.head_dim,) * 2 if self.quant is None
                      else (self.quant.key.packed_dim(spec.head_dim), self.quant.value.packed_dim(spec.head_dim)))
        # empty, not zeros: untouched pages cost no RAM, so a large contiguous reservation is cheap
        # until used. But reads cover whole blocks, and masked positions past a request's length
        # must hold finite values (a zero attention weight times NaN is still NaN): each block is
        # zeroed the first time it is allocated (``zero_new``, called by the manager); after that it
        # holds stale but finite K/V. Block 0, the null block that pads block tables, is zeroed now.
        # On the CPU, on 2 MiB pages: decode reads scattered blocks, and 4 KiB pages make each one a TLB miss.
        self.k = hugepages.empty((*slots, kdim), spec.storage_dtype, device)
        self.v = hugepages.empty((*slots, vdim), spec.storage_dtype, device)
        self.k_scale = self.v_scale = None
        # int4 and fp8 store K and V rotated (``kv.quant.rotation``): ``write`` rotates, ``read`` turns back, and
        # the decode kernel's caller rotates q and turns the output back
        self.rotation = None
        if self.quant is not None and (r := rotation(self.quant, spec.head_dim)) is not None:
            self.rotation = r.to(device, spec.dtype)
        if self.quant is not None:
            self.k_scale = hugepages.empty(slots, self.quant.scale_dtype, device)
            self.v_scale = hugepages.empty(slots, self.quant.scale_dtype, device)
        # every tensor indexed [layer, slot, ...]: what moves a slot moves all of them
        self.tensors = [t for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None]
        self._cpp_write = (self.quant is not None and self.k.device.type == "cpu"
                           and spec.dtype in (torch.float32, torch.bfloat16) and cpu_quant_kernels.available())
        self._zeroed = np.zeros(num_blocks, dtype=bool)
        self.zero_new([0])

    def zero_new(self, block_ids: list[int]) -> None:
        """Zero the blocks among ``block_ids`` that have never been used (once per block)."""
        ids = np.unique(np.asarray(block_ids, dtype=np.int64))
        self._zero(ids[~self._zeroed[ids]])

    def prefault(self, max_bytes: int | None = None) -> bool:
        """Zero never-used blocks now, lowest ids first: all of them, or about ``max_bytes`` of the pool
        (at least one block); returns whether any remain. Zeroing touches their pages, so the first use
        of that memory (a page fault per page; on the VMs we measure on, ~13 ms for each fresh 2 MiB page,
        as the host backs it) is paid here and not by the requests that first reach those blocks. Blocks
        in use are never touched. The whole pool at once is what vLLM and llama.cpp do at startup and what
        the benchmarks do in their warm-up; ``AsyncLLM`` does it in slices while it has nothing to run."""
        fresh = np.flatnonzero(~self._zeroed)
        if max_bytes is not None:
            fresh = fresh[: max(1, max_bytes * self.num_blocks // self.nbytes)]
        self._zero(fresh)
        return not self._zeroed.all()

    def _zero(self, ids: np.ndarray) -> None:
        """Zero blocks ``ids`` (ascending, distinct) in every tensor: one ``zero_`` per run of consecutive ids."""
        if not ids.size:
            return
        bs = self.block_size
        for run in np.split(ids, np.flatnonzero(np.diff(ids) != 1) + 1):
            lo, hi = int(run[0]) * bs, (int(run[-1]) + 1) * bs
            for t in self.tensors:
                t[:, lo:hi].zero_()
        self._zeroed[ids] = True

    @property
    def touched_bytes(self) -> int:
        """Bytes of the pool zeroed or written so far: the part whose pages the process has touched (an
        untouched page of the ``empty`` reservation costs no RAM)."""
        return int(self._zeroed.sum()) * self.nbytes // self.num_blocks

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store the new tokens' K/V ``[T, kv_heads, head_dim]`` at their slots ``[T]``."""
        if k.device != self.device:
            raise RuntimeError(f"KV write: tensors on {k.device} but the cache is on {self.device}")
        j = self.layer_index[layer]
        if self.quant is None:
            self.k[j].index_copy_(0, slot_mapping, k)
            self.v[j].index_copy_(0, slot_mapping, v)
            return
        for x, codes, scales, rc in ((k, self.k[j], self.k_scale[j], self.quant.key),
                                     (v, self.v[j], self.v_scale[j], self.quant.value)):
            if self.rotation is not None:
                x = x @ self.rotation
            if self._cpp_write:  # the same bytes in one C++ call (the PyTorch path is ~20 small ops)
                cpu_quant_kernels.quantize_write(x, codes, scales, slot_mapping, rc)
                continue
            c, sc = quantize(x, rc)
            _raw(codes).index_copy_(0, slot_mapping, _raw(c))
            scales.index_copy_(0, slot_mapping, sc)

    def read(self, layer: int, where: slice | tuple[torch.Tensor, int],
             values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """K/V of the cached tokens of some requests (V None when not ``values``: KV compression scores keys only).

        ``where`` is a slice of slots (one request whose blocks sit side by side: a view, no copy), or
        ``(block_table [B, n], width)``: a gather of whole blocks -> ``[B, width, kv_heads, head_dim]``,
        width = n * block_size, or less when each request has one (large) block. Positions past a
        request's length hold finite stale values; the caller masks them."""
        j = self.layer_index[layer]
        if self.quant is None:
            return self._select(self.k[j], where), self._select(self.v[j], where) if values else None
        # quantized: gather the codes and scales, dequantize the copy (prefill chunks, SDPA, CUDA)
        pairs = ((self.k[j], self.k_scale[j], self.quant.key), (self.v[j], self.v_scale[j], self.quant.value))
        out = [dequantize(self._select(c, where), self._select(sc, where), kind, self.spec.dtype)
               for c, sc, kind in pairs[: 2 if values else 1]]
        if self.rotation is not None:  # stored rotated: turn back (the rotation is its own inverse)
            out = [x @ self.rotation for x in out]
        return out[0], out[1] if values else None

    def _select(self, cache: torch.Tensor, where: slice | tuple[torch.Tensor, int]) -> torch.Tensor:
        """``cache`` ``[slots, ...]`` at ``where`` (see ``read``)."""
        if isinstance(where, slice):
            return cache[where]
        table, width = where
        B, n = table.shape
        per_block = min(self.block_size, width)
        view = _raw(cache).view(self.num_blocks, self.block_size, *cache.shape[1:])[:, :per_block]
        out = view.index_select(0, table.reshape(-1)).view(B, n * per_block, *cache.shape[1:])[:, :width]
        return out.view(cache.dtype)

    def blocks(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's K and V pools (codes, if quantized) as ``[num_blocks, block_size, kv_heads, dim]`` views."""
        j = self.layer_index[layer]
        return tuple(t[j].view(self.num_blocks, self.block_size, *t.shape[2:]) for t in (self.k, self.v))

    def scale_blocks(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A quantized cache's K and V scales of one layer as ``[num_blocks, block_size, kv_heads]`` views."""
        j = self.layer_index[layer]
        return tuple(t[j].view(self.num_blocks, self.block_size, -1) for t in (self.k_scale, self.v_scale))

    def copy_block(self, src: int, dst: int) -> None:
        """Copy block ``src``'s K/V (and scales), every layer, into block ``dst`` (copy-on-write of a shared block)."""
        bs = self.block_size
        for t in self.tensors:
            t[:, dst * bs : (dst + 1) * bs] = t[:, src * bs : (src + 1) * bs]
        self._zeroed[dst] = True  # holds data now: ``zero_new`` must not zero it

    # -- moving whole blocks (swap preemption) --------------------------------------------------
    def block_slots(self, block_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor(block_ids, dtype=torch.long)
        return (ids[:, None] * self.block_size + torch.arange(self.block_size)).flatten().to(self.device)

    def copy_out(self, block_ids: list[int]) -> list[torch.Tensor]:
        """CPU copies of the blocks' K/V (and scales), to give to ``copy_in`` later."""
        slots = self.block_slots(block_ids)
        return [t[:, slots].to("cpu") for t in self.tensors]

    def copy_in(self, block_ids: list[int], data: list[torch.Tensor]) -> None:
        slots = self.block_slots(block_ids)
        for t, d in zip(self.tensors, data, strict=True):
            t[:, slots] = d.to(self.device)
        self._zeroed[block_ids] = True
