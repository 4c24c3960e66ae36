"""Quantized KV cache: the formats, and quantize / dequantize in plain PyTorch (any device).

One scale per token and per KV head (vLLM's per-token-head), float16, written with the codes. Scales
live in their own tensor in the same slot order as the codes, so whatever moves a slot moves its scale:

    codes  [num_slots, Hkv, Dc]   Dc = D (int8, fp8) or D / 2 (int4: two values per byte)
    scales [num_slots, Hkv]       float16
    viewed per block: codes [num_blocks, block_size, Hkv, Dc], scales [num_blocks, block_size, Hkv]

    int8      code = round(x / s) in [-127, 127]              s = absmax / 127
    int4      q = round(x / s) in [-7, 7], stored as q + 8;   s = absmax / 7
              byte j of a row = (q[2j] + 8) | (q[2j + 1] + 8) << 4   (element 2j in the low nibble)
    fp8_e4m3  code = float8_e4m3fn(x / s)                      s = absmax / 448
    fp8_e5m2  code = float8_e5m2(x / s)                        s = absmax / 57344
    x ~= s * value(code)

The scale is rounded to float16 *before* the codes are computed (and up, never down), so the codes are
those of the stored scale and x / s never leaves the code range: every element is within the format's
rounding of its value (int: s / 2; fp8: 2^-4 or 2^-3 relative, or half the format's subnormal step).
A head row of zeros (or an absmax below float16's smallest scale, ~1e-7 * qmax) gets scale 0 and codes
0: it dequantizes to zeros, never NaN; so does a freshly zeroed block (codes 0, scales 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVQuant:
    """One KV cache format: how a head row of ``head_dim`` values is stored."""

    name: str
    code_dtype: torch.dtype      # element type of the codes tensor
    values_per_byte: int         # 2 for int4 (two nibbles per byte), else 1
    qmax: float                  # largest code magnitude: scale = absmax / qmax
    scale_dtype: torch.dtype = torch.float16
    # Store K and V rotated by a Hadamard matrix (``hadamard``): see ``rotation``.
    rotate: bool = False

    @property
    def is_float(self) -> bool:
        return self.code_dtype in (torch.float8_e4m3fn, torch.float8_e5m2)

    def packed_dim(self, head_dim: int) -> int:
        """Dc: code elements per head row."""
        if head_dim % self.values_per_byte:
            raise ValueError(f"{self.name}: head_dim {head_dim} must be a multiple of {self.values_per_byte}")
        return head_dim // self.values_per_byte

    def bytes_per_value_and_scale(self, head_dim: int) -> int:
        """Bytes for one token of one KV head (K or V alone), its scale included."""
        return self.packed_dim(head_dim) * self.code_dtype.itemsize + self.scale_dtype.itemsize


KV_QUANT: dict[str, KVQuant] = {
    "int8": KVQuant("int8", torch.int8, 1, 127.0),
    "int4": KVQuant("int4", torch.uint8, 2, 7.0, rotate=True),
    "fp8_e4m3": KVQuant("fp8_e4m3", torch.float8_e4m3fn, 1, torch.finfo(torch.float8_e4m3fn).max, rotate=True),  # 448
    "fp8_e5m2": KVQuant("fp8_e5m2", torch.float8_e5m2, 1, torch.finfo(torch.float8_e5m2).max, rotate=True),  # 57344
}
_BY_CODE_DTYPE = {f.code_dtype: f for f in KV_QUANT.values()}


def kv_quant(kind: str | KVQuant) -> KVQuant:
    """The format named ``kind`` (or ``kind`` itself), with a message that lists the choices."""
    if isinstance(kind, KVQuant):
        return kind
    if kind not in KV_QUANT:
        raise ValueError(f"unknown KV cache quantization {kind!r}; choose one of {sorted(KV_QUANT)}")
    return KV_QUANT[kind]


def kv_quant_of(codes_dtype: torch.dtype) -> KVQuant:
    """The format whose codes have this dtype (each format has its own)."""
    if codes_dtype not in _BY_CODE_DTYPE:
        raise ValueError(f"{codes_dtype} is not a KV code dtype ({[str(d) for d in _BY_CODE_DTYPE]})")
    return _BY_CODE_DTYPE[codes_dtype]


def hadamard(n: int) -> torch.Tensor:
    """The n x n Hadamard matrix / sqrt(n) (Sylvester's construction, n a power of 2): orthogonal and
    symmetric, so it is its own inverse."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-2 size, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def rotation(fmt: KVQuant, head_dim: int) -> torch.Tensor | None:
    """The rotation a format stores K and V under, or None.

    Why int4 and fp8 rotate: one scale per token and head must cover SmolLM2's key outlier channels (a
    few of the 64 are ~10x the rest), so in 4 bits the ordinary channels round to 0 or 1, and in fp8
    they fall to the format's coarse small values. Rotated, every channel holds a mix of all of them and
    the row's absmax drops toward its RMS. Measured perplexity change at 4k context (fp32 model): int4
    +37 % -> +11 %, fp8_e4m3 +1.16 % -> +0.44 %, fp8_e5m2 +5.0 % -> +2.0 %; int8 +0.18 % -> +0.02 %,
    not worth four more matmuls per layer and step (docs/kv_quantization.md). Attention does not change: with the same orthogonal R on
    q and k, (q R) . (k R) = q . k; with V stored rotated, the output comes out rotated and is turned
    back once (o = (p V R) R^T). QuaRot / SpinQuant use the same identity."""
    if not fmt.rotate or head_dim & (head_dim - 1):
        return None
    return hadamard(head_dim)


def _scales(x: torch.Tensor, fmt: KVQuant) -> torch.Tensor:
    """absmax / qmax per head row, as float16 rounded up (so that |x| / scale <= qmax always holds)."""
    amax = x.abs().amax(dim=-1)                                   # [..., Hkv] fp32
    ideal = amax / fmt.qmax
    s16 = ideal.to(torch.float16)
    # nearest-rounding may have gone down: one float16 step up. A scale that rounds to 0 stays 0 (the
    # row is below float16's smallest step times qmax: it is stored as zeros).
    low = (s16.float() < ideal) & (s16 > 0) & (s16 < torch.finfo(torch.float16).max)
    # (a positive float16's bit pattern plus one is the next float16 up: no nextafter kernel needed)
    s16 = torch.where(low, (s16.view(torch.int16) + 1).view(torch.float16), s16)
    return s16


def quantize(x: torch.Tensor, kind: str | KVQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[..., Hkv, D]`` (any float dtype) -> codes ``[..., Hkv, Dc]``, scales ``[..., Hkv]`` float16."""
    fmt = kv_quant(kind)
    D = x.shape[-1]
    fmt.packed_dim(D)  # checks the divisibility
    xf = x.float()
    scale = _scales(xf, fmt)                                      # [..., Hkv] fp16
    sf = scale.float().unsqueeze(-1)
    # scale 0 only when every |x| is below float16's smallest step: those rows store zeros.
    y = torch.where(sf > 0, xf / torch.where(sf > 0, sf, 1.0), 0.0)  # [..., Hkv, D], |y| <= qmax
    y = y.clamp(-fmt.qmax, fmt.qmax)                              # float rounding only; fp8 casts past max are NaN on GPUs
    if fmt.name == "int8":
        codes = y.round().to(torch.int8)
    elif fmt.name == "int4":
        u = (y.round() + 8).to(torch.uint8).unflatten(-1, (D // 2, 2))  # [..., Dc, 2] in [1, 15]
        codes = u[..., 0] | (u[..., 1] << 4)
    else:
        codes = y.to(fmt.code_dtype)
    return codes.contiguous(), scale


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes ``[..., Hkv, Dc]`` + scales ``[..., Hkv]`` -> ``[..., Hkv, D]`` in ``dtype`` (the format is
    the codes' dtype: int8, uint8 = int4, float8_e4m3fn, float8_e5m2). Computed in fp32, then cast."""
    fmt = kv_quant_of(codes.dtype)
    if fmt.name == "int4":
        lo = (codes & 15).to(torch.int8) - 8
        hi = (codes >> 4).to(torch.int8) - 8
        vals = torch.stack((lo, hi), dim=-1).flatten(-2).float()  # element 2j low nibble, 2j+1 high
    else:
        vals = codes.float()
    return (vals * scales.float().unsqueeze(-1)).to(dtype)
