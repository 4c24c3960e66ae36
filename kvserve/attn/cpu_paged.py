"""The CPU backend: decodes through the C++ paged-decode kernel, prompt chunks through SDPA.

The kernel follows each request's block table inside the cache and reads every cached byte once
(``kvserve/models/cpu_kernels.py``), so a decode costs its own length whatever its neighbours' are:
all of a step's decodes form one group, with no padding and no gathered copy.
"""
from __future__ import annotations

import torch

from kvserve.attn.backend import SDPABackend
from kvserve.attn.metadata import AttnGroup
from kvserve.kv.storage import KVCache
from kvserve.models import cpu_kernels


class CPUPagedBackend(SDPABackend):
    name = "cpu-paged"
    split_decodes = False  # no padding: one decode group per step

    def _decode(self, q: torch.Tensor, layer: int, g: AttnGroup) -> torch.Tensor:
        if g.lens is None:  # one request whose blocks sit side by side: SDPA over a view, no gather
            return super()._decode(q, layer, g)
        qg = self._group_queries(q, g)
        return cpu_kernels.paged_decode(qg, *self.kv.blocks(layer), g.kv_read[0], g.lens)

    @staticmethod
    def supports(kv: KVCache, group: int) -> bool:
        """CPU cache, and the kernel builds for this head_dim and ``group`` query heads per KV head."""
        return kv.device.type == "cpu" and cpu_kernels.supports(kv.spec.head_dim, group)
