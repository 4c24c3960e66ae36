"""int8 and int4 weights in blocks of 32, multiplied straight from their codes (CPU, C++): GGUF's Q8_0
and Q4_1 layouts.

Why blocks: one scale per output row (what torch's ``_weight_int8pack_mm`` takes) has to cover the
row's largest weight, so every other weight of the row is rounded on that coarse grid. One scale per
32 weights follows the weights' local size. On SmolLM2-135M, teacher-forced over 4,092 tokens of
``pydoc_data.topics`` in fp32, top-1 agreement with the float model rises from 95.9 % (one scale per
row) to 97.8 %, perplexity from +0.38 % to +0.12 %. It is also the layout llama.cpp reads for a Q8_0
tensor (32 int8 codes and a float16 scale: 8.5 bits per weight), and a Q8_0 tensor's codes come back
exactly (its quantizer makes each block's largest code +-127).

    w[n, k] = scale[n, k / 32] * codes[n, k]        codes int8 in [-127, 127], scale float16

The product, for the few rows of a decode step (``x [M, K]``, M = 1 to 4):

    y[m, n] = sum_b scale[n, b] * (sum_{i < 32} codes[n, 32 b + i] * x[m, 32 b + i])

with fp32 sums. Each block of x is rounded to int16 with its own scale (15 bits: ~3e-5 of the block's
largest value, where torch's int8 kernel rounds x to bf16's 8 bits), so the inner sum is exact integer
arithmetic: 32 codes sign-extended to int16 and multiplied pairwise by ``vpmaddwd`` (AVX2 or AVX-512BW;
plain C++ elsewhere), then converted and scaled once per block. Each output row's codes are read once
for all M rows, and rows of W are split over the threads. A decode step is bound by reading the codes,
so what counts is streaming them at the memory's rate: the codes 4 KiB ahead are asked for while a block
is multiplied (the hardware prefetcher alone left each thread at ~8 GB/s). Measured on Sapphire Rapids:
Gemma 3's 168 MB LM head at one row in 8.3 ms (21 GB/s of the ~23 a plain read gets), against 14.4 ms
for torch's ``_weight_int8pack_mm`` on per-row codes (docs/benchmarks.md, session 13).

int4 is Q4_1's block: 32 codes 0..15 in 16 bytes (byte j holds codes j and j + 16), a float16 scale d
and minimum m, ``w = d q + m`` (5 bits per weight, 0.625 bytes read). The same loop multiplies it: the
nibbles widened to int16, the same exact integer sums times d, plus m times the block's sum of x. On
Sapphire Rapids a SmolLM2 decode step with int4 layers took 8.0 ms against 8.8-10.0 with torch's
``_weight_int4pack_mm_for_cpu``, and with the machine held to AVX2 8.8-9.2 ms against 12.4-12.8
(torch's) and 10.7-11.7 (int8): fewer bytes, the same arithmetic per block (docs/benchmarks.md,
session 14). A session-13 int4 GEMV that paired two blocks per 32 bytes had only matched torch's.

w8a8 (``quantization="w8a8"``) is int8's layout for the weight rotated along K, each 64 input channels
by the orthogonal Hadamard matrix (``hadamard_rotate``), and the same loop with x rotated alike and rounded
to 8 bits per block of 32 (``w8a8_group``): llama.cpp's Q8_0 x Q8_0 arithmetic, held in int16 lanes. The
rotation leaves each product as it was and spreads an outlier channel over its group; teacher-forced
agreement with the fp32 model went from 95.9 % (8-bit blocks alone) to 97.7 % (docs/benchmarks.md,
session 15).

Built by ``cpu_kernels.build_extension`` (same flags, same build notice, its own extension so that
editing one does not rebuild the others). KVSERVE_CPU_KERNELS=0 turns it off (``Linear`` then multiplies
by the dequantized weight: the same values).
"""
from __future__ import annotations

import torch

from kvserve.kv.quant import hadamard
from kvserve.models import cpu_kernels

BLOCK = 32  # weights per scale: GGUF Q8_0's block

