"""Decode attention read straight from a *quantized* paged KV pool (CPU, C++), dequantizing in registers.

The same computation as ``cpu_kernels.paged_decode`` (one query token per request, online softmax one
block of keys at a time, following the block table), over the formats of ``kvserve.kv.quant``:

    codes  [num_blocks, block_size, Hkv, Dc]  int8 | uint8 (q4 / q5) | float8_e4m3fn | float8_e5m2
    scales [num_blocks, block_size, Hkv]      16-bit scale words, one per token and KV head

    s_t  = (q_g . (code(k_t) - zp_t)) * k_scale_t * softmax_scale
    acc += e^(s_t - m) * v_scale_t * (code(v_t) - zp_t)     (the V scale rides on the softmax weight)

K and V may use different row codecs (int4: q5 keys, q4 values), each a template parameter. No
dequantized copy is ever made: each 16-value chunk of a row becomes two 8-float vectors in registers
and is used for all G query heads of the group at once. The per-codec decoding:

    int8   sign-extend, convert                                    (exact)
    q4     byte & 15, byte >> 4, minus the row's zero point, convert: the low nibbles are the even
           elements and the high nibbles the odd ones, so the kernel works on head rows permuted to
           [evens | odds] per 16 values: q is permuted once when it is loaded, the output un-permuted
           when it is stored
    q5     q4's nibbles OR the fifth bits (one byte for the 8 even elements of a chunk, one for the odd:
           the same order), minus the zero point
    e5m2   the top byte of a float16: shift left by 8, then the float16 -> float32 instruction (F16C)
    e4m3   sign | exponent | mantissa shifted into float16's fields: a float16 worth value * 2^-8
           (its exponent bias is 15, e4m3's 7; subnormals land on float16 subnormals, exact); the
           2^8 is folded into the token's scale

Kept from the unquantized kernel (see its docstring for the measurements behind each): G as a template
constant, each block's rows (and scales) loaded in one tight loop before its arithmetic, the next
block's rows prefetched a token at a time, cost-balanced work per thread, the polynomial exp, GCC vector
types (AVX2 or AVX-512 under -march=native, no ISA-specific intrinsics except F16C, guarded). New here:
a request's blocks may be cut into pieces when there are too few (request, head) items for the
threads (batch 1, MQA: one item would leave every other core idle); each piece keeps its own
(m, l, acc), merged after the parallel loop as in flash-decoding.

Its own extension ("kvserve_quant_kv_<cpu>"), so that editing it does not rebuild ``cpu_kernels``;
built by ``cpu_kernels.build_extension`` (same flags, same build notice) from ``cpu_kernels.SHARED_CPP``
(vector type, exp, the group-size switch) plus the code below. KVSERVE_CPU_KERNELS=0 turns it off too.
"""
from __future__ import annotations

import torch

from kvserve.kv.quant import RowCodec, codec, dequantize, kv_quant
from kvserve.models import cpu_kernels
from kvserve.models.cpu_kernels import build_extension

FORMATS = ("int8", "int4", "fp8_e4m3", "fp8_e5m2")  # the KV formats the decode kernel reads
# The row codecs by number, for the C++ side: its enum Codecs is written from this dict (INT8, Q4, E4M3, ...)
CODEC_IDS = {"int8": 0, "q4": 1, "fp8_e4m3": 2, "fp8_e5m2": 3, "q5": 4}
_CODEC_ENUM = "enum Codecs { " + ", ".join(f"{n.removeprefix('fp8_').upper()} = {i}"
                                           for n, i in CODEC_IDS.items()) + " };\n"

