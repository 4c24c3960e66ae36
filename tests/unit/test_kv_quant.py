"""KV cache quantization: each row codec's round trip within the bound it promises, and the formats
built from them (no model)."""
import pytest
import torch

from kvserve.kv.quant import CODECS, KV_QUANT, codec, dequantize, kv_quant, quantize, scale_and_zero

KINDS = list(CODECS)  # the row codecs: int8, q4, q5, fp8_e4m3, fp8_e5m2


def data(seed: int, shape=(37, 3, 64), dtype=torch.float32) -> torch.Tensor:
    """Normal values of mixed magnitudes per row, an outlier channel, and a few huge single values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-2, 2, shape[0])[:, None, None]
    x[..., 5] *= 30  # keys have outlier channels
    x[3, 1, 7] = -5e3
    return x.to(dtype)


def test_registry_sizes():
    assert {k: c.packed_dim(64) for k, c in CODECS.items()} == {"int8": 64, "q4": 32, "q5": 40, "fp8_e4m3": 64, "fp8_e5m2": 64}
    # one token of one KV head, K and V: codes plus a 16-bit scale word each (bf16 cache: 256 bytes)
    assert {k: f.bytes_per_token_and_head(64) for k, f in KV_QUANT.items()} == \
        {"int8": 132, "int4": 76, "fp8_e4m3": 132, "fp8_e5m2": 132}
    assert (KV_QUANT["int4"].key.name, KV_QUANT["int4"].value.name) == ("q5", "q4")
    assert KV_QUANT["int4"].bytes_per_token_and_head(256) == 162 + 130
    assert kv_quant("int8") is KV_QUANT["int8"] and codec("q5") is CODECS["q5"]
    with pytest.raises(ValueError, match="int8"):
        kv_quant("int3")
    with pytest.raises(ValueError, match="q5"):
        codec("int4")  # a format, not a row codec
    with pytest.raises(ValueError):
        CODECS["q4"].packed_dim(63)
    with pytest.raises(ValueError):
        CODECS["q5"].packed_dim(56)  # fifth bits come in 16-value chunks


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_and_dtypes(kind, dtype):
    x = data(0, dtype=dtype)
    codes, scales = quantize(x, kind)
    c = CODECS[kind]
    assert codes.shape == (37, 3, c.packed_dim(64)) and codes.dtype == c.code_dtype
    assert scales.shape == (37, 3) and scales.dtype == torch.float16
    y = dequantize(codes, scales, kind, dtype)
    assert y.shape == x.shape and y.dtype == dtype and bool(torch.isfinite(y).all())
    # any leading shape: gathered blocks [B, L, Hkv, Dc] dequantize to [B, L, Hkv, D]
    blocks = codes[:36].view(2, 18, 3, -1)
    torch.testing.assert_close(dequantize(blocks, scales[:36].view(2, 18, 3), kind),
                               dequantize(codes, scales, kind)[:36].view(2, 18, 3, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_rounds_to_nearest(dtype):
    """|x - s * code| <= s / 2 for every element, s the stored float16 scale, and s >= absmax / 127
    (the scale is rounded up, so no code is clipped)."""
    x = data(1, dtype=dtype).float()
    codes, scales = quantize(x, "int8")
    s = scales.float()[..., None]
    err = (dequantize(codes, scales, "int8") - x).abs()
    assert bool((err <= s / 2 * (1 + 1e-5) + 1e-30).all())
    assert bool((s[..., 0] * 127 >= x.abs().amax(-1)).all())
    assert bool((s[..., 0] <= x.abs().amax(-1) / 127 * (1 + 2 ** -10)).all())  # one fp16 step at most


@pytest.mark.parametrize("kind", ["q4", "q5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_asymmetric_codecs_round_to_nearest(kind, dtype):
    """|x - s (q - zp)| <= s / 2, with s the scale word's scale: at least (max - min) / qmax over the row
    and its zero, and at most one step of a 5-bit mantissa above it."""
    x = data(1, dtype=dtype).float()
    codes, scales = quantize(x, kind)
    s, zp = scale_and_zero(scales, kind)
    c = CODECS[kind]
    span = x.amax(-1).clamp(min=0) - x.amin(-1).clamp(max=0)
    assert bool((s * c.qmax >= span).all()) and bool((s <= span / c.qmax * (1 + 2 ** -5)).all())
    assert bool(((zp >= 0) & (zp <= c.qmax)).all())
    err = (dequantize(codes, scales, kind) - x).abs()
    assert bool((err <= s[..., None] / 2 * (1 + 1e-5)).all())


def test_int8_codes_and_the_q4_q5_layouts():
    x = torch.tensor([[[127.0, -127.0, 63.4, 0.0, 2.0, -0.6, 1.0, 3.0]]])  # absmax 127
    codes, scales = quantize(x, "int8")
    assert scales.item() == 1.0 and codes.tolist() == [[[127, -127, 63, 0, 2, -1, 1, 3]]]
    # q4: min -7, max 8 -> scale 1, zero point 7, code = x + 7; element 2j in the low nibble
    x4 = torch.tensor([[[8.0, -7.0, 1.0, 0.0, -3.0, 2.0, 6.0, -1.0]]])
    codes, scales = quantize(x4, "q4")
    assert codes.tolist() == [[[15 | 0 << 4, 8 | 7 << 4, 4 | 9 << 4, 13 | 6 << 4]]]
    assert scales.view(torch.int16).item() == 0x3C00 | 7  # float16 1.0, zero point in the low 5 bits
    torch.testing.assert_close(dequantize(codes, scales, "q4"), x4)
    # q5: 32 values, min -15, max 16 -> scale 1, zero point 15, code = x + 15 in [0, 31]. The fifth bits:
    # in the first 16 values the even elements have it and the odd ones not; in the next 16 the reverse
    q = torch.zeros(32, dtype=torch.long)
    q[0:16:2], q[1:16:2] = torch.arange(16, 32, 2), torch.arange(1, 16, 2)
    q[16::2], q[17::2] = torch.arange(0, 16, 2), torch.arange(17, 32, 2)
    x5 = (q - 15).float().view(1, 1, 32)
    codes, scales = quantize(x5, "q5")
    assert scales.view(torch.int16).item() == 0x3C00 | 15
    nib = q & 15
    assert codes[0, 0, :16].tolist() == (nib[0::2] | nib[1::2] << 4).tolist()
    assert codes[0, 0, 16:].tolist() == [0xFF, 0x00, 0x00, 0xFF]  # (chunk 0: evens, odds), (chunk 1: ...)
    torch.testing.assert_close(dequantize(codes, scales, "q5"), x5)


@pytest.mark.parametrize("kind,rel,sub", [("fp8_e4m3", 2.0 ** -4, 2.0 ** -10), ("fp8_e5m2", 2.0 ** -3, 2.0 ** -17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_relative_error(kind, rel, sub, dtype):
    """Each value within the format's relative rounding (2^-4 for 3 mantissa bits, 2^-3 for 2) of the
    scaled value, or half the format's smallest subnormal step (times the scale) near zero."""
    x = data(2, dtype=dtype).float()
    codes, scales = quantize(x, kind)
    s = scales.float()[..., None]
    err = (dequantize(codes, scales, kind) - x).abs()
    assert bool((err <= rel * x.abs() * (1 + 1e-3) + sub * s).all())
    # the largest value of each row lands on (or next to) the format's max: the scale uses the range.
    # (Not for rows so small that their scale is a float16 subnormal, whose steps are coarser.)
    normal = s[..., 0] >= 2.0 ** -14
    assert bool(((x / s).abs().amax(-1) >= CODECS[kind].qmax * (1 - 2 ** -10))[normal].all())


