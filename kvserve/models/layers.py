"""The building blocks of a Llama-family layer: RMSNorm, rotary embeddings, linear layers (plain,
int8 weight-only, or int8 weights x int8 activations), SwiGLU.

On the CPU in fp32 or bf16 the small per-token ops (norms, RoPE, SwiGLU) run as one C++ pass each
(``cpu_kernels``); the PyTorch lines beside them are the reference and every other device's path.
In bf16 the C++ passes round to bf16 wherever the PyTorch chain of bf16 ops rounds, so the two agree up
to the order of fp32 sums (the RMSNorm mean).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from kvserve.models import cpu_kernels, cpu_weight_kernels


CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what the C++ per-token passes take


def _cpu_kernel_ok(*tensors: torch.Tensor) -> bool:
    """The C++ versions below take contiguous CPU tensors of one dtype, fp32 or bf16; anything else runs
    the PyTorch lines."""
    dtype = tensors[0].dtype
    if dtype not in CPU_KERNEL_DTYPES:
        return False
    for t in tensors:  # a plain loop: ~90 calls per decode step, and a generator costs twice as much
        if not (t.is_cpu and t.dtype == dtype and t.is_contiguous()):
            return False
    return cpu_kernels.available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back, as HF's LlamaRMSNorm does (so bf16 runs match)."""
    if x.dim() == 2 and _cpu_kernel_ok(x, weight):
        return cpu_kernels.kernel("rms_norm")(x, weight, eps)
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype) * weight


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``h += delta`` (the residual stream, in place), then ``rms_norm(h)``: one pass over the rows on CPU."""
    if h.dim() == 2 and _cpu_kernel_ok(h, delta, weight):
        return cpu_kernels.kernel("add_rms_norm")(h, delta, weight, eps)
    h.add_(delta)
    return rms_norm(h, weight, eps)


def _onednn_ok(weight: torch.Tensor) -> bool:
    """Whether this CPU build can run ``weight`` through oneDNN's prepacked linear."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


QUANTIZATIONS = (None, "int8", "w8a8", "w8a8-channel", "int4")