_SOURCE = cpu_kernels.SHARED_CPP + _CODEC_ENUM + r"""
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef int16_t i16x8 __attribute__((vector_size(16)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef int8_t i8x8 __attribute__((vector_size(8)));
typedef uint8_t u8x8 __attribute__((vector_size(8)));

static inline v8 loadf8(const float* p) { v8 r; std::memcpy(&r, p, sizeof(r)); return r; }

// Eight bytes -> eight int32. GCC turns __builtin_convertvector from an 8-byte vector into 32-bit lanes
// into scalar code (one byte at a time: int8 KV decoded 2x slower than fp8); AVX2 has one instruction.
static inline i32x8 widen_i8(const uint8_t* p) {
#ifdef __AVX2__
  const __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  i32x8 r; std::memcpy(&r, &w, 32); return r;
#else
  i8x8 x; std::memcpy(&x, p, 8);
  return __builtin_convertvector(__builtin_convertvector(x, i16x8), i32x8);
#endif
}
static inline i32x8 widen_u8(const uint8_t* p) {
#ifdef __AVX2__
  const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  i32x8 r; std::memcpy(&r, &w, 32); return r;
#else
  u8x8 x; std::memcpy(&x, p, 8);
  return __builtin_convertvector(__builtin_convertvector(x, u16x8), i32x8);
#endif
}

static inline float half_to_f(uint16_t h) {
#ifdef __F16C__
  return _cvtsh_ss(h);
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}
static inline v8 half8(u16x8 h) {  // eight float16 bit patterns -> floats
#ifdef __F16C__
  __m128i x; std::memcpy(&x, &h, 16);
  const __m256 f = _mm256_cvtph_ps(x);
  v8 r; std::memcpy(&r, &f, 32); return r;
#else
  v8 r; for (int i = 0; i < 8; ++i) r[i] = c10::detail::fp16_ieee_to_fp32_value(h[i]); return r;
#endif
}


// ---- the row codecs: 16 values of a head row -> two 8-float vectors (a, b) ----
// load(row, i, half, zp, a, b): chunk i (values 16i .. 16i + 15) of the row at ``row``; ``half`` = D / 2
// (where q5's fifth bits start); zp: the row's zero point (asymmetric codecs; 0 otherwise).
// MUL: folded into each token's scale. PERM: a = the even elements and b = the odd ones (the nibble
// order of q4 / q5), else a = elements 0-7, b = 8-15. ASYM: the scale word carries a zero point.
// (enum Codecs, the codecs' numbers, heads the source: written from CODEC_IDS)
constexpr int ZP_MASK = 31;
template <int K> struct Codec;
template <> struct Codec<INT8> {
  static constexpr float MUL = 1.f; static constexpr bool PERM = false, ASYM = false;
  static inline void load(const uint8_t* row, int64_t i, int64_t, int32_t, v8& a, v8& b) {
    a = __builtin_convertvector(widen_i8(row + 16 * i), v8);
    b = __builtin_convertvector(widen_i8(row + 16 * i + 8), v8);
  }
};
template <> struct Codec<Q4> {
  static constexpr float MUL = 1.f; static constexpr bool PERM = true, ASYM = true;
  static inline void load(const uint8_t* row, int64_t i, int64_t, int32_t zp, v8& a, v8& b) {
    const i32x8 w = widen_u8(row + 8 * i);
    a = __builtin_convertvector((w & 15) - zp, v8);
    b = __builtin_convertvector((w >> 4) - zp, v8);
  }
};
template <> struct Codec<Q5> {  // q4's nibbles, plus a fifth bit per value: bit k of hb[0] is element 2k's
  static constexpr float MUL = 1.f; static constexpr bool PERM = true, ASYM = true;
  static inline void load(const uint8_t* row, int64_t i, int64_t half, int32_t zp, v8& a, v8& b) {
    const i32x8 w = widen_u8(row + 8 * i);
    const uint8_t* hb = row + half + 2 * i;
    const i32x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
    const i32x8 he = ((i32x8{} + hb[0]) >> lane) & 1, ho = ((i32x8{} + hb[1]) >> lane) & 1;
    a = __builtin_convertvector(((w & 15) | (he << 4)) - zp, v8);
    b = __builtin_convertvector(((w >> 4) | (ho << 4)) - zp, v8);
  }
};
template <> struct Codec<E4M3> {  // s eeee mmm -> float16 s 0eeee mmm0000000 = value * 2^-8
  static constexpr float MUL = 256.f; static constexpr bool PERM = false, ASYM = false;
  static inline u16x8 bits(i8x8 x) {
    const u16x8 s = (u16x8)__builtin_convertvector(x, i16x8);  // sign-extended: bits 8-15 = the sign
    return (s << 7) & (uint16_t)0xBFFF;                           // keep bit 15 (sign), clear bit 14
  }
  static inline void load(const uint8_t* row, int64_t i, int64_t, int32_t, v8& a, v8& b) {
    i8x8 x, y; std::memcpy(&x, row + 16 * i, 8); std::memcpy(&y, row + 16 * i + 8, 8);
    a = half8(bits(x)); b = half8(bits(y));
  }
};
template <> struct Codec<E5M2> {  // e5m2 is the top byte of a float16
  static constexpr float MUL = 1.f; static constexpr bool PERM = false, ASYM = false;
  static inline void load(const uint8_t* row, int64_t i, int64_t, int32_t, v8& a, v8& b) {
    u8x8 x, y; std::memcpy(&x, row + 16 * i, 8); std::memcpy(&y, row + 16 * i + 8, 8);
    a = half8(__builtin_convertvector(x, u16x8) << 8); b = half8(__builtin_convertvector(y, u16x8) << 8);
  }
};

// Code bytes per head row of D values (kv.quant.RowCodec.packed_dim): q4 two values a byte, q5 also a
// fifth bit per value, the 8-bit codecs one byte each.
static inline int64_t code_bytes(int codec, int64_t D) {
  return codec == Q4 ? D / 2 : codec == Q5 ? D / 2 + D / 8 : D;
}

// A token's scale word -> its scale (times the codec's MUL) and zero point.
template <int K> static inline float scale_of(uint16_t w) {
  return Codec<K>::ASYM ? half_to_f(w & ~ZP_MASK) : half_to_f(w) * Codec<K>::MUL;
}
template <int K> static inline int32_t zero_of(uint16_t w) { return Codec<K>::ASYM ? (w & ZP_MASK) : 0; }

// Where a head row's element e sits in the kernel's order (int4: [evens | odds] per 16 values).
template <bool PERM> static inline int64_t pos(int64_t e) {
  if (!PERM) return e;
  const int64_t c = e & ~int64_t(15), i = e & 15;
  return c + (i & 1) * 8 + (i >> 1);
}

struct Pool {  // one layer's quantized K and V, per block [bs, H, Dc bytes] and scales [bs, H]
  const uint8_t *kc, *vc;
  const uint16_t *ks, *vs;  // scale words (float16 bits)
  int64_t H, D, bs, kDc, vDc;  // code bytes per head row of K and of V (int4: q5 keys, q4 values)
};

// Running state per (head, query head): m, l, and acc (D floats, in the kernel's element order).
template <int G, int KK, int KV>
static void decode_piece(const float* q, const Pool& P, const int64_t* table, int64_t begin, int64_t len, int64_t h0,
                         int64_t h1, int64_t j0, int64_t j1, float* s, float* ksc, float* vsc, int32_t* kzp,
                         int32_t* vzp, float* m, float* l, v8* acc) {
  using CK = Codec<KK>;
  using CV = Codec<KV>;
  static_assert(CK::PERM == CV::PERM, "K and V codecs must share the element order");
  const int64_t D = P.D, H = P.H, bs = P.bs, kDc = P.kDc, vDc = P.vDc, n16 = D / 16, nd = D / 8, nh = h1 - h0;
  const int64_t krs = H * kDc, vrs = H * vDc;  // bytes per token row (all heads) of K and of V
  for (int64_t x = 0; x < nh * G; ++x) {
    m[x] = -INFINITY;
    l[x] = 0.f;
    for (int64_t i = 0; i < nd; ++i) acc[x * nd + i] = v8{};
  }
  for (int64_t j = j0; j < j1; ++j) {  // keys [begin, len): a sliding window starts inside block begin / bs
    const int64_t n = std::min(bs, len - j * bs), t0 = j == begin / bs ? begin % bs : 0;
    const uint8_t* kblk = P.kc + table[j] * bs * krs;
    const uint8_t* vblk = P.vc + table[j] * bs * vrs;
    const uint16_t* ksb = P.ks + table[j] * bs * H;
    const uint16_t* vsb = P.vs + table[j] * bs * H;
    {  // the block's rows for heads [h0, h1), and its scales, loaded back to back: many misses in flight
      unsigned sink = 0;
      for (int64_t t = t0; t < n; ++t) {
        for (const auto& [blk, rs, dc] : {std::tuple{kblk, krs, kDc}, std::tuple{vblk, vrs, vDc}}) {
          const uintptr_t a = reinterpret_cast<uintptr_t>(blk + t * rs + h0 * dc) & ~uintptr_t(63);
          const uintptr_t e = reinterpret_cast<uintptr_t>(blk + t * rs + h1 * dc);
          for (uintptr_t c = a; c < e; c += 64) sink += *reinterpret_cast<const uint8_t*>(c);
        }
      }
      for (int64_t c = 0; c < n * H * 2; c += 64)
        sink += reinterpret_cast<const uint8_t*>(ksb)[c] + reinterpret_cast<const uint8_t*>(vsb)[c];
      volatile unsigned keep = sink;  // keep the loads: their values are not needed, their effect is
      (void)keep;
    }
    if (j + 1 < j1) {  // the next block's scales (its rows are asked for a token at a time below)
      __builtin_prefetch(P.ks + table[j + 1] * bs * H);
      __builtin_prefetch(P.vs + table[j + 1] * bs * H);
    }
    for (int64_t h = h0; h < h1; ++h) {
      const uint8_t* kb = kblk + h * kDc;  // token t of this block at kb + t * krs
      const uint8_t* vb = vblk + h * vDc;
      const uint8_t* kn = j + 1 < j1 ? P.kc + table[j + 1] * bs * krs + h * kDc : nullptr;
      const uint8_t* vn = j + 1 < j1 ? P.vc + table[j + 1] * bs * vrs + h * vDc : nullptr;
      for (int64_t t = t0; t < n; ++t) {
        const uint16_t kw = ksb[t * H + h], vw = vsb[t * H + h];
        ksc[t] = scale_of<KK>(kw);
        kzp[t] = zero_of<KK>(kw);
        vsc[t] = scale_of<KV>(vw);
        vzp[t] = zero_of<KV>(vw);
      }
      const float* qh = q + (h - h0) * G * D;
      float* mh = m + (h - h0) * G;
      float* lh = l + (h - h0) * G;
      v8* ah = acc + (h - h0) * G * nd;
      for (int64_t t = t0; t < n; ++t) {  // scores s[g * bs + t] = (q_g . code(k_t)) * k_scale_t
        if (kn) {
          for (int64_t c = 0; c < kDc; c += 64) __builtin_prefetch(kn + t * krs + c);
          for (int64_t c = 0; c < vDc; c += 64) __builtin_prefetch(vn + t * vrs + c);
        }
        v8 d0[G], d1[G];  // two sums per query head: twice the independent FMA chains
        for (int g = 0; g < G; ++g) d0[g] = d1[g] = v8{};
        for (int64_t i = 0; i < n16; ++i) {
          v8 a, b;
          CK::load(kb + t * krs, i, D / 2, kzp[t], a, b);
          for (int g = 0; g < G; ++g) {
            d0[g] += loadf8(qh + g * D + 16 * i) * a;
            d1[g] += loadf8(qh + g * D + 16 * i + 8) * b;
          }
        }
        for (int g = 0; g < G; ++g) s[g * bs + t] = hsum(d0[g] + d1[g]) * ksc[t];
      }
      float corr[G];
      for (int g = 0; g < G; ++g) {  // online softmax: rescale what came before to the new maximum
        float* sg = s + g * bs;
        float mx = mh[g];
        for (int64_t t = t0; t < n; ++t) mx = std::max(mx, sg[t]);
        corr[g] = std::exp(mh[g] - mx);  // 0 on the first block (m = -inf)
        float sum = 0.f;
        for (int64_t t = t0; t < n; ++t) {
          const float p = exp_nonpositive(sg[t] - mx);
          sum += p;
          sg[t] = p * vsc[t];  // the weight of code(v_t)
        }
        mh[g] = mx;
        lh[g] = lh[g] * corr[g] + sum;
      }
      for (int64_t i = 0; i < n16; ++i) {  // acc_g += sum_t p_gt v_scale_t code(v_t), 16 values at a time
        v8 a0[G], a1[G];
        for (int g = 0; g < G; ++g) {
          a0[g] = ah[g * nd + 2 * i] * corr[g];
          a1[g] = ah[g * nd + 2 * i + 1] * corr[g];
        }
        for (int64_t t = t0; t < n; ++t) {
          v8 a, b;
          CV::load(vb + t * vrs, i, D / 2, vzp[t], a, b);
          for (int g = 0; g < G; ++g) {
            a0[g] += s[g * bs + t] * a;
            a1[g] += s[g * bs + t] * b;
          }
        }
        for (int g = 0; g < G; ++g) {
          ah[g * nd + 2 * i] = a0[g];
          ah[g * nd + 2 * i + 1] = a1[g];
        }
      }
    }
  }
}

// q [B, H, G, D] (not scaled; paged_decode_call); codes [N, bs, H, Dc] (1 byte each; K's Dc and V's may
// differ), scales [N, bs, H] float16 (scale words); block_table [B, nb] int64; lens [B] int64, begins [B] int64 or empty (all 0):
// request b sees keys [begins[b], lens[b]). key_codec, value_codec: the format's two row codecs (Codecs),
// one of the pairs built below: int8 / int8, q5 / q4 (int4), e4m3 / e4m3, e5m2 / e5m2.
// D a multiple of 16 up to 512, G from 1 to 8. Returns [B, H, G, D] in q's dtype.
torch::Tensor paged_decode_quant(torch::Tensor q, torch::Tensor k_codes, torch::Tensor k_scales, torch::Tensor v_codes,
                                 torch::Tensor v_scales, torch::Tensor block_table, torch::Tensor lens,
                                 torch::Tensor begins, int64_t key_codec, int64_t value_codec, double sm_scale) {
  TORCH_CHECK(q.dim() == 4, "q: [B, H, G, D]");
  const int64_t H = q.size(1), D = q.size(3);
  TORCH_CHECK(D % 16 == 0 && D <= 512, "head_dim a multiple of 16 up to 512");
  const bool same = key_codec == value_codec && (key_codec == INT8 || key_codec == E4M3 || key_codec == E5M2);
  TORCH_CHECK(same || (key_codec == Q5 && value_codec == Q4),
              "codecs: int8 / int8, q5 / q4, e4m3 / e4m3 or e5m2 / e5m2 (keys / values)");
  const int64_t kDc = code_bytes(key_codec, D), vDc = code_bytes(value_codec, D);
  for (const auto& [c, dc] : {std::pair{k_codes, kDc}, std::pair{v_codes, vDc}})
    TORCH_CHECK(c.is_contiguous() && c.dim() == 4 && c.element_size() == 1 && c.size(2) == H && c.size(3) == dc
                && c.size(0) == k_codes.size(0) && c.size(1) == k_codes.size(1),
                "k/v codes: contiguous one-byte [N, bs, H, Dc]");
  for (const auto& s : {k_scales, v_scales})
    TORCH_CHECK(s.is_contiguous() && s.scalar_type() == torch::kHalf && s.dim() == 3 && s.size(0) == k_codes.size(0)
                && s.size(1) == k_codes.size(1) && s.size(2) == H, "k/v scales: contiguous float16 [N, bs, H]");
  const Pool P{static_cast<const uint8_t*>(k_codes.data_ptr()), static_cast<const uint8_t*>(v_codes.data_ptr()),
               static_cast<const uint16_t*>(k_scales.data_ptr()), static_cast<const uint16_t*>(v_scales.data_ptr()),
               H, D, k_codes.size(1), kDc, vDc};
  const int64_t nb = block_table.size(1);
  return paged_decode_call(q, block_table, lens, begins, [&](auto* qp, auto* op, const int64_t* table,
                                                             const int64_t* n, const int64_t* bp, auto g) {
    constexpr int GG = decltype(g)::value;
    auto with_codecs = [&](auto kc, auto vc) {
      constexpr int KK = decltype(kc)::value, KV = decltype(vc)::value;
      constexpr bool PERM = Codec<KK>::PERM;
      paged_decode_driver<GG>(qp, op, bp, n, q.size(0), H, D, P.bs, nb, (float)sm_scale,
          [](int64_t e) { return pos<PERM>(e); },
          [&](const float* qb, const Item& it, int64_t first, int64_t len, float* m, float* l, v8* acc) {
            thread_local std::vector<float> s, ksc, vsc;
            thread_local std::vector<int32_t> kzp, vzp;
            s.resize(GG * P.bs); ksc.resize(P.bs); vsc.resize(P.bs); kzp.resize(P.bs); vzp.resize(P.bs);
            decode_piece<GG, KK, KV>(qb, P, table + it.b * nb, first, len, it.h0, it.h1, it.j0, it.j1, s.data(),
                                     ksc.data(), vsc.data(), kzp.data(), vzp.data(), m, l, acc);
          });
    };
    using std::integral_constant;
    switch (key_codec) {  // the value codec follows from the key's (checked above)
      case INT8: with_codecs(integral_constant<int, INT8>{}, integral_constant<int, INT8>{}); break;
      case Q5: with_codecs(integral_constant<int, Q5>{}, integral_constant<int, Q4>{}); break;
      case E4M3: with_codecs(integral_constant<int, E4M3>{}, integral_constant<int, E4M3>{}); break;
      default: with_codecs(integral_constant<int, E5M2>{}, integral_constant<int, E5M2>{}); break;
    }
  });
}

// ---- the write: quantize new tokens' K or V rows and store them at their slots ----
// The same arithmetic as kv.quant.quantize, so that both give the same bytes (tested). Symmetric codecs:
// fp32 absmax, scale = absmax / qmax rounded to float16 and then up one step if rounding went down,
// y = x / scale clamped to +-qmax, then round-half-even (int8) or c10's float8 conversion (fp8).
// Asymmetric (q4, q5): lo = min(x, 0), hi = max(x, 0), scale = (hi - lo) / qmax as a float16 with its 5
// lowest mantissa bits cleared, rounded up; zp = round(-lo / scale); code = round(x / scale) + zp clamped
// to [0, qmax]; the scale word is the scale's bits | zp. One call per layer for K or V instead of ~20
// PyTorch ops: at batch 1 those dominated a quantized decode step.
static inline uint16_t scale_word(float ideal, int clear) {  // float16 bits, ``clear`` low bits 0, rounded up
  const uint16_t mask = uint16_t(~((1u << clear) - 1u)), top = uint16_t(0x7BFF & mask);
  uint16_t bits = c10::Half(ideal).x & mask;
  c10::Half h; h.x = bits;
  if (static_cast<float>(h) < ideal && bits < top && (bits > 0 || clear > 0)) bits += uint16_t(1u << clear);
  return bits;
}

template <typename T>
static void quantize_rows(const T* x, uint8_t* codes, uint16_t* scales, const int64_t* slots, int64_t T_, int64_t H,
                          int64_t D, int kind, float qmax) {
  const int64_t Dc = code_bytes(kind, D);
  at::parallel_for(0, T_ * H, 256, [&](int64_t rb, int64_t re) {
    std::vector<float> y(D);
    std::vector<int> q(D);
    for (int64_t r = rb; r < re; ++r) {
      const int64_t t = r / H, h = r % H, slot = slots[t];
      const T* row = x + r * D;
      uint8_t* out = codes + (slot * H + h) * Dc;
      float amax = 0.f, lo = 0.f, hi = 0.f;
      for (int64_t i = 0; i < D; ++i) {
        y[i] = static_cast<float>(row[i]);
        amax = std::max(amax, std::abs(y[i])); lo = std::min(lo, y[i]); hi = std::max(hi, y[i]);
      }
      if (kind == Q4 || kind == Q5) {
        const uint16_t bits = scale_word((hi - lo) / qmax, 5);
        c10::Half sh; sh.x = bits;
        const float sf = static_cast<float>(sh), safe = sf > 0.f ? sf : 1.f;
        const int zp = sf > 0.f ? static_cast<int>(std::min(std::max(std::nearbyint(-lo / safe), 0.f), qmax)) : 0;
        for (int64_t i = 0; i < D; ++i)
          q[i] = sf > 0.f ? static_cast<int>(std::min(std::max(std::nearbyint(y[i] / safe) + zp, 0.f), qmax)) : 0;
        for (int64_t j = 0; j < D / 2; ++j) out[j] = static_cast<uint8_t>((q[2 * j] & 15) | ((q[2 * j + 1] & 15) << 4));
        if (kind == Q5)
          for (int64_t c = 0; c < D / 16; ++c)
            for (int par = 0; par < 2; ++par) {
              uint8_t byte = 0;
              for (int k = 0; k < 8; ++k) byte |= uint8_t(((q[16 * c + 2 * k + par] >> 4) & 1) << k);
              out[D / 2 + 2 * c + par] = byte;
            }
        scales[slot * H + h] = uint16_t(bits | zp);
        continue;
      }
      const uint16_t bits = scale_word(amax / qmax, 0);
      c10::Half s; s.x = bits;
      const float sf = static_cast<float>(s);
      scales[slot * H + h] = bits;
      for (int64_t i = 0; i < D; ++i) y[i] = sf > 0.f ? std::min(std::max(y[i] / sf, -qmax), qmax) : 0.f;
      switch (kind) {
        case INT8: for (int64_t i = 0; i < D; ++i) out[i] = static_cast<uint8_t>(static_cast<int8_t>(std::nearbyint(y[i]))); break;
        case E4M3: for (int64_t i = 0; i < D; ++i) out[i] = c10::Float8_e4m3fn(y[i]).x; break;
        default: for (int64_t i = 0; i < D; ++i) out[i] = c10::Float8_e5m2(y[i]).x; break;
      }
    }
  });
}

// x [T, H, D] float32 or bfloat16; codes [S, H, Dc] one-byte, contiguous (one layer's K or V pool); scales
// [S, H] float16; slots [T] int64 < S. kind, qmax: the row codec (0 int8, 1 q4, 2 fp8 e4m3, 3 fp8 e5m2, 4 q5).
void quantize_write(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor slots, int64_t kind,
                    double qmax) {
  TORCH_CHECK(x.is_contiguous() && x.dim() == 3 && (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16),
              "x: contiguous float32 or bfloat16 [T, H, D]");
  TORCH_CHECK(kind >= 0 && kind <= 4, "kind: 0 int8, 1 q4, 2 fp8_e4m3, 3 fp8_e5m2, 4 q5");
  const int64_t T_ = x.size(0), H = x.size(1), D = x.size(2);
  const int64_t Dc = code_bytes(int(kind), D);
  TORCH_CHECK(D % 16 == 0 && codes.is_contiguous() && codes.element_size() == 1 && codes.dim() == 3 && codes.size(1) == H
              && codes.size(2) == Dc, "codes: contiguous one-byte [S, H, Dc]");
  TORCH_CHECK(scales.is_contiguous() && scales.scalar_type() == torch::kHalf && scales.dim() == 2
              && scales.size(0) == codes.size(0) && scales.size(1) == H, "scales: contiguous float16 [S, H]");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.numel() == T_, "slots: int64 [T]");
  auto sl = slots.contiguous();
  const int64_t S = codes.size(0);
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t t = 0; t < T_; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < S, "slot out of range");
  auto* cp = static_cast<uint8_t*>(codes.data_ptr());
  auto* scp = static_cast<uint16_t*>(scales.data_ptr());
  pybind11::gil_scoped_release no_gil;
  if (x.scalar_type() == torch::kFloat)
    quantize_rows(x.data_ptr<float>(), cp, scp, sp, T_, H, D, (int)kind, (float)qmax);
  else
    quantize_rows(x.data_ptr<c10::BFloat16>(), cp, scp, sp, T_, H, D, (int)kind, (float)qmax);
}
"""