@pytest.mark.parametrize("kind", KINDS)
def test_zeros_and_tiny_rows_dequantize_to_zero_not_nan(kind):
    x = torch.zeros(4, 2, 64)
    x[1, 0] = 1e-12  # below float16's smallest scale: stored as zeros
    x[2, 1, 3] = 1.0
    codes, scales = quantize(x, kind)
    assert scales[0].tolist() == [0.0, 0.0]
    y = dequantize(codes, scales, kind)
    assert bool(torch.isfinite(y).all())
    assert y[0].abs().max() == 0 and y[1].abs().max() == 0
    s, _ = scale_and_zero(scales, kind)
    if CODECS[kind].asym:  # 16 or 32 levels over [0, 1]: within half a step
        assert abs(y[2, 1, 3].item() - 1.0) <= s[2, 1].item() / 2
    else:  # (e5m2's scale, 1 / 57344, is a float16 subnormal: rounded up by up to 0.35 %, inside e5m2's 2^-3)
        assert y[2, 1, 3].item() == pytest.approx(1.0, rel=4e-3)
    # a freshly zeroed block (codes 0, scales 0) reads as zeros too, in every codec
    zc = torch.zeros(2, CODECS[kind].packed_dim(64), dtype=torch.uint8).view(CODECS[kind].code_dtype)
    assert dequantize(zc, torch.zeros(2, dtype=torch.float16), kind).abs().max() == 0


