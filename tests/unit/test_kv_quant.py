"""KV cache quantization formats: each round trip within the bound its format promises (no model)."""
import pytest
import torch

from kvserve.kv.quant import KV_QUANT, dequantize, kv_quant, kv_quant_of, quantize

KINDS = list(KV_QUANT)


def data(seed: int, shape=(37, 3, 64), dtype=torch.float32) -> torch.Tensor:
    """Normal values of mixed magnitudes per row, an outlier channel, and a few huge single values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-2, 2, shape[0])[:, None, None]
    x[..., 5] *= 30  # keys have outlier channels
    x[3, 1, 7] = -5e3
    return x.to(dtype)


def test_registry_sizes():
    assert [f.packed_dim(64) for f in KV_QUANT.values()] == [64, 32, 64, 64]
    # one token of one head: the codes plus a float16 scale (fp16 cache: 128 bytes)
    assert {k: f.bytes_per_value_and_scale(64) for k, f in KV_QUANT.items()} == \
        {"int8": 66, "int4": 34, "fp8_e4m3": 66, "fp8_e5m2": 66}
    assert KV_QUANT["int4"].bytes_per_value_and_scale(256) == 130
    assert kv_quant_of(torch.uint8) is KV_QUANT["int4"] and kv_quant("int8") is KV_QUANT["int8"]
    with pytest.raises(ValueError, match="int8"):
        kv_quant("int3")
    with pytest.raises(ValueError):
        KV_QUANT["int4"].packed_dim(63)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_and_dtypes(kind, dtype):
    x = data(0, dtype=dtype)
    codes, scales = quantize(x, kind)
    f = KV_QUANT[kind]
    assert codes.shape == (37, 3, f.packed_dim(64)) and codes.dtype == f.code_dtype
    assert scales.shape == (37, 3) and scales.dtype == torch.float16
    y = dequantize(codes, scales, dtype)
    assert y.shape == x.shape and y.dtype == dtype and bool(torch.isfinite(y).all())
    # any leading shape: gathered blocks [B, L, Hkv, Dc] dequantize to [B, L, Hkv, D]
    blocks = codes[:36].view(2, 18, 3, -1)
    torch.testing.assert_close(dequantize(blocks, scales[:36].view(2, 18, 3)), dequantize(codes, scales)[:36].view(2, 18, 3, 64))


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_integer_formats_round_to_nearest(kind, dtype):
    """|x - s * code| <= s / 2 for every element, s the stored float16 scale, and s >= absmax / qmax
    (the scale is rounded up, so no code is ever clamped)."""
    x = data(1, dtype=dtype).float()
    codes, scales = quantize(x, kind)
    s = scales.float()
    err = (dequantize(codes, scales) - x).abs()
    assert bool((err <= s[..., None] / 2 * (1 + 1e-5) + 1e-30).all()), float((err / s[..., None]).max())
    assert bool((s * KV_QUANT[kind].qmax >= x.abs().amax(-1)).all())
    assert bool((s <= x.abs().amax(-1) / KV_QUANT[kind].qmax * (1 + 2 ** -10)).all())  # one fp16 step at most


def test_int8_codes_and_int4_nibble_order():
    x = torch.tensor([[[127.0, -127.0, 63.4, 0.0, 2.0, -0.6, 1.0, 3.0]]])  # absmax 127
    codes, scales = quantize(x, "int8")
    assert scales.item() == 1.0 and codes.tolist() == [[[127, -127, 63, 0, 2, -1, 1, 3]]]
    x4 = torch.tensor([[[7.0, -7.0, 1.0, 0.0, -3.0, 2.0, 6.0, -1.0]]])  # absmax 7 -> scale 1
    codes, scales = quantize(x4, "int4")
    # element 2j in the low nibble, 2j+1 in the high one, each stored as q + 8
    assert codes.tolist() == [[[(7 + 8) | (-7 + 8) << 4, (1 + 8) | (0 + 8) << 4, (-3 + 8) | (2 + 8) << 4,
                                (6 + 8) | (-1 + 8) << 4]]]
    torch.testing.assert_close(dequantize(codes, scales), x4)


@pytest.mark.parametrize("kind,rel,sub", [("fp8_e4m3", 2.0 ** -4, 2.0 ** -10), ("fp8_e5m2", 2.0 ** -3, 2.0 ** -17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_relative_error(kind, rel, sub, dtype):
    """Each value within the format's relative rounding (2^-4 for 3 mantissa bits, 2^-3 for 2) of the
    scaled value, or half the format's smallest subnormal step (times the scale) near zero."""
    x = data(2, dtype=dtype).float()
    codes, scales = quantize(x, kind)
    s = scales.float()[..., None]
    err = (dequantize(codes, scales) - x).abs()
    assert bool((err <= rel * x.abs() * (1 + 1e-3) + sub * s).all())
    # the largest value of each row lands on (or next to) the format's max: the scale uses the range.
    # (Not for rows so small that their scale is a float16 subnormal, whose steps are coarser.)
    normal = s[..., 0] >= 2.0 ** -14
    assert bool(((x / s).abs().amax(-1) >= KV_QUANT[kind].qmax * (1 - 2 ** -10))[normal].all())


