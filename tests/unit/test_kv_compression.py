"""KV compression's packing and scoring without a model: random caches, naive references."""
from __future__ import annotations

import pytest
import torch

from kvserve.kv import compress as kvc
from kvserve.kv.spec import KVCacheGroup, KVSpec, LayerKVSpec
from kvserve.kv.storage import KVCache

BS, H, D, LAYERS = 4, 3, 16, 2


@pytest.mark.parametrize("quant", [None, "int8", "fp8_e4m3"])
def test_pack_keeps_exactly_the_selected_pairs(quant):
    """Each (layer, head)'s kept positions, in order, land at cache positions 0..n-1 of the request's
    blocks: equal to a naive gather of the same pairs from a copy taken before packing (codes and
    scales alike for a quantized cache). Other requests' blocks are untouched."""
    g = torch.Generator().manual_seed(0)
    kv = KVCache(KVSpec((KVCacheGroup(LayerKVSpec(H, D, torch.float32, quant=quant), tuple(range(LAYERS))),)),
                 num_blocks=12, block_size=BS)
    table, other = [7, 2, 9, 4, 11], [3, 5]  # a request of 5 blocks in scattered places, and a neighbour's
    L = 18
    for layer in range(LAYERS):
        slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(L)] + [b * BS + i for b in other for i in range(BS)])
        x = torch.randn(len(slots), H, D, generator=g)
        kv.write(layer, x, x.flip(-1), slots)
    before = [t.clone() for t in kv.tensors]
    n = 7
    keep = torch.stack([torch.stack([torch.randperm(L, generator=g)[:n].sort().values for _ in range(H)]) for _ in range(LAYERS)])
    kvc.pack(kv, list(range(LAYERS)), table, keep)
    slot = lambda p: table[p // BS] * BS + p % BS  # noqa: E731
    for t, b in zip(kv.tensors, before):
        raw, braw = kvc_raw(t), kvc_raw(b)
        for layer in range(LAYERS):
            for h in range(H):
                for j in range(n):
                    assert torch.equal(raw[layer, slot(j), h], braw[layer, slot(int(keep[layer, h, j])), h])
        for blk in other:
            assert torch.equal(raw[:, blk * BS : (blk + 1) * BS], braw[:, blk * BS : (blk + 1) * BS])


def kvc_raw(t: torch.Tensor) -> torch.Tensor:
    from kvserve.kv.storage import _raw

    return _raw(t)


def test_scores_follow_their_definitions():
    g = torch.Generator().manual_seed(1)
    keys, q = torch.randn(2, 40, 8, generator=g), torch.randn(4, 8, 8, generator=g)  # 2 KV heads, 4 query heads
    c = kvc.KVCompression("knorm", 0.5)
    assert torch.equal(kvc.select(kvc.scores(c, keys, None), 3), (-keys.norm(dim=-1)).topk(3).indices.sort().values)
    s = kvc.scores(kvc.KVCompression("streaming_llm", 0.5, n_sink=4), keys, None)
    assert kvc.select(s, kvc.n_kept(40, 0.5)).tolist() == [list(range(4)) + list(range(24, 40))] * 2
    # snapkv with a window of 8: the window is kept, and the rest ranks by the mean window attention
    c = kvc.KVCompression("snapkv", 0.5, window_size=8, kernel_size=1)
    kept = kvc.select(kvc.scores(c, keys, q), 20)
    assert all(set(range(32, 40)) <= set(row.tolist()) for row in kept)
    w = torch.softmax(q @ keys.repeat_interleave(2, 0).transpose(1, 2) / 8 ** 0.5
                      + torch.full((8, 40), float("-inf")).triu(33), dim=-1)[..., :32].mean(1).view(2, 2, 32).mean(1)
    assert torch.equal(kept[:, :12], w.topk(12).indices.sort().values)


def test_parse():
    assert kvc.KVCompression.parse("snapkv:0.25") == kvc.KVCompression("snapkv", 0.25)
    assert kvc.KVCompression.parse({"method": "tova", "ratio": 0.5}).query_window == 1
    assert kvc.KVCompression.parse(None) is None
    with pytest.raises(ValueError, match="method:ratio"):
        kvc.KVCompression.parse("snapkv:half")


def test_select_keeps_the_recent_window_then_the_heaviest():
    s = torch.tensor([[5.0, 0.1, 4.0, 0.2, 0.3, 0.0, 0.0]])
    assert kvc.select(s, 4, recent=2).tolist() == [[0, 2, 5, 6]]
    assert kvc.select(s, 4).tolist() == [[0, 2, 3, 4]]
    keys, q = torch.randn(2, 9, 8), torch.randn(6, 8)
    w = kvc.attention(keys, q)
    ref = torch.stack([torch.softmax(q[h * 3 : (h + 1) * 3] @ keys[h].T / 8 ** 0.5, dim=-1).mean(0) for h in range(2)])
    assert torch.allclose(w, ref, atol=1e-6) and torch.allclose(w.sum(-1), torch.ones(2))