_SOURCE = cpu_kernels.SHARED_CPP + r"""
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// n float16 bit patterns -> floats, 8 at a time where F16C has the instruction.
static inline void halves_to_floats(const uint16_t* h, float* out, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
#endif
  for (; i < n; ++i) out[i] = static_cast<float>(c10::Half(h[i], c10::Half::from_bits()));
}

// One butterfly stage of the fast Walsh-Hadamard transform: (v[j], v[j + H]) -> (sum, difference). H is a
// template constant so that the compiler unrolls the stage and vectorizes it.
template <int H>
static inline void butterflies(float* v) {
  for (int i = 0; i < 64; i += 2 * H)
    for (int j = i; j < i + H; ++j) {
      const float a = v[j], b = v[j + H];
      v[j] = a + b;
      v[j + H] = a - b;
    }
}

// In place: v <- H v / 8 for Sylvester's 64 x 64 Hadamard matrix H (symmetric; H H = 64 I, so H / 8 is
// orthogonal and its own inverse). H = H8 (x) H8: seen as 8 rows of 8, v is combined across rows by the
// butterfly stages 8, 16 and 32 (whole rows at a time: the compiler vectorizes them), and within each
// row by multiplying it with H8 / 8 (8 broadcasts and multiply-adds per row; the narrow stages 1, 2, 4 as
// butterflies stayed scalar and took half the time of the whole rounding).
static inline void hadamard64(float* v) {
  static constexpr float p = 0.125f, m = -0.125f;
  static constexpr float H8[8][8] = {{p, p, p, p, p, p, p, p}, {p, m, p, m, p, m, p, m}, {p, p, m, m, p, p, m, m},
                                     {p, m, m, p, p, m, m, p}, {p, p, p, p, m, m, m, m}, {p, m, p, m, m, p, m, p},
                                     {p, p, m, m, m, m, p, p}, {p, m, m, p, m, p, p, m}};
  butterflies<8>(v);
  butterflies<16>(v);
  butterflies<32>(v);
  for (int r = 0; r < 8; ++r) {
    float out[8] = {};
    for (int b = 0; b < 8; ++b)
      for (int c = 0; c < 8; ++c) out[c] += v[8 * r + b] * H8[b][c];
    for (int c = 0; c < 8; ++c) v[8 * r + c] = out[c];
  }
}

// w8a8's activations, 64 values of x at a time: rotated by the Walsh-Hadamard matrix (the weight was rotated
// the same way at load, so the products are unchanged), then rounded to 8 bits (+-127) per block of 32 with
// the block's largest magnitude / 127 as its scale: GGUF's Q8_0 activations, as llama.cpp multiplies a Q8_0
// weight. The rotation spreads an outlier channel over its 64 neighbours, so it no longer sets a block's
// step alone. q: 64 codes, scale: 2.
template <typename T>
static inline void w8a8_group(const T* x, int16_t* q, float* scale) {
  float v[64];
  for (int j = 0; j < 64; ++j) v[j] = static_cast<float>(x[j]);
  hadamard64(v);
  for (int h = 0; h < 2; ++h) {
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::abs(v[32 * h + j]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int j = 0; j < 32; ++j) q[32 * h + j] = static_cast<int16_t>(std::nearbyint(v[32 * h + j] * inv));
    scale[h] = amax / 127.f;
  }
}

// x [M, K] (fp32 or bf16) -> int16 codes per block of 32 and their scales (max |x| / 32767): 15 bits, so
// the products below are exact integers and the rounding of x is ~3e-5 of its block's largest value
// (bf16 activations, which torch's int8 kernel takes, keep 8 bits of each value). w8a8: 8 bits, rotated
// (w8a8_group).
// sum (int4 only): each block's sum of x, for the offsets
// (w = d q + m: sum_i w_i x_i = d sum_i q_i x_i + m sum_i x_i).
struct XBlocks {
  std::vector<int16_t> q;
  std::vector<float> scale, sum;
  template <typename T>  // float or c10::BFloat16
  XBlocks(const T* x, int64_t M, int64_t K, bool w8a8, bool sums)
      : q(M * K), scale(M * K / 32), sum(sums ? M * K / 32 : 0) {
    if (w8a8) {  // K % 64 == 0: no group spans two rows
      for (int64_t g = 0; g < M * K / 64; ++g) w8a8_group(x + 64 * g, q.data() + 64 * g, scale.data() + 2 * g);
      return;
    }
    float v[32];
    for (int64_t i = 0; i < M * K / 32; ++i) {
      float amax = 0.f, total = 0.f;
      for (int j = 0; j < 32; ++j) {
        v[j] = static_cast<float>(x[32 * i + j]);
        amax = std::max(amax, std::abs(v[j]));
        total += v[j];
      }
      const float inv = amax > 0.f ? 32767.f / amax : 0.f;
      for (int j = 0; j < 32; ++j) q[32 * i + j] = static_cast<int16_t>(std::nearbyint(v[j] * inv));
      scale[i] = amax / 32767.f;
      if (sums) sum[i] = total;
    }
  }
};

// A block's 32 int8 codes as 32 int16 lanes (widen), then block_dot: sum_i codes[i] * xq[i] as int32
// lanes (pairs of products summed by vpmaddwd), times the block's two scales, added into 8 or 16 float
// lanes.
#if defined(__AVX512BW__)
typedef __m512 facc;
typedef __m512i wide;
static inline facc facc_zero() { return _mm512_setzero_ps(); }
static inline wide widen(const int8_t* c) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)));
}
static inline wide widen4(const uint8_t* c) {  // 16 bytes: codes 0-15 in the low nibbles, 16-31 in the high
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c)), f = _mm_set1_epi8(15);
  return _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), f), _mm_and_si128(b, f)));
}
static inline facc block_dot(wide w, const int16_t* xq, float scale, facc acc) {
  const __m512i p = _mm512_madd_epi16(w, _mm512_loadu_si512(xq));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(scale), acc);
}
static inline float facc_sum(facc a) { return _mm512_reduce_add_ps(a); }
#elif defined(__AVX2__)
typedef __m256 facc;
struct wide { __m256i lo, hi; };  // lanes 0-15 and 16-31
static inline facc facc_zero() { return _mm256_setzero_ps(); }
static inline wide widen(const int8_t* c) {
  return {_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c))),
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16)))};
}
static inline wide widen4(const uint8_t* c) {  // 16 bytes: codes 0-15 in the low nibbles, 16-31 in the high
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c)), f = _mm_set1_epi8(15);
  return {_mm256_cvtepu8_epi16(_mm_and_si128(b, f)), _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), f))};
}
static inline facc block_dot(wide w, const int16_t* xq, float scale, facc acc) {
  const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w.lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq))),
                                     _mm256_madd_epi16(w.hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16))));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(scale), acc);
}
static inline float facc_sum(facc a) { v8 v; std::memcpy(&v, &a, 32); return hsum(v); }
#else  // any other CPU: the same sums in plain C++
typedef float facc;
struct wide { int16_t v[32]; };
static inline facc facc_zero() { return 0.f; }
static inline wide widen(const int8_t* c) {
  wide w;
  for (int i = 0; i < 32; ++i) w.v[i] = c[i];
  return w;
}
static inline wide widen4(const uint8_t* c) {
  wide w;
  for (int i = 0; i < 16; ++i) { w.v[i] = c[i] & 15; w.v[i + 16] = c[i] >> 4; }
  return w;
}
static inline facc block_dot(const wide& w, const int16_t* xq, float scale, facc acc) {
  int32_t p = 0;
  for (int i = 0; i < 32; ++i) p += static_cast<int32_t>(w.v[i]) * xq[i];
  return acc + static_cast<float>(p) * scale;
}
static inline float facc_sum(facc a) { return a; }
#endif

// How far ahead of the codes being multiplied to ask for codes (bytes; rows are contiguous, so this runs
// into the next rows). The hardware prefetcher alone kept one thread's stream at ~8 GB/s: on Sapphire
// Rapids, Gemma 3's 168 MB head took 11.3 ms (15.4 GB/s on 2 threads); 512 / 2,048 / 4,096 bytes
// ahead: 11.3 / 8.3 / 8.2 ms (21.7 GB/s, of the ~23 GB/s a 1 GiB sum reads), 8,192 no better.
static constexpr int64_t PREFETCH = 4096;

// y[m, n0:n1] for M rows of x; scales [N, K / 32] float16 bits. int8 (Q4 false): codes [N, K] int8.
// int4 (Q4): codes [N, K / 2], 16 bytes per block (GGUF Q4_1's order: byte j holds codes j and j + 16),
// values d q + m with q in 0..15, mins [N, K / 32] float16 bits (m).
template <int M, bool Q4, typename OutT>
static void rows(const XBlocks& x, const void* codes, const uint16_t* scales, const uint16_t* mins, OutT* y,
                 int64_t K, int64_t N, int64_t n0, int64_t n1) {
  constexpr int64_t BLOCK_BYTES = Q4 ? 16 : 32;
  const int64_t nb = K / 32;
  const int16_t* xq = x.q.data();
  std::vector<float> f(M * nb), d(nb), mn(Q4 ? nb : 0);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* c = static_cast<const uint8_t*>(codes) + n * nb * BLOCK_BYTES;
    // each block's two scales multiplied first, in plain loops over the row the compiler vectorizes (one
    // block at a time, converting and multiplying cost as much as the codes' arithmetic)
    halves_to_floats(scales + n * nb, d.data(), nb);
    for (int m = 0; m < M; ++m)
      for (int64_t b = 0; b < nb; ++b) f[m * nb + b] = d[b] * x.scale[m * nb + b];
    float offset[M] = {};  // int4: sum_b m_b (sum of x's block b)
    if constexpr (Q4) {
      halves_to_floats(mins + n * nb, mn.data(), nb);
      for (int m = 0; m < M; ++m)
        for (int64_t b = 0; b < nb; ++b) offset[m] += mn[b] * x.sum[m * nb + b];
    }
    facc acc[M];
    for (int m = 0; m < M; ++m) acc[m] = facc_zero();
    for (int64_t b = 0; b < nb; ++b) {
      __builtin_prefetch(c + BLOCK_BYTES * b + PREFETCH);
      wide w;  // read once for all M rows
      if constexpr (Q4) w = widen4(c + BLOCK_BYTES * b);
      else w = widen(reinterpret_cast<const int8_t*>(c) + BLOCK_BYTES * b);
      for (int m = 0; m < M; ++m) acc[m] = block_dot(w, xq + m * K + 32 * b, f[m * nb + b], acc[m]);
    }
    for (int m = 0; m < M; ++m) y[m * N + n] = static_cast<OutT>(facc_sum(acc[m]) + offset[m]);
  }
}

template <bool Q4, typename T, typename OutT>
static torch::Tensor block_mm_as(const torch::Tensor& x, const void* cp, const uint16_t* sp, const uint16_t* mp,
                                 int64_t M, int64_t K, int64_t N, bool w8a8) {
  // read and written in x's dtype (or fp32 out): no conversions around the call
  auto y = torch::empty({M, N}, x.options().dtype(c10::CppTypeToScalarType<OutT>::value));
  OutT* yp = static_cast<OutT*>(y.data_ptr());
  pybind11::gil_scoped_release no_gil;
  const XBlocks xb(static_cast<const T*>(x.data_ptr()), M, K, w8a8, Q4);
  // ~16 KiB of codes per task at the least, so a small matrix does not pay for waking threads it cannot use
  const int64_t grain = std::max<int64_t>(1, 16384 / K);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    switch (M) {
      case 1: rows<1, Q4>(xb, cp, sp, mp, yp, K, N, n0, n1); break;
      case 2: rows<2, Q4>(xb, cp, sp, mp, yp, K, N, n0, n1); break;
      case 3: rows<3, Q4>(xb, cp, sp, mp, yp, K, N, n0, n1); break;
      default: rows<4, Q4>(xb, cp, sp, mp, yp, K, N, n0, n1); break;
    }
  });
  return y;
}

template <bool Q4>
static torch::Tensor block_mm(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, const torch::Tensor* mins,
                              bool float_out, bool w8a8 = false) {
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 2 && scales.dim() == 2, "x [M, K], codes [N, K or K/2], scales [N, K/32]");
  TORCH_CHECK(codes.scalar_type() == (Q4 ? torch::kByte : torch::kChar) && codes.is_contiguous(),
              "codes: contiguous int8 (int4: uint8, two per byte)");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.is_contiguous(), "scales: contiguous float16");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  TORCH_CHECK(codes.size(1) == (Q4 ? K / 2 : K) && K % 32 == 0 && scales.size(0) == N && scales.size(1) == K / 32, "shapes");
  TORCH_CHECK(M >= 1 && M <= 4, "1 to 4 rows");
  TORCH_CHECK(!w8a8 || K % 64 == 0, "w8a8 rotates x in groups of 64: K must be a multiple of 64");
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const uint16_t* mp = nullptr;
  if (Q4) {
    TORCH_CHECK(mins->scalar_type() == torch::kHalf && mins->is_contiguous() && mins->sizes() == scales.sizes(),
                "mins: contiguous float16 [N, K/32]");
    mp = reinterpret_cast<const uint16_t*>(mins->data_ptr<at::Half>());
  }
  const void* cp = codes.data_ptr();
  if (x.scalar_type() == torch::kBFloat16) {
    if (float_out) return block_mm_as<Q4, c10::BFloat16, float>(x.contiguous(), cp, sp, mp, M, K, N, w8a8);
    return block_mm_as<Q4, c10::BFloat16, c10::BFloat16>(x.contiguous(), cp, sp, mp, M, K, N, w8a8);
  }
  auto y = block_mm_as<Q4, float, float>(x.to(torch::kFloat).contiguous(), cp, sp, mp, M, K, N, w8a8);
  return float_out ? y : y.to(x.scalar_type());
}

// float_out: the result in fp32 whatever x's dtype (the LM head: logits from the fp32 sums, not rounded to bf16).
// w8a8: x rotated and rounded to 8 bits per block (XBlocks); the codes are those of the rotated weight.
torch::Tensor int8_block_mm(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, bool float_out, bool w8a8) {
  return block_mm<false>(x, codes, scales, nullptr, float_out, w8a8);
}

torch::Tensor int4_block_mm(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor mins, bool float_out) {
  return block_mm<true>(x, codes, scales, &mins, float_out);
}

// The values w8a8's kernel multiplies for x [M, K]: rotated, rounded to 8 bits per block, times their
// scales, in x's dtype (fp32 or bf16). The dequantized weight times these is the kernel's product, for the
// many rows of a prefill or a batch, which a plain matmul does faster.
template <typename T>
static void w8a8_activations_as(const T* x, T* out, int64_t groups) {
  at::parallel_for(0, groups, 256, [&](int64_t g0, int64_t g1) {
    int16_t q[64];
    float scale[2];
    for (int64_t g = g0; g < g1; ++g) {
      w8a8_group(x + 64 * g, q, scale);
      for (int j = 0; j < 64; ++j) out[64 * g + j] = static_cast<T>(scale[j / 32] * q[j]);
    }
  });
}

torch::Tensor w8a8_activations(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 64 == 0, "x [M, K], K a multiple of 64");
  x = x.contiguous();
  auto out = torch::empty_like(x);
  pybind11::gil_scoped_release no_gil;
  if (x.scalar_type() == torch::kFloat) {
    w8a8_activations_as(x.data_ptr<float>(), out.data_ptr<float>(), x.numel() / 64);
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "x: fp32 or bf16");
    w8a8_activations_as(reinterpret_cast<const c10::BFloat16*>(x.data_ptr<at::BFloat16>()),
                        reinterpret_cast<c10::BFloat16*>(out.data_ptr<at::BFloat16>()), x.numel() / 64);
  }
  return out;
}
"""