@pytest.mark.parametrize("kind", KINDS)
def test_zeros_and_tiny_rows_dequantize_to_zero_not_nan(kind):
    x = torch.zeros(4, 2, 64)
    x[1, 0] = 1e-12  # below float16's smallest scale: stored as zeros
    x[2, 1, 3] = 1.0
    codes, scales = quantize(x, kind)
    assert scales[0].tolist() == [0.0, 0.0] and scales[1, 0].item() == 0.0
    y = dequantize(codes, scales)
    assert bool(torch.isfinite(y).all())
    assert y[0].abs().max() == 0 and y[1].abs().max() == 0
    # (e5m2's scale, 1 / 57344, is a float16 subnormal: rounded up by up to 0.35 %, far inside e5m2's 2^-3)
    assert y[2, 1, 3].item() == pytest.approx(1.0, rel=4e-3)
    # a freshly zeroed block (codes 0, scales 0) reads as zeros too, in every format
    zc = torch.zeros(2, 64 // KV_QUANT[kind].values_per_byte, dtype=torch.uint8).view(KV_QUANT[kind].code_dtype)
    assert dequantize(zc, torch.zeros(2, dtype=torch.float16)).abs().max() == 0


def test_error_ordering_on_random_data():
    """Relative RMS error: int8 < fp8 e4m3 < fp8 e5m2 < int4 on normal data, and every format is useful."""
    x = torch.randn(512, 3, 64, generator=torch.Generator().manual_seed(3))
    err = {k: float((dequantize(*quantize(x, k)) - x).norm() / x.norm()) for k in KINDS}
    assert err["int8"] < err["fp8_e4m3"] < err["fp8_e5m2"] < err["int4"] < 0.2, err
    assert err["int8"] < 0.01, err


@pytest.mark.parametrize("kind", KINDS)
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
    want = [dequantize(*quantize(x, kind)) if r is None else dequantize(*quantize(x @ r, kind)) @ r for x in (k, v)]
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


def test_hadamard_rotation_is_orthogonal_and_helps_outlier_channels():
    from kvserve.kv.quant import hadamard

    h = hadamard(64)
    torch.testing.assert_close(h @ h, torch.eye(64), atol=1e-6, rtol=0)  # symmetric and orthogonal
    with pytest.raises(ValueError, match="power-of-2"):
        hadamard(48)
    x = data(4)  # rows with an outlier channel
    plain = (dequantize(*quantize(x, "int4")) - x).norm() / x.norm()
    rotated = (dequantize(*quantize(x @ h, "int4")) @ h - x).norm() / x.norm()
    assert rotated < 0.7 * plain, (float(rotated), float(plain))
