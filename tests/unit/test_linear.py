"""The quantized linear layers against a plain fp32 product, on random weights (no model needed)."""
import pytest
import torch

from kvserve.models.layers import Linear


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("quantization", ["w8a8", "w8a8-channel"])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_w8a8_follows_fp32_with_outlier_channels(rows, quantization):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 128, generator=g) * 0.05
    x = torch.randn(rows, 128, generator=g)
    x[:, 7] *= 60.0  # an outlier channel in every token, as in SmolLM2's activations
    x[-1] *= 1e-3  # and one token far smaller than the others
    ref = x @ w.T
    y = Linear(w, quantization)(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    # w8a8-channel: 7-bit weights, 8-bit per-token activations: ~1-3 % error here (the outlier sets each
    # token's step); w8a8, 8 bits per block of 32 after the rotation: ~0.5 %. A saturating int16 pair sum,
    # or one scale for the whole tensor, is far off (the small last row loses everything to a scale set
    # by the others)
    bound = 0.05 if quantization == "w8a8-channel" else 0.01
    assert rel_err(y, ref) < bound
    assert rel_err(y[-1:], ref[-1:]) < bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_kernel_and_dense_path_multiply_the_same_values(dtype):
    """w8a8: the C++ GEMV (1-2 rows) rotates and rounds x itself; past GEMV_MAX_ROWS the dequantized
    rotated weight multiplies ``w8a8_activations(x)``. Both give what the plain-PyTorch reference of the
    rotation and rounding gives (values of the rotated x, on an 8-bit grid per block of 32), and the
    rotation leaves the product as it was."""
    from kvserve.models import cpu_weight_kernels as k

    g = torch.Generator().manual_seed(5)
    w = torch.randn(80, 192, generator=g) * 0.05
    x = torch.randn(6, 192, generator=g)
    x[:, 70] *= 50  # an outlier channel: the rotation spreads it over channels 64-127
    x[2, 128:] = 0  # a group of zeros
    assert rel_err(k.hadamard_rotate(x) @ k.hadamard_rotate(w).T, x @ w.T) < 1e-6
    xr = k.w8a8_activations(x.to(dtype))
    ref = k.w8a8_activations_reference(x.to(dtype))
    assert xr.dtype == dtype and rel_err(xr.float(), ref.float()) < 1e-6
    codes = xr.float().reshape(6, -1, 32)  # the rotated x: 8-bit codes times a scale per block
    step = codes.abs().amax(-1, keepdim=True) / 127
    assert rel_err(codes, (codes / step.clamp(min=1e-30)).round() * step) < (1e-6 if dtype == torch.float32 else 5e-3)
    lin = Linear(w.to(dtype), "w8a8")  # the dense copy in the model's dtype
    few, many = lin(x[:2].to(dtype)), lin(x.to(dtype))  # the kernel, then the dense copy
    assert rel_err(few.float(), many[:2].float()) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert rel_err(many.float(), x @ w.T) < 0.01
    with pytest.raises(ValueError, match="multiple of 64"):
        Linear(torch.randn(8, 96), "w8a8")


def test_int8_weight_only_follows_fp32():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * 0.05
    lin = Linear(w, "int8")
    x = torch.randn(40, 96, generator=g)
    for rows in (1, 2, 3, 40):  # the C++ kernel, then the dequantized copy past GEMV_MAX_ROWS
        assert rel_err(lin(x[:rows]), x[:rows] @ w.T) < 0.01
    # both paths multiply by the same values: the kernel rounds x to 15 bits per block of 32, no more
    assert rel_err(lin(x[:2]), lin(x)[:2]) < 1e-4
    with pytest.raises(ValueError, match="multiple of 32"):
        Linear(torch.randn(8, 40), "int8")


def _q8_0_weight(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """A weight as a Q8_0 GGUF stores it: per 32 weights d * q, d float16, q in -127..127 with +-127 in
    every block (Q8_0's quantizer scales each block by its largest magnitude)."""
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.01 + 1e-3).half().float()
    q = torch.randint(-127, 128, (n, k // 32, 32), generator=g).float()
    q[..., 5] = 127 * torch.sign(torch.randn(n, k // 32, generator=g))
    return (d * q).reshape(n, k)


def test_int8_blocks_give_a_q8_0_weight_back():
    from kvserve.models.cpu_weight_kernels import dequantize_blocks, quantize_blocks

    w = _q8_0_weight(48, 128, torch.Generator().manual_seed(3))
    codes, scales = quantize_blocks(w)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == (48, 4)
    assert torch.equal(dequantize_blocks(codes, scales, torch.float32), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_int8_kernel_against_its_reference(rows, dtype):
    from kvserve.models import cpu_weight_kernels as k

    if not k.available():
        pytest.skip("C++ kernels not built")
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(200, 640, generator=g) * 0.05  # 200 rows: split over the threads unevenly
    x = torch.randn(rows, 640, generator=g)
    x[:, 3] *= 100  # an outlier channel: it sets its own block's step only
    x[-1, 64:96] = 0  # a block of zeros
    codes, scales = k.quantize_blocks(w)
    y = k.int8_block_mm(x.to(dtype), codes, scales)
    ref = k.int8_block_mm_reference(x.to(dtype).float(), codes, scales)
    assert y.dtype == dtype and y.shape == (rows, 200)
    assert rel_err(y.float(), ref) < (1e-4 if dtype == torch.float32 else 5e-3)
    # float_out (the LM head's logits): the fp32 sums themselves, not rounded to x's dtype
    y32 = k.int8_block_mm(x.to(dtype), codes, scales, float_out=True)
    assert y32.dtype == torch.float32 and rel_err(y32, ref) < 1e-4
    with pytest.raises(RuntimeError, match="1 to 4 rows"):
        k.int8_block_mm(torch.randn(5, 640), codes, scales)


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="quantization must be one of"):
        Linear(torch.randn(4, 4), "int3")


def _q4_1_weight(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """A weight as a Q4_1 GGUF stores it: per 32 weights d * q + m, q in 0..15 (spanning the range)."""
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.01 + 1e-3).half().float()  # float16 in the file
    m = (-8 * d + torch.randn(n, k // 32, 1, generator=g) * 1e-3).half().float()
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # Q4_1's min/max quantizer puts the group's extremes at 0 and 15
    return (d * q + m).reshape(n, k)


@pytest.mark.parametrize("rows", [1, 2, 3, 40])
def test_int4_gives_a_q4_1_weight_back(rows):
    """int4's codes, scales and minimums stand for exactly the Q4_1 values they came from, and both its
    paths compute x @ W.T: the C++ kernel up to GEMV_MAX_ROWS rows (x rounded to 15 bits per block of
    32), the dequantized matrix past them (fp32 rounding)."""
    from kvserve.models import cpu_weight_kernels

    g = torch.Generator().manual_seed(rows)
    w = _q4_1_weight(64, 96, g)
    codes, d, m = cpu_weight_kernels.quantize_q4_blocks(w)
    assert torch.equal(cpu_weight_kernels.dequantize_q4_blocks(codes, d, m, torch.float32), w)
    x = torch.randn(rows, 96, generator=g)
    y = Linear(w, "int4")(x)
    assert y.shape == (rows, 64) and y.dtype == torch.float32
    assert rel_err(y, x @ w.T) < (1e-4 if rows <= Linear.GEMV_MAX_ROWS else 1e-5)


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_matches_its_reference(rows, dtype):
    """The C++ int4 GEMV (Q4_1's nibble order, float16 scale and minimum per 32) against the dequantized
    weight in fp32, for every row count it takes, with fp32 logits on request (float_out)."""
    from kvserve.models import cpu_weight_kernels

    g = torch.Generator().manual_seed(10 + rows)
    w = torch.randn(200, 320, generator=g) * 0.05
    w[:, 7] *= 40  # an outlier input channel: its blocks get a wide range
    w[3, :32] = 0.25  # a constant block: d = 0, every code 0
    codes, d, m = cpu_weight_kernels.quantize_q4_blocks(w)
    ref_w = cpu_weight_kernels.dequantize_q4_blocks(codes, d, m, torch.float32)
    assert torch.equal(ref_w[3, :32], torch.full((32,), 0.25).half().float())
    x = torch.randn(rows, 320, generator=g).to(dtype)
    ref = x.float() @ ref_w.T
    out = cpu_weight_kernels.int4_block_mm(x, codes, d, m)
    assert out.dtype == dtype
    # x is rounded to 15 bits per block, and d sum q x + m sum x is two terms that partly cancel (codes
    # 0..15, m ~ -8 d): ~1e-4 of the result, against ~5e-2 for the 4-bit rounding of the weights
    assert rel_err(out.float(), ref) < (5e-4 if dtype == torch.float32 else 1e-2)
    full = cpu_weight_kernels.int4_block_mm(x, codes, d, m, float_out=True)
    assert full.dtype == torch.float32 and rel_err(full, ref) < 5e-4


def test_int4_on_any_weight_and_its_refusals():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=g)
    x = torch.randn(2, 64, generator=g)
    # 16 levels per 32 weights of a Gaussian row: ~8 % error per product, as any 4-bit format
    assert rel_err(Linear(w, "int4")(x), x @ w.T) < 0.12
    bf = Linear(w.bfloat16(), "int4")(x.bfloat16())  # a bf16 model: the kernel reads and writes bf16
    assert bf.dtype == torch.bfloat16 and rel_err(bf.float(), x @ w.T) < 0.12
    with pytest.raises(ValueError, match="multiple of 32"):
        Linear(torch.randn(8, 40), "int4")