_state: dict = {"module": None, "tried": False}


def _load():
    if not _state["tried"]:
        _state["tried"] = True
        _state["module"] = cpu_kernels.build_extension("kvserve_weight_kernels", _SOURCE,
                                                       ["int8_block_mm", "int4_block_mm", "w8a8_activations"],
                                                       "int8 weight kernel")
    return _state["module"]


def available() -> bool:
    return _load() is not None


def quantize_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` as int8 codes ``[N, K]`` and float16 scales ``[N, K / 32]``: symmetric, each
    block of 32 scaled by its largest magnitude / 127 (Q8_0's quantizer). The scale is rounded to
    float16 before the codes are computed, so codes x stored scale is the nearest value on the grid
    actually stored."""
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"int8 needs the input width ({k}) to be a multiple of {BLOCK}")
    w = weight.float().reshape(n, k // BLOCK, BLOCK)
    scale = (w.abs().amax(-1) / 127).clamp(min=2 ** -24).half()  # float16's smallest step: never 0
    codes = torch.round(w / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return codes.reshape(n, k).contiguous(), scale.contiguous()


def dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight ``codes`` and ``scales`` stand for, ``[N, K]`` in ``dtype`` (computed in fp32)."""
    n, k = codes.shape
    w = codes.reshape(n, k // BLOCK, BLOCK).float() * scales.float()[..., None]
    return w.reshape(n, k).to(dtype)


def int8_block_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, float_out: bool = False,
                  w8a8: bool = False) -> torch.Tensor:
    """``x [M, K] @ W.T`` for W in blocks (``quantize_blocks``), 1 <= M <= 4 (a template constant each), fp32 sums;
    the result in x's dtype, or in fp32 with ``float_out``. ``w8a8``: x is rotated and rounded to 8 bits per
    block first (``w8a8_activations``), and the codes must be those of the rotated weight
    (``hadamard_rotate``)."""
    return _load().int8_block_mm(x, codes, scales, float_out, w8a8)


HADAMARD = 64  # w8a8 rotates activations and weights in groups of this many input channels


def hadamard_rotate(t: torch.Tensor) -> torch.Tensor:
    """``t [..., K]`` with each group of 64 along K multiplied by the orthogonal Hadamard matrix (the one the
    quantized KV cache rotates heads by, ``kv.quant.hadamard``), in fp32.
    Rotating x and W alike leaves ``x @ W.T`` as it was (``(x H)(W H)^T = x W^T``); what changes is
    how evenly a group's magnitude spreads over its values, which is what a rounding to 8 bits needs."""
    k = t.shape[-1]
    if k % HADAMARD:
        raise ValueError(f"w8a8 needs the input width ({k}) to be a multiple of {HADAMARD}")
    return (t.float().reshape(*t.shape[:-1], k // HADAMARD, HADAMARD) @ hadamard(HADAMARD)).reshape(t.shape)


def w8a8_activations_reference(x: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` rotated (``hadamard_rotate``) and rounded to int8 per block of 32 (scale: the block's
    largest magnitude / 127, GGUF Q8_0's activation blocks), as the values those codes stand for, in x's dtype."""
    r = hadamard_rotate(x).reshape(x.shape[0], -1, BLOCK)
    scale = r.abs().amax(-1, keepdim=True) / 127
    q = torch.round(r / torch.where(scale > 0, scale, torch.ones_like(scale)))
    return (q * scale).reshape(x.shape).to(x.dtype)


def w8a8_activations(x: torch.Tensor) -> torch.Tensor:
    """The same values by the C++ kernel's own rotation and rounding (``w8a8_group``), so that a dense product with the
    dequantized weight gives what ``int8_block_mm(..., w8a8=True)`` gives; the reference without a build."""
    if x.dtype in (torch.float32, torch.bfloat16) and available():
        return _load().w8a8_activations(x)
    return w8a8_activations_reference(x)


def int8_block_mm_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The same in plain PyTorch."""
    return (x.float() @ dequantize_blocks(codes, scales, torch.float32).T).to(x.dtype)


def quantize_q4_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` as 4-bit codes in GGUF Q4_1's byte order (``[N, K / 2]`` uint8: in each block of 32,
    byte j holds code j in its low nibble and code j + 16 in its high one), float16 scales d and mins m
    ``[N, K / 32]``: w = d q + m, q in 0..15, m the block's minimum, d its range / 15 (Q4_1's quantizer).
    m and d are rounded to float16 before the codes are computed; a Q4_1 block's own codes come back."""
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"int4 needs the input width ({k}) to be a multiple of {BLOCK}")
    w = weight.float().reshape(n, k // BLOCK, BLOCK)
    m = w.amin(-1).half()
    d = ((w.amax(-1) - m.float()) / 15).half()
    safe = torch.where(d.float() > 0, d.float(), torch.ones_like(d.float()))  # a constant block: every code 0
    q = torch.round((w - m.float()[..., None]) / safe[..., None]).clamp(0, 15).to(torch.uint8)
    codes = q[..., :16] | (q[..., 16:] << 4)
    return codes.reshape(n, k // 2).contiguous(), d.contiguous(), m.contiguous()


def dequantize_q4_blocks(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight ``quantize_q4_blocks``' codes stand for, ``[N, K]`` in ``dtype`` (computed in fp32)."""
    n, half = codes.shape
    c = codes.reshape(n, half // 16, 16)
    q = torch.cat((c & 15, c >> 4), dim=-1).float()  # [N, K / 32, 32]
    return (q * scales.float()[..., None] + mins.float()[..., None]).reshape(n, 2 * half).to(dtype)


def int4_block_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                  float_out: bool = False) -> torch.Tensor:
    """``x [M, K] @ W.T`` for W as ``quantize_q4_blocks`` stores it, 1 <= M <= 4, fp32 sums; as
    ``int8_block_mm`` with 16 bytes of codes per block and the offsets m (sum_i w_i x_i = d sum_i q_i x_i
    + m sum_i x_i)."""
    return _load().int4_block_mm(x, codes, scales, mins, float_out)