class Linear:
    """``y = x @ W.T (+ b)`` with W in the model's dtype, or quantized (int8, int4, w8a8, w8a8-channel).

    On CPU the plain weight is reordered once, at load, into oneDNN's blocked layout. ``F.linear``
    re-packs the weight inside every call, which costs as much as the product itself for the few rows
    of a decode step: prepacked, 4 rows cost ~1.5x one row instead of ~3x, and the 49,152-row LM head
    runs ~1.7x faster even at one row (measured on the AVX2 machine; see docs/benchmarks.md).

    ``int8``: GGUF's Q8_0 layout, int8 codes with a float16 scale per 32 weights (8.5 bits per weight;
    a Q8_0 tensor's own codes come back exactly). At batch 1 decode is bound by reading weights, so
    reading 1.06 bytes per weight instead of 2-4 is where the time goes. ``int4``: GGUF's Q4_1 layout,
    4-bit codes with a float16 scale and minimum per 32 weights (5 bits per weight, 0.625 bytes read;
    a Q4_1 tensor's own codes come back). Used for the layers; the LM head, which a GGUF keeps at 8
    bits (Q8_0), is int8. The product for 1-2 rows is ``cpu_weight_kernels.int8_block_mm`` /
    ``int4_block_mm`` (C++, fp32 sums; see its docstring for why blocks and not one scale per row:
    97.9 % teacher-forced agreement with fp32 instead of 95.9 % for int8). A GEMV costs time per row:
    past ``GEMV_MAX_ROWS`` rows the dequantized weight, kept prepacked in the model dtype on the CPU,
    does the product (so both are decode-speed settings, not memory ones: the copy takes 2 bytes per
    weight with bf16). On other devices (CUDA) an int8 weight is dequantized for each product; int4 is
    CPU only.

    ``w8a8`` (CPU) rounds the activations to 8 bits too, as llama.cpp multiplies a Q8_0 weight: int8
    activations per block of 32 against int8 weights per block of 32. Rounding activations to 8 bits is
    about as coarse as bf16 (the bf16 model agrees with the fp32 one at 97.4 % of positions), and alone
    it took agreement to 95.9 %. So x and W are first rotated, each 64 input channels by the same
    orthogonal Hadamard matrix (``hadamard_rotate``; QuaRot's idea, in groups): the product is unchanged,
    and an outlier channel is spread over its group instead of setting its block's step alone. The LM head
    stays weight-only int8 (16-bit activations), as vLLM's W8A8 checkpoints leave ``lm_head`` out. 1-2 rows
    go through the int8 kernel; more rows through the dequantized (rotated) copy times ``w8a8_activations``,
    the same values the kernel multiplies. It reads what int8 reads: a setting for llama.cpp's arithmetic,
    not for speed.

    ``w8a8-channel`` (CPU) is vLLM's int8 scheme: one scale per weight row and one per token, int8 by int8
    in fbgemm with int32 sums: twice fp32's arithmetic rate and a quarter of its weight bytes, so batched
    decode and prefill speed up too (the fast batched setting on AVX2 machines, where bf16 is slow). One
    scale per row caps its agreement with the float model at ~96 % even with exact activations (89.98 %
    as built); ``down_proj`` stays in the model dtype. Two details keep it usable:

    - fbgemm scales the whole activation tensor by one number. SmolLM2 has outlier channels, and one
      scale for all tokens loses most of them (62 of 120 teacher-forced positions matched fp32). Each
      row is divided by its own absmax first and multiplied back after: exactly per-token scales.
    - On AVX2, fbgemm multiplies uint8 activations by int8 weights with ``vpmaddubsw``, whose int16
      pair sums saturate at 2 x 255 x 127. Weights are rounded to 7 bits (+-63) so no pair can
      overflow (with 8-bit weights every position came out wrong).
    """

    # Past this many rows (prefill, batches) the int8 and int4 kernels lose to a plain matmul: they multiply
    # every row's codes again for each row of x. Measured on Sapphire Rapids (2 threads, fp32 activations),
    # a 3072 x 576 int8 product takes 51 / 58 / 114 us at 1 / 2 / 4 rows against ~64 / 68 / 69 for bf16
    # prepacked; only the largest matrices, out of cache, keep winning at 4 (Gemma 3's 262,144 x 640 head:
    # 8.3 / 9.8 / 12.2 ms against 13.9-14.6). On the CPU the dequantized weight is kept, in the model dtype
    # and prepacked, for those rows.
    GEMV_MAX_ROWS = 2

    def __init__(self, weight: torch.Tensor, quantization: str | None = None, bias: torch.Tensor | None = None):
        self.out_features = weight.shape[0]
        self.quantization = quantization
        self.prepacked = False
        # int4 and int8 on the CPU: the dequantized weight, prepacked in the model dtype, for products of
        # more than ``dense_rows`` rows, where the quantized GEMV kernels (whose cost grows with the rows)
        # lose to a plain matmul
        self.dense: Linear | None = None
        self.dense_rows = 0
        # [out]: Qwen2's q/k/v biases. Plain weights take it inside the product (oneDNN and F.linear add it
        # in their epilogue); the quantized paths add it to their result.
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.bias = None
        if bias is not None:
            self.bias = bias.to(weight.device, weight.dtype if quantization is None else torch.float32).contiguous()
        if quantization is None:
            self.weight = weight.contiguous()
            if _onednn_ok(self.weight):
                try:
                    self.weight = torch.ops.mkldnn._reorder_linear_weight(self.weight)
                    self.prepacked = True
                except RuntimeError:  # bf16 where oneDNN has no bf16 path (AVX2 CPUs): F.linear does it
                    pass
        elif quantization == "w8a8-channel":
            if weight.device.type != "cpu":
                raise ValueError("quantization='w8a8-channel' runs on the CPU (fbgemm); use 'int8' on CUDA")
            w = weight.float()
            scale = (w.abs().amax(dim=1) / 63.0).clamp(min=1e-8).double()
            with warnings.catch_warnings():  # quantized tensors are deprecated as a user API, not the kernel
                warnings.simplefilter("ignore")
                qw = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            self.weight = torch.ops.quantized.linear_prepack(qw, None)
        elif quantization in ("int8", "int4", "w8a8"):
            if quantization != "int8" and weight.device.type != "cpu":
                raise ValueError(f"quantization={quantization!r} runs on the CPU; use 'int8' on CUDA")
            if quantization == "int8":
                self.weight, self.scale = cpu_weight_kernels.quantize_blocks(weight)
            elif quantization == "w8a8":  # the codes of the rotated weight (x is rotated alike at each call)
                self.weight, self.scale = cpu_weight_kernels.quantize_blocks(cpu_weight_kernels.hadamard_rotate(weight))
            else:
                self.weight, self.scale, self.mins = cpu_weight_kernels.quantize_q4_blocks(weight)
            self.dense_rows = self.GEMV_MAX_ROWS
            if weight.device.type == "cpu":  # the same values the kernel multiplies by
                self.dense = Linear(self._dequantized(weight.dtype))
                if not cpu_weight_kernels.available():
                    self.dense_rows = 0  # no kernel built: every product by the dequantized copy
        else:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")

    def __call__(self, x: torch.Tensor, float_out: bool = False) -> torch.Tensor:
        """``float_out``: the C++ int8 / int4 kernels may return their fp32 sums instead of rounding them
        to x's dtype (the LM head: logits that a bf16 rounding would tie); other paths return x's dtype."""
        if self.quantization is None and not self.prepacked:
            return F.linear(x, self.weight, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.prepacked:
            y = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), self.weight, self.bias, "none", [], "")
            return y.reshape(*shape[:-1], self.out_features)
        if self.dense is not None and x2.shape[0] > self.dense_rows:
            y = self.dense(cpu_weight_kernels.w8a8_activations(x2) if self.quantization == "w8a8" else x2)
        elif self.quantization == "w8a8-channel":
            row_max = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
            y = torch.ops.quantized.linear_dynamic(x2.float() / row_max, self.weight, False).mul_(row_max).to(x.dtype)
        elif self.quantization == "int4":
            y = cpu_weight_kernels.int4_block_mm(x2, self.weight, self.scale, self.mins, float_out)
        elif x2.is_cpu:
            y = cpu_weight_kernels.int8_block_mm(x2, self.weight, self.scale, float_out, self.quantization == "w8a8")
        else:  # int8 elsewhere (CUDA): the weight dequantized for each product, which saves memory, not time
            y = F.linear(x2, self._dequantized(x2.dtype))
        if self.bias is not None:
            y = y.add_(self.bias)  # after the product: these paths are approximate anyway
        return y.reshape(*shape[:-1], self.out_features)

    def _dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """An int8, int4 or w8a8 weight as the values its codes stand for, ``[N, K]`` in ``dtype`` (w8a8's:
        the rotated weight, which multiplies rotated activations)."""
        if self.quantization == "int4":
            return cpu_weight_kernels.dequantize_q4_blocks(self.weight, self.scale, self.mins, dtype)
        return cpu_weight_kernels.dequantize_blocks(self.weight, self.scale, dtype)


class Rotary:
    """RoPE in HF's rotate-half form, with cos/sin precomputed for every position once."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, dtype: torch.dtype, device="cpu"):
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_positions, head_dim]
        self.cos = emb.cos().to(dtype).to(device)
        self.sin = emb.sin().to(dtype).to(device)

    def rotate_(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim], token t at ``positions[t]``; rotated in place on CPU (fp32, bf16), else a copy."""
        # not _cpu_kernel_ok: x is a strided view of the qkv output (only its last dim is contiguous)
        if x.device.type == "cpu" and x.dtype in CPU_KERNEL_DTYPES and x.stride(-1) == 1 and cpu_kernels.available():
            cpu_kernels.kernel("rotary_")(x, self.cos, self.sin, positions)
            return x
        return apply_rotary(x, self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim], cos/sin [T, 1, head_dim]. Rotates pairs (i, i + d/2) by the position's angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """GeGLU (Gemma): GeLU with the tanh approximation on the gate, times up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: the gate and up projections come fused in one matmul; split and combine."""
    if gate_up.dim() == 2 and _cpu_kernel_ok(gate_up):
        return cpu_kernels.kernel("silu_and_mul")(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
