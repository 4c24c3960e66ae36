"""A sliding-window layer whose table starts with null entries inside its window (after a context
shift or the sink_window policy moved positions down, the window can reach back over blocks it gave
back long ago): both backends attend only from the first live block, for decodes and prompt chunks,
and equal plain attention over exactly those keys."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvserve.attn.backend import SDPABackend
from kvserve.attn.cpu_paged import CPUPagedBackend
from kvserve.attn.metadata import SeqSpan
from kvserve.kv.spec import AttentionType, KVCacheGroup, KVSpec, LayerKVSpec
from kvserve.kv.storage import KVCache

BS, W, HKV, G, D = 4, 16, 1, 2, 32


def make_cache() -> KVCache:
    full = LayerKVSpec(HKV, D, torch.float32)
    sliding = LayerKVSpec(HKV, D, torch.float32, AttentionType.SLIDING, window=W)
    kv = KVCache(KVSpec((KVCacheGroup(full, (0,)), KVCacheGroup(sliding, (1,)))), num_blocks=16, block_size=BS)
    g = torch.Generator().manual_seed(0)
    for layer in (0, 1):
        for t in kv.blocks(layer):
            t.copy_(torch.randn(t.shape, generator=g))
    return kv


@pytest.mark.parametrize("backend", [SDPABackend, CPUPagedBackend])
@pytest.mark.parametrize("start,num_new", [(17, 1), (14, 4)])
def test_a_window_over_null_entries_reads_from_the_first_live_block(backend, start, num_new):
    if backend is CPUPagedBackend and not CPUPagedBackend.supports(make_cache(), G):
        pytest.skip("the C++ kernels are not built here")
    kv = make_cache()
    attn = backend(kv)
    end = start + num_new
    full_table = np.array([1, 2, 3, 4, 9], dtype=np.int64)
    sliding_table = np.array([0, 0, 5, 6, 7], dtype=np.int64)  # positions 0-7 given back; W = 16 reaches them
    meta = attn.prepare([SeqSpan(start, num_new, [full_table, sliding_table])])
    g = torch.Generator().manual_seed(1)
    q = torch.randn(num_new, HKV * G, D, generator=g)
    k, v = torch.randn(num_new, HKV, D, generator=g), torch.randn(num_new, HKV, D, generator=g)
    out = attn.forward(q, k, v, 1, meta)
    kc, vc = kv.blocks(1)
    keys = kc[sliding_table].reshape(-1, HKV, D)  # positions 0 .. 19 (0-7 read from the null block)
    vals = vc[sliding_table].reshape(-1, HKV, D)
    for i in range(num_new):
        p = start + i
        lo = max(p - W + 1, 2 * BS)  # the window, but nothing before the first live block
        kk, vv = keys[lo : p + 1, 0], vals[lo : p + 1, 0]
        want = torch.softmax(q[i] @ kk.T / D**0.5, dim=-1) @ vv  # [G, D]
        torch.testing.assert_close(out[i], want, atol=1e-5, rtol=1e-5)