def test_error_ordering_on_random_data():
    """Relative RMS error: int8 < fp8 e4m3 < q5 < fp8 e5m2 < q4 on normal data, and every codec is useful."""
    x = torch.randn(512, 3, 64, generator=torch.Generator().manual_seed(3))
    err = {k: float((dequantize(*quantize(x, k), k) - x).norm() / x.norm()) for k in KINDS}
    assert err["int8"] < err["fp8_e4m3"] < err["q5"] < err["fp8_e5m2"] < err["q4"] < 0.2, err
    assert err["int8"] < 0.01, err


@pytest.mark.parametrize("kind", list(KV_QUANT))
def test_storage_moves_codes_and_scales_together(kind):
    """A quantized KVCache: write quantizes, read dequantizes, and copy-on-write, swap out / in and
    first-use zeroing move the scales with the codes (one slot order for both)."""
    from kvserve.kv.spec import KVSpec, LayerKVSpec, KVCacheGroup
    from kvserve.kv.storage import KVCache

    spec = KVSpec((KVCacheGroup(LayerKVSpec(2, 64, torch.float32, quant=kind), (0, 1)),))
    kv = KVCache(spec, num_blocks=6, block_size=4)
    assert kv.nbytes == 6 * 4 * spec.bytes_per_token and kv.k_scale.dtype == torch.float16
    kv.zero_new([1, 2, 3])
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(4, 2, 64, generator=g) * 3, torch.randn(4, 2, 64, generator=g)
    slots = torch.arange(4, 8)  # block 1
    kv.write(1, k, v, slots)
    rk, rv = kv.read(1, slice(4, 8))
    r = kv.rotation  # int4 and fp8: stored rotated, read back turned
    assert (r is not None) == (kind != "int8")
    f = KV_QUANT[kind]
    assert kv.k.shape[-1] == f.key.packed_dim(64) and kv.v.shape[-1] == f.value.packed_dim(64)
    want = [dequantize(*quantize(x, c), c) if r is None else dequantize(*quantize(x @ r, c), c) @ r
            for x, c in ((k, f.key), (v, f.value))]
    assert torch.equal(rk, want[0]) and torch.equal(rv, want[1])
    kv.copy_block(1, 2)  # copy-on-write
    assert [torch.equal(a, b) for a, b in zip(kv.read(1, slice(8, 12)), want)] == [True, True]
    saved = kv.copy_out([1])  # swap out, the block reused and overwritten, swap in elsewhere
    assert len(saved) == 4
    kv.write(1, -k, -v, slots)
    kv.copy_in([3], saved)
    assert [torch.equal(a, b) for a, b in zip(kv.read(1, slice(12, 16)), want)] == [True, True]
    # the gathered read (block table + width) of a prefill chunk dequantizes the same values
    gk, _ = kv.read(1, (torch.tensor([[3, 0]]), 4))
    assert torch.equal(gk[0], want[0])
    kv.zero_new([4])  # a fresh block reads as zeros (codes 0, scales 0), never NaN
    assert kv.read(0, slice(16, 20))[0].abs().max() == 0
    # prefault (a server's idle time, a benchmark's warm-up): the never-used block zeroed, codes and
    # scales, and counted as zeroed, so its first allocation no longer clears what it holds; the blocks
    # in use (1-4) keep theirs
    for t in kv.tensors:  # garbage bytes in block 5, never handed out
        t[:, 20:24].view(torch.uint8).fill_(0x7F)
    assert kv.touched_bytes == 5 * kv.nbytes // 6
    assert kv.prefault() is False and kv.touched_bytes == kv.nbytes
    assert all(t[:, 20:24].view(torch.uint8).max() == 0 for t in kv.tensors)
    assert [torch.equal(a, b) for a, b in zip(kv.read(1, slice(12, 16)), want)] == [True, True]
    kv.write(1, k, v, torch.arange(20, 24))
    kv.zero_new([5])
    assert torch.equal(kv.read(1, slice(20, 24))[0], want[0])


