"""Quantized KV cache: the formats, and quantize / dequantize in plain PyTorch (any device).

Each head row of K or V (``head_dim`` values of one token and KV head) is stored as codes plus one
16-bit scale, written with the codes. Scales live in their own tensor in the same slot order as the
codes, so whatever moves a slot moves its scale:

    codes  [num_slots, Hkv, Dc]   Dc: code bytes per row (below)
    scales [num_slots, Hkv]       float16 (bit patterns, for the asymmetric codecs)
    viewed per block: codes [num_blocks, block_size, Hkv, Dc], scales [num_blocks, block_size, Hkv]

A format (``KVQuant``) names one row codec for K and one for V:

    format     K codec  V codec   bytes per row of 64 (K + V)   vs bf16 (256)
    int8       int8     int8      66 + 66                       0.516x
    int4       q5       q4        42 + 34                       0.297x   (4.75 bits per value)
    fp8_e4m3   e4m3     e4m3      66 + 66                       0.516x
    fp8_e5m2   e5m2     e5m2      66 + 66                       0.516x

Symmetric codecs (one scale, code 0 is 0):

    int8      code = round(x / s) in [-127, 127]              s = absmax / 127
    fp8_e4m3  code = float8_e4m3fn(x / s)                      s = absmax / 448
    fp8_e5m2  code = float8_e5m2(x / s)                        s = absmax / 57344
    x ~= s * value(code)

Asymmetric codecs with an integer zero point (q4: 16 levels, q5: 32), for the int4 format:

    s = (max(x, 0) - min(x, 0)) / (levels - 1),  zp = round(-min(x, 0) / s),  q = round(x / s) + zp
    x ~= s * (q - zp)
    the 16-bit scale word: s as a float16 whose 5 lowest mantissa bits are cleared, OR zp (0..31)
    q4 row: byte j = q[2j] | q[2j + 1] << 4                     (element 2j in the low nibble)
    q5 row: the q4 bytes of (q & 15), then per 16 values two bytes of fifth bits: bit k of the first
            is element 2k's, of the second element 2k + 1's (the kernel's [evens | odds] order)

Why the int4 format is not 4 bits everywhere: measured through the cache (``kvserve ppl``, 64-token
chunks, bf16 SmolLM2, 8,192 tokens of ``pydoc_data.topics``; docs/kv_quantization.md), K and V in
4 bits with one symmetric scale per row cost +11.1 % perplexity; the best pure 4-bit layouts that fit
0.30x the bytes (groups of 16 or 32 with zero points, key means subtracted) +3.5-4.2 %. Keys carry nearly
all of the error; giving them a fifth bit and a zero point, and values a zero point, costs +2.0 % at
0.297x. The zero point costs nothing: it shares the scale's 16 bits, whose lowest 5 mantissa bits (a
0.8-1.6 % coarser scale) are worth far less than the zero point (q5 with a float16 scale and a float
zero: +2.6 %; with the integer zero point: +1.9 %).

Each scale is rounded *up* to what it can store before the codes are computed, so x / s never leaves
the code range: every element is within the codec's rounding of its value (int: s / 2; fp8: 2^-4 or
2^-3 relative, or half the format's subnormal step). A head row of zeros (or, in a symmetric codec, one
below float16's smallest scale; an asymmetric one takes the smallest scale it can store) gets scale 0 and
codes 0: it dequantizes to zeros, never NaN; so does a freshly zeroed block (codes 0, scales 0) in every
codec.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ZP_BITS = 5  # the asymmetric codecs' zero point: the scale word's lowest bits
ZP_MASK = (1 << ZP_BITS) - 1


@dataclass(frozen=True)
class RowCodec:
    """How one head row of K or V is stored: codes and one 16-bit scale word."""

    name: str                # "int8" | "q4" | "q5" | "fp8_e4m3" | "fp8_e5m2"
    code_dtype: torch.dtype  # element type of the codes tensor
    bits: int                # bits per value
    qmax: float              # symmetric: largest code magnitude (s = absmax / qmax); asymmetric: levels - 1
    asym: bool = False       # an integer zero point in the scale word's low bits

    @property
    def is_float(self) -> bool:
        return self.code_dtype in (torch.float8_e4m3fn, torch.float8_e5m2)

    def packed_dim(self, head_dim: int) -> int:
        """Dc: code elements (bytes) per head row."""
        step = {4: 2, 5: 16}.get(self.bits, 1)  # two values per byte; q5's fifth bits in 16-value chunks
        if head_dim % step:
            raise ValueError(f"{self.name}: head_dim {head_dim} must be a multiple of {step}")
        return head_dim * self.bits // 8

    def row_bytes(self, head_dim: int) -> int:
        """Bytes for one token of one KV head, its scale word included."""
        return self.packed_dim(head_dim) * self.code_dtype.itemsize + 2


CODECS: dict[str, RowCodec] = {c.name: c for c in (
    RowCodec("int8", torch.int8, 8, 127.0),
    RowCodec("q4", torch.uint8, 4, 15.0, asym=True),
    RowCodec("q5", torch.uint8, 5, 31.0, asym=True),
    RowCodec("fp8_e4m3", torch.float8_e4m3fn, 8, torch.finfo(torch.float8_e4m3fn).max),  # 448
    RowCodec("fp8_e5m2", torch.float8_e5m2, 8, torch.finfo(torch.float8_e5m2).max),  # 57344
)}


def _named(kind, table: dict, what: str):
    """``kind`` itself, or the entry of ``table`` it names, with a message that lists the choices."""
    if not isinstance(kind, str):
        return kind
    if kind not in table:
        raise ValueError(f"unknown {what} {kind!r}; choose one of {sorted(table)}")
    return table[kind]


def codec(kind: str | RowCodec) -> RowCodec:
    return _named(kind, CODECS, "KV row codec")


@dataclass(frozen=True)
class KVQuant:
    """One KV cache format: the codec of K's rows and of V's."""

    name: str
    key: RowCodec
    value: RowCodec
    # Store K and V rotated by a Hadamard matrix (``hadamard``): see ``rotation``.
    rotate: bool = False
    scale_dtype: torch.dtype = torch.float16

    def bytes_per_token_and_head(self, head_dim: int) -> int:
        """K and V of one token of one KV head, scales included."""
        return self.key.row_bytes(head_dim) + self.value.row_bytes(head_dim)


KV_QUANT: dict[str, KVQuant] = {
    "int8": KVQuant("int8", CODECS["int8"], CODECS["int8"]),
    "int4": KVQuant("int4", CODECS["q5"], CODECS["q4"], rotate=True),
    "fp8_e4m3": KVQuant("fp8_e4m3", CODECS["fp8_e4m3"], CODECS["fp8_e4m3"], rotate=True),
    "fp8_e5m2": KVQuant("fp8_e5m2", CODECS["fp8_e5m2"], CODECS["fp8_e5m2"], rotate=True),
}


def kv_quant(kind: str | KVQuant) -> KVQuant:
    return _named(kind, KV_QUANT, "KV cache quantization")


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


def _round_up_f16(ideal: torch.Tensor, clear_bits: int = 0) -> torch.Tensor:
    """``ideal`` (fp32, >= 0) as float16 bit patterns (int16) with the ``clear_bits`` lowest mantissa bits
    zero, rounded up: the stored scale is never below the ideal one, so x / scale stays in the code range.
    A scale that rounds to 0 stays 0 (the row is below float16's smallest step: it is stored as zeros)."""
    bits = ideal.to(torch.float16).view(torch.int16).int() & ~((1 << clear_bits) - 1)
    top = 0x7BFF & ~((1 << clear_bits) - 1)  # the largest finite float16 of that form
    # (a positive float16's bit pattern plus one step is the next float16 up: no nextafter kernel needed)
    low = (bits.short().view(torch.float16).float() < ideal) & (bits < top) & ((bits > 0) | (clear_bits > 0))
    return torch.where(low, bits + (1 << clear_bits), bits).short()


def quantize(x: torch.Tensor, kind: str | RowCodec) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[..., Hkv, D]`` (any float dtype) -> codes ``[..., Hkv, Dc]``, scales ``[..., Hkv]`` float16
    (for q4 / q5: the scale word's bit pattern, viewed as float16)."""
    c = codec(kind)
    D = x.shape[-1]
    c.packed_dim(D)  # checks the divisibility
    xf = x.float()
    if c.asym:
        lo, hi = xf.amin(-1).clamp(max=0), xf.amax(-1).clamp(min=0)
        word = _round_up_f16((hi - lo) / c.qmax, ZP_BITS)          # [..., Hkv] int16, low bits 0
        sf = word.view(torch.float16).float()
        safe = torch.where(sf > 0, sf, 1.0)
        zp = torch.where(sf > 0, (-lo / safe).round().clamp(0, c.qmax), 0.0)
        q = torch.where(sf[..., None] > 0, (xf / safe[..., None]).round() + zp[..., None], 0.0)
        q = q.clamp(0, c.qmax).to(torch.uint8)                     # [..., Hkv, D]
        pairs = q.unflatten(-1, (D // 2, 2)) & 15
        codes = pairs[..., 0] | (pairs[..., 1] << 4)               # element 2j in the low nibble
        if c.bits == 5:  # fifth bits, per 16 values: a byte for the even elements, one for the odd
            hb = (q >> 4).unflatten(-1, (D // 16, 8, 2)).transpose(-1, -2)  # [..., chunks, 2, 8]
            weights = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8, device=x.device)
            codes = torch.cat([codes, (hb * weights).sum(-1, dtype=torch.uint8).flatten(-2)], -1)
        return codes.contiguous(), (word | zp.short()).view(torch.float16)
    word = _round_up_f16(xf.abs().amax(-1) / c.qmax)                # [..., Hkv]
    scale = word.view(torch.float16)
    sf = scale.float().unsqueeze(-1)
    # scale 0 only when every |x| is below float16's smallest step: those rows store zeros.
    y = torch.where(sf > 0, xf / torch.where(sf > 0, sf, 1.0), 0.0)  # [..., Hkv, D], |y| <= qmax
    y = y.clamp(-c.qmax, c.qmax)                                  # float rounding only; fp8 casts past max are NaN on GPUs
    codes = y.round().to(torch.int8) if c.name == "int8" else y.to(c.code_dtype)
    return codes.contiguous(), scale


def scale_and_zero(scales: torch.Tensor, kind: str | RowCodec) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored scale words -> (scale, zero point) as fp32 (zero point 0 for the symmetric codecs)."""
    c = codec(kind)
    if not c.asym:
        return scales.float(), torch.zeros_like(scales, dtype=torch.float32)
    word = scales.view(torch.int16)
    return (word & ~ZP_MASK).view(torch.float16).float(), (word & ZP_MASK).float()


def dequantize(codes: torch.Tensor, scales: torch.Tensor, kind: str | RowCodec,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes ``[..., Hkv, Dc]`` + scales ``[..., Hkv]`` of codec ``kind`` -> ``[..., Hkv, D]`` in ``dtype``.
    Computed in fp32, then cast."""
    c = codec(kind)
    if c.bits in (4, 5):
        n = codes.shape[-1] * 8 // c.bits // 2  # bytes of nibbles: D / 2
        nib = codes[..., :n]
        vals = torch.stack((nib & 15, nib >> 4), dim=-1).flatten(-2)  # element 2j low nibble, 2j+1 high
        if c.bits == 5:
            hb = codes[..., n:].unflatten(-1, (-1, 2, 1))  # [..., chunks, 2 (even, odd), 1]
            bit = (hb >> torch.arange(8, dtype=torch.uint8, device=codes.device)) & 1  # [..., chunks, 2, 8]
            vals = vals | (bit.transpose(-1, -2).flatten(-3) << 4)
        vals = vals.float()
    else:
        vals = codes.float()
    s, zp = scale_and_zero(scales, c)
    return ((vals - zp.unsqueeze(-1)) * s.unsqueeze(-1)).to(dtype)