_state: dict = {"module": None, "tried": False}


def _load():
    """Build on first call (~1 minute, cached under ~/.cache/torch_extensions) or return the extension."""
    if not _state["tried"]:
        _state["tried"] = True
        _state["module"] = build_extension("kvserve_quant_kv", _SOURCE, ["paged_decode_quant", "quantize_write"], "quantized-KV kernel")
    return _state["module"]


def available() -> bool:
    return _load() is not None


def supports_quant(head_dim: int, group: int, kind: str) -> bool:
    """Whether the kernel takes this shape and format (head_dim in 16-value chunks up to 512, 1 to 8
    query heads per KV head) and has been built."""
    return kind in FORMATS and head_dim % 16 == 0 and head_dim <= 512 and 1 <= group <= 8 and available()


def _check_codes(codes: torch.Tensor, c, what: str) -> None:
    if codes.dtype != c.code_dtype:
        raise TypeError(f"{what}: {c.name} codes are {c.code_dtype}, got {codes.dtype}")


def paged_decode_quant(q: torch.Tensor, k_codes: torch.Tensor, k_scales: torch.Tensor, v_codes: torch.Tensor,
                       v_scales: torch.Tensor, block_table: torch.Tensor, lens: torch.Tensor, kind: str,
                       begins: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention for q ``[B, Hkv, G, D]`` (fp32 or bf16) over each request's first ``lens[b]``
    cached tokens, read through ``block_table [B, n]`` from one layer's quantized pool: codes
    ``[num_blocks, block_size, Hkv, Dc]``, scales ``[num_blocks, block_size, Hkv]`` float16, in format
    ``kind``. Returns ``[B, Hkv, G, D]`` in q's dtype. ``begins[b]``: the first key request b sees (a
    sliding window; None: 0)."""
    fmt = kv_quant(kind)
    _check_codes(k_codes, fmt.key, "keys")
    _check_codes(v_codes, fmt.value, "values")
    return _load().paged_decode_quant(q, k_codes, k_scales, v_codes, v_scales, block_table, lens,
                                      cpu_kernels.NO_BEGINS if begins is None else begins,
                                      CODEC_IDS[fmt.key.name], CODEC_IDS[fmt.value.name], q.shape[-1] ** -0.5)


def paged_decode_quant_reference(q: torch.Tensor, k_codes: torch.Tensor, k_scales: torch.Tensor,
                                 v_codes: torch.Tensor, v_scales: torch.Tensor, block_table: torch.Tensor,
                                 lens: torch.Tensor, kind: str, begins: torch.Tensor | None = None) -> torch.Tensor:
    """The same in plain PyTorch (any device): gather the blocks, dequantize them to fp32, mask outside
    [begins, lens), softmax; as ``cpu_kernels.paged_decode_reference`` on the dequantized pool."""
    fmt = kv_quant(kind)
    k = dequantize(k_codes[block_table], k_scales[block_table], fmt.key).flatten(1, 2).transpose(1, 2)  # [B, Hkv, L, D]
    v = dequantize(v_codes[block_table], v_scales[block_table], fmt.value).flatten(1, 2).transpose(1, 2)
    keys = torch.arange(k.shape[2], device=q.device)[None, :]
    visible = keys < lens[:, None]
    if begins is not None:
        visible &= keys >= begins[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), k, v, attn_mask=visible[:, None, None, :])
    return out.to(q.dtype)


def quantize_write(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor,
                   kind: str | RowCodec) -> None:
    """Quantize ``x [T, Hkv, D]`` (fp32 or bf16) with row codec ``kind`` and store codes and scales at
    ``slots`` of one layer's K or V pool: codes ``[num_slots, Hkv, Dc]``, scales ``[num_slots, Hkv]``.
    The bytes of ``kv.quant.quantize`` followed by an index_copy, in one call."""
    c = codec(kind)
    _check_codes(codes, c, "quantize_write")
    _load().quantize_write(x.contiguous(), codes, scales, slots, CODEC_IDS[c.name], c.qmax)
