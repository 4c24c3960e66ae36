"""The CPU backend: decodes through the C++ paged-decode kernel, prompt chunks through SDPA.

The kernel follows each request's block table inside the cache and reads every cached byte once
(``kvserve/models/cpu_kernels.py``), so a decode costs its own length whatever its neighbours' are:
all of a step's decodes form one group, with no padding and no gathered copy. A quantized cache
(int8, int4, fp8) is read the same way by its own kernel (``cpu_quant_kernels``), which dequantizes
in registers: decode reads the smaller codes, never a dequantized copy.
"""
from __future__ import annotations

import torch

from kvserve.attn.backend import SDPABackend
from kvserve.attn.metadata import AttnGroup
from kvserve.kv.storage import KVCache
from kvserve.models import cpu_kernels, cpu_quant_kernels


class CPUPagedBackend(SDPABackend):
    name = "cpu-paged"
    split_decodes = False  # no padding: one decode group per step
    # the kernel beats SDPA over a view for a lone decode too (bf16, SmolLM2, batch 1: 37.3 vs 32.0 tok/s
    # at 1k context, 28.4 vs 19.6 at 4k; int8 KV 34.8 vs 25.5 and 23.0 vs 17.0)
    view_lone_decode = False

    def _decode(self, q: torch.Tensor, layer: int, g: AttnGroup) -> torch.Tensor:
        if g.lens is None:  # one request whose blocks sit side by side: SDPA over a view, no gather
            return super()._decode(q, layer, g)
        qg = self._group_queries(q, g)
        k, v = self.kv.blocks(layer)
        if self.kv.quant is None:
            return cpu_kernels.paged_decode(qg, k, v, g.kv_read[0], g.lens, g.begins)
        ks, vs = self.kv.scale_blocks(layer)
        r = self.kv.rotation  # K and V stored rotated: rotate q the same way, turn the output back
        if r is not None:
            qg = qg @ r
        o = cpu_quant_kernels.paged_decode_quant(qg, k, ks, v, vs, g.kv_read[0], g.lens, self.kv.quant.name, g.begins)
        return o if r is None else o @ r

    @staticmethod
    def supports(kv: KVCache, group: int) -> bool:
        """CPU cache, and the kernel for its format builds for this head_dim and ``group`` query heads
        per KV head."""
        if kv.device.type != "cpu":
            return False
        if kv.quant is not None:
            return cpu_quant_kernels.supports_quant(kv.spec.head_dim, group, kv.quant.name)
        return cpu_kernels.supports(kv.spec.head_dim, group)
