"""The quantized linear layers against a plain fp32 product, on random weights (no model needed)."""
import pytest
import torch

from kvserve.models.layers import Linear


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_w8a8_follows_fp32_with_outlier_channels(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 128, generator=g) * 0.05
    x = torch.randn(rows, 128, generator=g)
    x[:, 7] *= 60.0  # an outlier channel in every token, as in SmolLM2's activations
    x[-1] *= 1e-3  # and one token far smaller than the others
    ref = x @ w.T
    y = Linear(w, "w8a8")(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    # 7-bit weights, 8-bit per-token activations: ~1-3 % error here (the outlier sets each token's
    # step); a saturating int16 pair sum, or one scale for the whole tensor, is far off (the small last
    # row loses everything to a scale set by the others)
    assert rel_err(y, ref) < 0.05
    assert rel_err(y[-1:], ref[-1:]) < 0.05


def test_int8_weight_only_follows_fp32():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * 0.05
    for rows in (3, 40):  # the int8 kernel, then the dequantize path above INT8_MAX_ROWS
        x = torch.randn(rows, 96, generator=g)
        assert rel_err(Linear(w, "int8")(x), x @ w.T) < 0.02


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="quantization must be one of"):
        Linear(torch.randn(4, 4), "int4")