def test_prefault_in_slices_zeroes_only_never_used_blocks():
    """``prefault(max_bytes)``: about that many bytes of never-used blocks per call, lowest ids first,
    True while some remain; a block in use keeps its K/V, and one zeroed later is not zeroed again."""
    from kvserve.kv.spec import KVSpec, LayerKVSpec, KVCacheGroup
    from kvserve.kv.storage import KVCache

    spec = KVSpec((KVCacheGroup(LayerKVSpec(2, 8, torch.float32), (0, 1, 2)),))
    kv = KVCache(spec, num_blocks=10, block_size=4)
    per_block = kv.nbytes // 10
    for t in kv.tensors:
        t[:, 4:].fill_(float("nan"))  # what fresh memory may hold
    kv.zero_new([3])
    kv.write(2, torch.ones(4, 2, 8), torch.full((4, 2, 8), 2.0), torch.arange(12, 16))  # block 3 in use
    assert kv.prefault(max_bytes=3 * per_block) is True  # blocks 1, 2, 4
    done = lambda b: all(t[:, 4 * b : 4 * b + 4].eq(0).all() for t in kv.tensors)  # noqa: E731
    assert [done(b) for b in range(10)] == [True, True, True, False, True, False, False, False, False, False]
    assert kv.touched_bytes == 5 * per_block
    assert kv.prefault(max_bytes=1) is True  # at least one block a call: block 5
    assert kv.prefault(max_bytes=100 * per_block) is False  # the rest
    assert all(done(b) for b in range(10) if b != 3) and kv.touched_bytes == kv.nbytes
    k, v = kv.read(2, slice(12, 16))
    assert k.eq(1).all() and v.eq(2).all()
    assert kv.prefault() is False  # nothing left: a no-op


def test_hadamard_rotation_is_orthogonal_and_helps_outlier_channels():
    from kvserve.kv.quant import hadamard

    h = hadamard(64)
    torch.testing.assert_close(h @ h, torch.eye(64), atol=1e-6, rtol=0)  # symmetric and orthogonal
    with pytest.raises(ValueError, match="power-of-2"):
        hadamard(48)
    x = data(4)  # rows with an outlier channel
    plain = (dequantize(*quantize(x, "q4"), "q4") - x).norm() / x.norm()
    rotated = (dequantize(*quantize(x @ h, "q4"), "q4") @ h - x).norm() / x.norm()
    assert rotated < 0.7 * plain, (float(rotated), float(plain))
