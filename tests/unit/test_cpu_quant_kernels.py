"""The C++ decode kernel over a quantized paged pool (int8, int4 = q5 keys + q4 values, fp8) against dequantize-then-SDPA
(random pools, no model). Both see the same codes and scales, so they differ only by float summation
order and the kernel's exp: the tolerance is the unquantized kernel's."""
import os

import pytest
import torch

from kvserve.kv.quant import CODECS, kv_quant, quantize
from kvserve.models import cpu_quant_kernels
from kvserve.models.cpu_quant_kernels import FORMATS as KINDS
from kvserve.models.cpu_quant_kernels import paged_decode_quant, paged_decode_quant_reference

pytestmark = pytest.mark.skipif(os.environ.get("KVSERVE_CPU_KERNELS") == "0", reason="CPU kernels turned off")


def quant_case(seed: int, kind: str, B: int, Hkv: int, G: int, D: int, bs: int, num_blocks: int = 64,
               q_dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    # keys with a few large channels (as real keys have), values plain
    k = torch.randn(num_blocks, bs, Hkv, D, generator=g) * (1 + 4 * (torch.rand(D, generator=g) > 0.9))
    v = torch.randn(num_blocks, bs, Hkv, D, generator=g)
    kc, ks = quantize(k, kv_quant(kind).key)
    vc, vs = quantize(v, kv_quant(kind).value)
    lens = torch.randint(1, 6 * bs, (B,), generator=g)
    lens[0] = 6 * bs  # one request fills its last block exactly
    n = int(-(-lens.max() // bs))
    table = torch.zeros(B, n, dtype=torch.long)  # padded with the null block 0
    free = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    for b in range(B):
        nb = int(-(-lens[b] // bs))
        table[b, :nb] = torch.tensor([free.pop() for _ in range(nb)])
    q = torch.randn(B, Hkv, G, D, generator=g).to(q_dtype)
    return q, kc, ks, vc, vs, table, lens


def test_quant_kernel_builds():
    assert cpu_quant_kernels.available(), "the quantized-KV C++ kernel did not build; see the log warning"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B,Hkv,G,D,bs", [
    (1, 3, 3, 64, 16),    # SmolLM2 at batch 1 (blocks split across threads)
    (7, 3, 3, 64, 16),    # SmolLM2, a batch
    (5, 2, 4, 32, 8),     # GQA 4, small head
    (3, 1, 4, 256, 16),   # Gemma 3: MQA, head_dim 256
    (2, 4, 1, 128, 32),   # MHA (G = 1), head_dim 128
    (4, 2, 8, 64, 16),    # the largest group the kernel takes
])
def test_quant_decode_matches_dequantize_then_sdpa(kind, B, Hkv, G, D, bs):
    q, kc, ks, vc, vs, table, lens = quant_case(B * 100 + bs + D, kind, B, Hkv, G, D, bs)
    out = paged_decode_quant(q, kc, ks, vc, vs, table, lens, kind)
    ref = paged_decode_quant_reference(q, kc, ks, vc, vs, table, lens, kind)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])  # fp16: through fp32 in the shared entry
@pytest.mark.parametrize("kind", KINDS)
def test_quant_decode_bf16_queries(kind, q_dtype):
    q, kc, ks, vc, vs, table, lens = quant_case(11, kind, 6, 3, 3, 64, 16, q_dtype=q_dtype)
    out = paged_decode_quant(q, kc, ks, vc, vs, table, lens, kind)
    ref = paged_decode_quant_reference(q, kc, ks, vc, vs, table, lens, kind)
    assert out.dtype == q_dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_stale_codes_past_the_length_are_ignored(kind):
    q, kc, ks, vc, vs, table, lens = quant_case(5, kind, 4, 3, 3, 64, 16)
    before = paged_decode_quant(q, kc, ks, vc, vs, table, lens, kind)
    for b in range(4):  # scribble over every slot past each request's length, in its last block
        last, used = table[b, (lens[b] - 1) // 16], (lens[b] - 1) % 16 + 1
        kc[last, used:] = kc[last, 0].clone()
        ks[last, used:] = 1e4
        vs[last, used:] = float("nan")
    torch.testing.assert_close(paged_decode_quant(q, kc, ks, vc, vs, table, lens, kind), before)


def test_wrong_code_dtype_is_refused():
    q, kc, ks, vc, vs, table, lens = quant_case(1, "int8", 2, 3, 3, 64, 16)
    with pytest.raises(TypeError, match="q5 codes are torch.uint8"):
        paged_decode_quant(q, kc, ks, vc, vs, table, lens, "int4")


@pytest.mark.parametrize("kind", list(CODECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_write_gives_the_bytes_of_quantize(kind, dtype):
    """The C++ write (one call per layer) stores exactly what kv.quant.quantize + index_copy store:
    same codes, same scale words, at the given slots only; zero rows, tiny rows and outliers too."""
    g = torch.Generator().manual_seed(7)
    T, H, D, S = 37, 3, 64, 100
    x = (torch.randn(T, H, D, generator=g) * torch.rand(T, H, 1, generator=g) * 5)
    x[3, 1] = 0.0
    x[5, 2] = 1e-9           # below float16's smallest scale step: stored as zeros
    x[7, 0, 5] = 300.0       # one outlier
    x = x.to(dtype)
    fmt_codes, fmt_scales = quantize(x, kind)
    codes = torch.zeros(S, H, fmt_codes.shape[-1], dtype=fmt_codes.dtype)
    scales = torch.zeros(S, H, dtype=torch.float16)
    slots = torch.randperm(S, generator=g)[:T]
    cpu_quant_kernels.quantize_write(x, codes, scales, slots, kind)
    assert torch.equal(codes[slots].view(torch.uint8), fmt_codes.view(torch.uint8))
    assert torch.equal(scales[slots].view(torch.int16), fmt_scales.view(torch.int16))
    untouched = torch.ones(S, dtype=torch.bool)
    untouched[slots] = False
    assert not codes[untouched].view(torch.uint8).any() and not scales[untouched].any()


def test_quantize_write_refuses_a_slot_out_of_range():
    codes = torch.zeros(10, 2, 64, dtype=torch.int8)
    scales = torch.zeros(10, 2, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="slot out of range"):
        cpu_quant_kernels.quantize_write(torch.randn(1, 2, 64), codes, scales, torch.tensor([10]), "int8")



@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B,Hkv,G,D,bs", [(1, 1, 4, 256, 16), (6, 3, 3, 64, 16)])
def test_quant_decode_sliding_window(kind, B, Hkv, G, D, bs):
    """Keys [begins, lens) only, as in the unquantized kernel; blocks wholly before begins are not read."""
    q, kc, ks, vc, vs, table, lens = quant_case(B + bs + D, kind, B, Hkv, G, D, bs)
    begins = (lens * torch.tensor([0.1, 0.5, 0.9, 0.0, 0.7, 0.3])[:B]).long()
    begins[0] = max(0, int(lens[0]) - bs - 5)
    out = paged_decode_quant(q, kc, ks, vc, vs, table, lens, kind, begins)
    ref = paged_decode_quant_reference(q, kc, ks, vc, vs, table, lens, kind, begins)
    torch.testing.assert_close(out, ref, atol=3e-5, rtol=1e-4)
    for b in range(B):
        for j in range(int(begins[b]) // bs):
            ks[table[b, j]] = float("nan")
            vs[table[b, j]] = float("nan")
    torch.testing.assert_close(paged_decode_quant(q, kc, ks, vc, vs, table, lens, kind, begins), out)
