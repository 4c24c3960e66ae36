"""The C++ paged-decode kernel against the same attention in plain PyTorch (random pools, no model)."""
import os

import pytest
import torch

from kvserve.models import cpu_kernels

pytestmark = pytest.mark.skipif(os.environ.get("KVSERVE_CPU_KERNELS") == "0", reason="CPU kernels turned off")


def random_case(seed: int, B: int, Hkv: int, G: int, D: int, bs: int, num_blocks: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks, bs, Hkv, D, generator=g).to(dtype)
    v = torch.randn(num_blocks, bs, Hkv, D, generator=g).to(dtype)
    lens = torch.randint(1, 6 * bs, (B,), generator=g)
    n = int(-(-lens.max() // bs))
    table = torch.zeros(B, n, dtype=torch.long)  # padded with the null block 0
    free = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # no block shared, random places
    for b in range(B):
        nb = int(-(-lens[b] // bs))
        table[b, :nb] = torch.tensor([free.pop() for _ in range(nb)])
    q = torch.randn(B, Hkv, G, D, generator=g).to(dtype)
    return q, k, v, table, lens


def test_kernel_builds():
    assert cpu_kernels.available(), "the C++ kernel did not build (g++ and ninja are needed); see the log warning"


@pytest.mark.parametrize("B,Hkv,G,D,bs", [(1, 3, 3, 64, 16), (7, 3, 3, 64, 16), (5, 2, 4, 32, 8), (3, 1, 1, 64, 300)])
def test_paged_decode_matches_reference(B, Hkv, G, D, bs):
    q, k, v, table, lens = random_case(B * 100 + bs, B, Hkv, G, D, bs, num_blocks=64, dtype=torch.float32)
    out = cpu_kernels.paged_decode(q, k, v, table, lens)
    ref = cpu_kernels.paged_decode_reference(q, k, v, table, lens)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_stale_values_past_the_length_are_ignored():
    q, k, v, table, lens = random_case(1, 4, 3, 3, 64, 16, num_blocks=64, dtype=torch.float32)
    before = cpu_kernels.paged_decode(q, k, v, table, lens)
    for b in range(4):  # scribble over every slot past each request's length, in its last block
        last, used = table[b, (lens[b] - 1) // 16], (lens[b] - 1) % 16 + 1
        k[last, used:] = 1e4
        v[last, used:] = float("nan")
    torch.testing.assert_close(cpu_kernels.paged_decode(q, k, v, table, lens), before)


def test_bf16_cache():
    q, k, v, table, lens = random_case(3, 6, 3, 3, 64, 16, num_blocks=64, dtype=torch.bfloat16)
    out = cpu_kernels.paged_decode(q, k, v, table, lens)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), cpu_kernels.paged_decode_reference(q, k, v, table, lens).float(),
                               atol=2e-2, rtol=2e-2)
