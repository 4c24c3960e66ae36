"""One small C++ kernel: single-token decode attention read straight from the paged KV pool (CPU).

Why a kernel at all: a decode step is bound by reading the cache. In plain PyTorch the step's K/V are
first gathered from their blocks into a padded copy (read + write every byte), then SDPA reads the copy
again: three passes over the bytes. vLLM's PagedAttention reads each cached byte once, following the
block table inside the kernel; this is the same idea in ~150 lines of C++ for the CPU.

It computes exactly what ``paged_decode_reference`` below computes (the tests compare them), with an
online softmax (flash-decoding style) one block of keys at a time:

    for each request b (or (b, KV head) when there are fewer requests than 2 per thread), in parallel:
        m, l, acc = -inf, 0, 0                               per KV head h and query head g of its group
        for each block in b's block table, t < lens[b]:      (asking for the next block's rows meanwhile)
            s_t = q_g . k_t * scale                         t in this block
            m'  = max(m, max_t s_t);  acc *= e^(m - m');  l *= e^(m - m')
            acc += sum_t e^(s_t - m') v_t;  l += sum_t e^(s_t - m');  m = m'
        out_g = acc / l

What made it fast, measured on the AVX2 machine (2 threads, 64 requests x ~250 cached tokens, fp32, the
30 layers' KV out of cache): ~12 GB/s for the first version -> ~18 GB/s (a plain read of the same blocks
runs at ~30 GB/s; the arithmetic alone, from cache, at ~40 GB/s).
  * the pool on 2 MiB pages (kvserve/hugepages.py): with 4 KiB pages each scattered block was a TLB miss;
  * each block loaded in one tight loop before its arithmetic (a memory-copy access pattern keeps many
    misses in flight), and the next block's rows prefetched a token at a time while this one computes;
  * the group size G as a template constant, so each K/V vector is loaded once for all G query heads;
  * vector code through GCC vector types and a polynomial exp (libm's expf is a scalar call);
  * work split into equal *costs* (tokens to read) per thread, not equal counts of requests.

Built on first use with ``torch.utils.cpp_extension.load_inline`` (g++ and ninja; ~1 minute, cached per
CPU type and Python environment under ~/.cache/torch_extensions/kvserve-<env>; later processes load the
build in ~0.1 s). A build says so on stderr (a logging warning) once it has run for a second or two,
instead of a silent minute. Anything missing -> a warning and the PyTorch path. KVSERVE_CPU_KERNELS=0
turns it off.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sys
import threading
import time

import torch

log = logging.getLogger("kvserve")

# What both C++ extensions (this one and ``cpu_quant_kernels``) start with: headers, the 8-float vector
# type, a horizontal sum and a vectorizable exp.
SHARED_CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

// Eight floats as one value: GCC/Clang vector extensions, which become AVX2/AVX-512 (or NEON)
// instructions under -march=native, with no intrinsics tied to one instruction set.
typedef float v8 __attribute__((vector_size(32)));
static inline float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// exp(x) for x <= 0 in plain arithmetic the compiler can vectorize (libm's expf is a scalar call).
// Cephes' expf: x = k ln2 + r, e^r by a degree-6 polynomial, 2^k through the exponent bits; ~1 ulp.
static inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float k = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// f(std::integral_constant<int, G>{}) for G query heads per KV head, 1 to 8: G as a template constant,
// so that the G running sums of the inner loops live in registers.
template <typename F>
static inline void with_group(int64_t G, F&& f) {
  switch (G) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

// bf16 is the top half of a float: widen by a shift; round to nearest even on the low 16 bits (finite values:
// activations here are never NaN or near FLT_MAX). In plain integer arithmetic (c10's carry a NaN branch),
// so loops vectorize.
static inline float to_f(float x) { return x; }
static inline float to_f(c10::BFloat16 x) { uint32_t u = uint32_t(x.x) << 16; float f; std::memcpy(&f, &u, 4); return f; }
static inline void store_f(float* p, float x) { *p = x; }
static inline void store_f(c10::BFloat16* p, float x) {
  uint32_t u; std::memcpy(&u, &x, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  *p = c10::BFloat16(uint16_t(u >> 16), c10::BFloat16::from_bits());
}

// ---- paged decode: how the work is cut and merged, shared by the plain and the quantized kernels ----
// One piece of work: request b, KV heads [h0, h1), its blocks [j0, j1). part < 0: the whole request.
struct Item { int64_t b, h0, h1, j0, j1, part; };

// Decode attention for q [B, H, G, D] (TQ: float or bf16, not yet scaled) into out [B, H, G, D] (TQ).
// Items: whole requests when there are enough of them to share among the threads (reads stay
// sequential), else (request, KV head). A request longer than a fair share of the work is cut into
// pieces of whole blocks, each with its own softmax state, merged at the end, so that one request (batch
// 1: SmolLM2's 3 KV heads on 2 threads) or one KV head (MQA) is not one thread's work while the others
// wait. The items are then cut into one contiguous run per thread of about equal cost (tokens to read).
// piece(qb, item, first, len, m, l, acc) reads one item's keys [first, len) of blocks [j0, j1) into a
// softmax state: m, l [nh * G] and acc [nh * G, D / 8], with element e of a row at pos(e) (the int4
// cache's order; the identity elsewhere); qb is q scaled by sm_scale, in the same order.
template <int G, typename TQ, typename Pos, typename Piece>
static void paged_decode_driver(const TQ* q, TQ* out, const int64_t* begins, const int64_t* lens, int64_t B,
                                int64_t H, int64_t D, int64_t bs, int64_t nb, float sm_scale, Pos pos, Piece piece) {
  const int64_t nd = D / 8, threads = at::get_num_threads();
  const int64_t hp = B >= 2 * threads ? H : 1;
  std::vector<int64_t> len(B), first(B);
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    len[b] = std::max<int64_t>(0, std::min(lens[b], nb * bs));  // never past the table
    first[b] = std::max<int64_t>(0, std::min(begins ? begins[b] : 0, len[b] - 1));
    total += (len[b] - first[b]) * (H / hp);
  }
  const int64_t per_piece = std::max<int64_t>(4, (total / (4 * threads) + bs - 1) / bs);  // blocks per piece
  std::vector<Item> items;
  std::vector<int64_t> first_part(B * H, -1), num_parts(B * H, 0);
  int64_t parts = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h0 = 0; h0 < H; h0 += hp) {
      const int64_t jb = first[b] / bs, blocks = (len[b] + bs - 1) / bs;
      const int64_t np = std::max<int64_t>(1, (blocks - jb + per_piece - 1) / per_piece);
      if (np > 1) { first_part[b * H + h0] = parts; num_parts[b * H + h0] = np; }
      for (int64_t p = 0; p < np; ++p)
        items.push_back({b, h0, h0 + hp, jb + p * per_piece, std::min(blocks, jb + (p + 1) * per_piece),
                         np > 1 ? parts++ : -1});
    }
  const int64_t ni = items.size();
  auto cost = [&](const Item& it) {
    return (std::min(len[it.b], it.j1 * bs) - std::max(it.j0 * bs, first[it.b])) * (it.h1 - it.h0) + 1;
  };
  int64_t tot = 0;
  for (const Item& it : items) tot += cost(it);
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(threads, ni));
  std::vector<int64_t> start(nt + 1, ni);
  start[0] = 0;
  for (int64_t x = 0, done = 0, t = 1; x < ni && t < nt; ++x) {  // one contiguous run of equal cost per thread
    done += cost(items[x]);
    while (t < nt && done * nt >= tot * t) start[t++] = x + 1;
  }
  // pieces' states: m, l [parts, hp, G] (hp = 1 whenever there are pieces... or H), acc [parts, hp, G, D]
  std::vector<float> pm(parts * hp * G), pl(parts * hp * G);
  std::vector<v8> pacc(parts * hp * G * nd);
  auto write_out = [&](TQ* o, const v8* a, float inv) {  // one head row, back to the natural order
    const float* f = reinterpret_cast<const float*>(a);
    for (int64_t e = 0; e < D; ++e) store_f(o + e, f[pos(e)] * inv);
  };
  at::parallel_for(0, nt, 1, [&](int64_t tb, int64_t te) {
    std::vector<float> m(hp * G), l(hp * G), qb(hp * G * D);
    std::vector<v8> acc(hp * G * nd);
    for (int64_t t = tb; t < te; ++t)
      for (int64_t x = start[t]; x < start[t + 1]; ++x) {
        const Item& it = items[x];
        const int64_t nh = it.h1 - it.h0;
        const TQ* qi = q + (it.b * H + it.h0) * G * D;
        for (int64_t r = 0; r < nh * G; ++r)  // q scaled, in the piece's element order
          for (int64_t e = 0; e < D; ++e) qb[r * D + pos(e)] = to_f(qi[r * D + e]) * sm_scale;
        piece(qb.data(), it, first[it.b], len[it.b], m.data(), l.data(), acc.data());
        if (it.part < 0) {
          TQ* o = out + (it.b * H + it.h0) * G * D;
          for (int64_t r = 0; r < nh * G; ++r) write_out(o + r * D, acc.data() + r * nd, l[r] > 0.f ? 1.f / l[r] : 0.f);
        } else {
          std::copy(m.begin(), m.end(), pm.begin() + it.part * hp * G);
          std::copy(l.begin(), l.end(), pl.begin() + it.part * hp * G);
          std::copy(acc.begin(), acc.end(), pacc.begin() + it.part * hp * G * nd);
        }
      }
  });
  if (parts == 0) return;
  at::parallel_for(0, B * H, 1, [&](int64_t xb, int64_t xe) {  // merge the pieces of each cut request
    std::vector<v8> acc(hp * G * nd);
    for (int64_t x = xb; x < xe; ++x) {
      const int64_t p0 = first_part[x], np = num_parts[x];
      if (np == 0) continue;
      for (int64_t r = 0; r < hp * G; ++r) {
        float mx = -INFINITY, L = 0.f;
        for (int64_t p = 0; p < np; ++p) mx = std::max(mx, pm[(p0 + p) * hp * G + r]);
        for (int64_t i = 0; i < nd; ++i) acc[r * nd + i] = v8{};
        for (int64_t p = 0; p < np; ++p) {
          const float w = std::exp(pm[(p0 + p) * hp * G + r] - mx);  // 0 for an empty piece
          L += pl[(p0 + p) * hp * G + r] * w;
          for (int64_t i = 0; i < nd; ++i) acc[r * nd + i] += pacc[((p0 + p) * hp * G + r) * nd + i] * w;
        }
        write_out(out + x * G * D + r * D, acc.data() + r * nd, L > 0.f ? 1.f / L : 0.f);
      }
    }
  });
}

// The checks and the call both decode kernels share: q [B, H, G, D] float32 or bfloat16 (made contiguous:
// a decode's q is a view of the qkv product; another float type, an fp16 model's, goes through float32 and
// comes back in its own), block_table [B, nb] int64, lens [B] int64, begins [B] int64 or empty (all 0).
// Calls run(q, out, table, lens, begins or nullptr, G as a constant); returns out in q's dtype.
template <typename Run>
static torch::Tensor paged_decode_call(torch::Tensor q, torch::Tensor block_table, torch::Tensor lens, torch::Tensor begins,
                                       Run run) {
  TORCH_CHECK(q.dim() == 4 && q.is_floating_point(), "q: floating point [B, H, G, D]");
  TORCH_CHECK(q.size(2) >= 1 && q.size(2) <= 8, "1 to 8 query heads per KV head");
  const int64_t B = q.size(0);
  TORCH_CHECK(block_table.scalar_type() == torch::kLong && block_table.dim() == 2 && block_table.size(0) == B
              && lens.scalar_type() == torch::kLong && lens.numel() == B && begins.scalar_type() == torch::kLong
              && (begins.numel() == B || begins.numel() == 0), "int64 block table [B, n], lens [B], begins [B] or empty");
  const bool native = q.scalar_type() == torch::kFloat || q.scalar_type() == torch::kBFloat16;
  auto qc = native ? q.contiguous() : q.to(torch::kFloat).contiguous();
  auto table = block_table.contiguous();
  auto n = lens.contiguous();
  auto bg = begins.contiguous();
  auto out = torch::empty_like(qc);
  const int64_t* bp = bg.numel() ? bg.data_ptr<int64_t>() : nullptr;
  pybind11::gil_scoped_release no_gil;
  with_group(q.size(2), [&](auto g) {
    if (qc.scalar_type() == torch::kFloat)
      run(qc.data_ptr<float>(), out.data_ptr<float>(), table.data_ptr<int64_t>(), n.data_ptr<int64_t>(), bp, g);
    else
      run(qc.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), table.data_ptr<int64_t>(), n.data_ptr<int64_t>(), bp, g);
  });
  return native ? out : out.to(q.scalar_type());
}
"""

_SOURCE = SHARED_CPP + r"""

typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

static inline v8 load8(const float* p) { v8 r; std::memcpy(&r, p, sizeof(r)); return r; }
static inline v8 load8(const c10::BFloat16* p) {  // bf16 is the top half of a float: widen and shift
  u16x8 h; std::memcpy(&h, p, sizeof(h));
  u32x8 w = __builtin_convertvector(h, u32x8) << 16;
  v8 r; std::memcpy(&r, &w, sizeof(r)); return r;
}
static inline v8 load8(const c10::Half* p) {
  float f[8];
  for (int i = 0; i < 8; ++i) f[i] = static_cast<float>(p[i]);
  return load8(f);
}


// One piece (paged_decode_driver): KV heads [h0, h1) of one request, blocks [j0, j1) of its table, keys
// [begin, len); each head's G query heads (q pre-scaled) into the running softmax state m, l, acc.
// Block by block, all the item's heads at once: a block's K (and V) rows for those heads sit side by side
// in memory, so the hardware streams them; one head at a time reads 1/H of every line it touches.
// G is a template constant so the G running sums of each inner loop live in registers: every K or V
// vector is loaded once and used G times.
template <int G, typename T>
static void decode_piece(const float* q, const T* kp, const T* vp, const int64_t* table, int64_t begin, int64_t len,
                         int64_t j0, int64_t j1, int64_t H, int64_t h0, int64_t h1, int64_t D, int64_t bs, float* s,
                         v8* acc, float* m, float* l) {
  const int64_t nd = D / 8, stride = H * D, nh = h1 - h0;  // 8-float chunks per head; floats per token row
  for (int64_t x = 0; x < nh * G; ++x) {
    m[x] = -INFINITY;
    l[x] = 0.f;
    for (int64_t i = 0; i < nd; ++i) acc[x * nd + i] = v8{};
  }
  // Keys [begin, len): a sliding window starts at block begin / bs, inside it at t0 (blocks before it may
  // be gone: the null block)
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t n = std::min(bs, len - j * bs), t0 = j == begin / bs ? begin % bs : 0;
    {  // First load the block's rows back to back with nothing else to do: many cache misses in flight at
       // once, as in a plain memory copy. The arithmetic below then reads from cache. Loading inside the
       // arithmetic left few misses in flight, and memory waited on compute: 12 -> 18 GB/s this way.
      v8 sink = v8{};
      const T* kr = kp + (table[j] * bs * H + h0) * D;
      const T* vr = vp + (table[j] * bs * H + h0) * D;
      const int64_t w = (h1 - h0) * D;
      for (int64_t t = t0; t < n; ++t)
        for (int64_t c = 0; c < w; c += 64 / (int64_t)sizeof(T)) sink += load8(kr + t * stride + c) + load8(vr + t * stride + c);
      volatile float keep = hsum(sink);  // keep the loads: their values are not needed, their effect is
      (void)keep;
    }
    for (int64_t h = h0; h < h1; ++h) {
      const T* kb = kp + (table[j] * bs * H + h) * D;  // token t of this block at kb + t * stride
      const T* vb = vp + (table[j] * bs * H + h) * D;
      // The next block's rows for this head, requested a token at a time while this block computes:
      // scattered blocks defeat the hardware prefetcher, and memory then waits on arithmetic.
      const char* kn = j + 1 < j1 ? reinterpret_cast<const char*>(kp + (table[j + 1] * bs * H + h) * D) : nullptr;
      const char* vn = j + 1 < j1 ? reinterpret_cast<const char*>(vp + (table[j + 1] * bs * H + h) * D) : nullptr;
      const float* qh = q + (h - h0) * G * D;
      float* mh = m + (h - h0) * G;
      float* lh = l + (h - h0) * G;
      v8* ah = acc + (h - h0) * G * nd;
      for (int64_t t = t0; t < n; ++t) {  // scores s[g * bs + t] = q_g . k_t (q is pre-scaled)
        if (kn)
          for (int64_t c = 0; c < D * (int64_t)sizeof(T); c += 64) {
            __builtin_prefetch(kn + t * stride * (int64_t)sizeof(T) + c);
            __builtin_prefetch(vn + t * stride * (int64_t)sizeof(T) + c);
          }
        v8 dot[G];
        for (int g = 0; g < G; ++g) dot[g] = v8{};
        for (int64_t i = 0; i < nd; ++i) {
          const v8 k = load8(kb + t * stride + 8 * i);
          for (int g = 0; g < G; ++g) dot[g] += load8(qh + g * D + 8 * i) * k;
        }
        for (int g = 0; g < G; ++g) s[g * bs + t] = hsum(dot[g]);
      }
      float corr[G];
      for (int g = 0; g < G; ++g) {  // online softmax: rescale what came before to the new maximum
        float* sg = s + g * bs;
        float mx = mh[g];
        for (int64_t t = t0; t < n; ++t) mx = std::max(mx, sg[t]);
        corr[g] = std::exp(mh[g] - mx);  // 0 on the first block (m = -inf)
        float sum = 0.f;
        for (int64_t t = t0; t < n; ++t) {
          sg[t] = exp_nonpositive(sg[t] - mx);
          sum += sg[t];
        }
        mh[g] = mx;
        lh[g] = lh[g] * corr[g] + sum;
      }
      for (int64_t i = 0; i < nd; ++i) {  // acc_g += sum_t p_gt v_t, one 8-float chunk of D at a time
        v8 a[G];
        for (int g = 0; g < G; ++g) a[g] = ah[g * nd + i] * corr[g];
        for (int64_t t = t0; t < n; ++t) {
          const v8 v = load8(vb + t * stride + 8 * i);
          for (int g = 0; g < G; ++g) a[g] += s[g * bs + t] * v;
        }
        for (int g = 0; g < G; ++g) ah[g * nd + i] = a[g];
      }
    }
  }
}

// ---- the small per-token ops of a layer, one pass each (in PyTorch each is several ops and a dispatch) ----
// Rows of n values (fp32 or bf16), the last dimension contiguous; rows split among threads in chunks of 16.
// Arithmetic is in fp32. For bf16, `rnd<T>` rounds a value to bf16 wherever the PyTorch reference (a chain
// of bf16 ops, each rounding its result) does, so the two agree bit for bit but for fp32 summation order.
// The bf16 conversions in plain integer arithmetic (c10's carry a NaN branch), so loops vectorize:
// bf16 is the top half of a float; rounding to it is round-to-nearest-even on the low 16 bits.
// (to_f and store_f: SHARED_CPP)
template <typename T> static inline T from_f(float x) { T r; store_f(&r, x); return r; }
template <typename T> static inline float rnd(float x) { return to_f(from_f<T>(x)); }  // identity for float

// out = rnd(x / sqrt(mean(x^2) + eps)) * w, per row (HF's LlamaRMSNorm: normalize in fp32, cast, scale)
template <typename T>
static void rms_row(const T* x, const T* w, T* out, int64_t n, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += to_f(x[i]) * to_f(x[i]);
  const float r = 1.f / std::sqrt(ss / n + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = from_f<T>(rnd<T>(to_f(x[i]) * r) * to_f(w[i]));
}

// Call f with a null pointer of the tensor's element type (float or bf16), to pick a template instance.
template <typename F>
static void with_type(const torch::Tensor& t, const char* what, F f) {
  if (t.scalar_type() == torch::kFloat) f(static_cast<float*>(nullptr));
  else if (t.scalar_type() == torch::kBFloat16) f(static_cast<c10::BFloat16*>(nullptr));
  else TORCH_CHECK(false, what, ": float32 or bfloat16");
}
#define ELEM(p) std::remove_pointer_t<decltype(p)>

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && w.is_contiguous() && w.scalar_type() == x.scalar_type(), "rms_norm: [T, n]");
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  const int64_t n = x.size(1), sx = x.stride(0);
  with_type(x, "rms_norm", [&](auto* tag) {
    using T = ELEM(tag);
    const T* xp = x.data_ptr<T>(); const T* wp = w.data_ptr<T>(); T* op = out.data_ptr<T>();
    at::parallel_for(0, x.size(0), 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) rms_row(xp + t * sx, wp, op + t * n, n, (float)eps);
    });
  });
  return out;
}

// The residual stream and the next norm in one pass: h += delta (in place), return rms_norm(h).
torch::Tensor add_rms_norm(torch::Tensor h, torch::Tensor delta, torch::Tensor w, double eps) {
  TORCH_CHECK(h.is_contiguous() && delta.is_contiguous() && h.sizes() == delta.sizes() && h.dim() == 2 && w.is_contiguous()
              && delta.scalar_type() == h.scalar_type() && w.scalar_type() == h.scalar_type(), "add_rms_norm: contiguous [T, n]");
  auto out = torch::empty_like(h);
  const int64_t n = h.size(1);
  with_type(h, "add_rms_norm", [&](auto* tag) {
    using T = ELEM(tag);
    T* hp = h.data_ptr<T>(); const T* dp = delta.data_ptr<T>(); const T* wp = w.data_ptr<T>(); T* op = out.data_ptr<T>();
    at::parallel_for(0, h.size(0), 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        for (int64_t i = 0; i < n; ++i) hp[t * n + i] = from_f<T>(to_f(hp[t * n + i]) + to_f(dp[t * n + i]));
        rms_row(hp + t * n, wp, op + t * n, n, (float)eps);
      }
    });
  });
  return out;
}

// SwiGLU on the fused gate/up product [T, 2I] -> silu(gate) * up [T, I]; silu(x) = x * sigmoid(x).
torch::Tensor silu_and_mul(torch::Tensor gu) {
  TORCH_CHECK(gu.is_contiguous() && gu.dim() == 2, "silu_and_mul: contiguous [T, 2I]");
  const int64_t I = gu.size(1) / 2;
  auto out = torch::empty({gu.size(0), I}, gu.options());
  with_type(gu, "silu_and_mul", [&](auto* tag) {
    using T = ELEM(tag);
    const T* gp = gu.data_ptr<T>(); T* op = out.data_ptr<T>();
    at::parallel_for(0, gu.size(0), 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const T* g = gp + t * 2 * I; const T* u = g + I; T* o = op + t * I;
        for (int64_t i = 0; i < I; ++i) {
          const float x = to_f(g[i]), z = exp_nonpositive(-std::abs(x));  // e^-|x| never overflows
          const float sig = x >= 0.f ? 1.f / (1.f + z) : z / (1.f + z);
          o[i] = from_f<T>(rnd<T>(x * sig) * to_f(u[i]));
        }
      }
    });
  });
  return out;
}

// RoPE in place, HF's rotate-half form, on x [T, heads, D] (last dim contiguous): for i < D/2,
// (x_i, x_{i+D/2}) <- (x_i cos_i - x_{i+D/2} sin_i, x_{i+D/2} cos_{i+D/2} + x_i sin_{i+D/2}),
// cos/sin rows [max_pos, D] (x's dtype) picked by each token's position.
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && cos.is_contiguous() && sin.is_contiguous()
              && cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type()
              && positions.scalar_type() == torch::kLong && x.size(2) <= 256, "rotary_: [T, heads, D <= 256]");
  const int64_t heads = x.size(1), D = x.size(2), half = D / 2, st = x.stride(0), sh = x.stride(1);
  auto pos = positions.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  with_type(x, "rotary_", [&](auto* tag) {
    using T = ELEM(tag);
    T* xp = x.data_ptr<T>(); const T* cp = cos.data_ptr<T>(); const T* sp = sin.data_ptr<T>();
    at::parallel_for(0, x.size(0), 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const T* c = cp + pp[t] * D; const T* s = sp + pp[t] * D;
        float cf[256], sf[256];  // this position's table row in fp32, once for all heads (D <= 256)
        for (int64_t i = 0; i < D; ++i) { cf[i] = to_f(c[i]); sf[i] = to_f(s[i]); }
        for (int64_t h = 0; h < heads; ++h) {
          T* r = xp + t * st + h * sh;
          float a[128], bb[128];  // both halves read before either is written: no aliasing to stop vectorizing
          for (int64_t i = 0; i < half; ++i) { a[i] = to_f(r[i]); bb[i] = to_f(r[i + half]); }
          for (int64_t i = 0; i < half; ++i) {
            r[i] = from_f<T>(rnd<T>(a[i] * cf[i]) - rnd<T>(bb[i] * sf[i]));
            r[i + half] = from_f<T>(rnd<T>(bb[i] * cf[i + half]) + rnd<T>(a[i] * sf[i + half]));
          }
        }
      }
    });
  });
}

// q [B, H, G, D] (not scaled; paged_decode_call); k/v blocks [num_blocks, bs, H, D]; block_table [B, nb]
// int64; lens [B] int64 (>= 1); begins [B] int64 or empty: request b sees keys [begins[b], lens[b]) (0
// but under a sliding window). D a multiple of 8 up to 256, G from 1 to 8. Returns [B, H, G, D] in q's dtype.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_blocks, torch::Tensor v_blocks,
                           torch::Tensor block_table, torch::Tensor lens, torch::Tensor begins, double sm_scale) {
  TORCH_CHECK(k_blocks.is_contiguous() && v_blocks.is_contiguous() && k_blocks.dim() == 4
              && v_blocks.sizes() == k_blocks.sizes() && v_blocks.scalar_type() == k_blocks.scalar_type(),
              "k/v blocks: contiguous [N, bs, H, D]");
  const int64_t H = k_blocks.size(2), D = k_blocks.size(3), bs = k_blocks.size(1), nb = block_table.size(1);
  TORCH_CHECK(q.dim() == 4 && q.size(1) == H && q.size(3) == D && D % 8 == 0 && D <= 256,
              "q [B, H, G, D] matching the cache; head_dim a multiple of 8 up to 256");
  return paged_decode_call(q, block_table, lens, begins, [&](auto* qp, auto* op, const int64_t* table,
                                                             const int64_t* n, const int64_t* bp, auto g) {
    constexpr int GG = decltype(g)::value;
    auto dispatch = [&](auto* kp) {  // the cache's element type
      using T = std::remove_const_t<std::remove_pointer_t<decltype(kp)>>;
      const T* k = k_blocks.data_ptr<T>();
      const T* v = v_blocks.data_ptr<T>();
      paged_decode_driver<GG>(qp, op, bp, n, q.size(0), H, D, bs, nb, (float)sm_scale, [](int64_t e) { return e; },
          [&](const float* qb, const Item& it, int64_t first, int64_t len, float* m, float* l, v8* acc) {
            thread_local std::vector<float> s;
            s.resize(GG * bs);
            decode_piece<GG, T>(qb, k, v, table + it.b * nb, first, len, it.j0, it.j1, H, it.h0, it.h1, D, bs,
                                s.data(), acc, m, l);
          });
    };
    switch (k_blocks.scalar_type()) {
      case torch::kFloat: dispatch(static_cast<float*>(nullptr)); break;
      case torch::kBFloat16: dispatch(static_cast<c10::BFloat16*>(nullptr)); break;
      case torch::kHalf: dispatch(static_cast<c10::Half*>(nullptr)); break;
      default: TORCH_CHECK(false, "KV cache dtype must be float32, bfloat16 or float16");
    }
  });
}
"""

_state: dict = {"module": None, "tried": False}
_ANNOUNCE_AFTER_S = 1.5


def cpu_flags() -> str:
    """The CPU's flags line from /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build_directory(name: str) -> str:
    """Where ``name`` is built: torch's extensions root, one folder per Python environment and CPU. Two
    checkouts with their own venvs compile with different include paths, so in one shared folder each
    would rebuild the other's build in turn; and a -march=native build must never load on a CPU that
    lacks an instruction it uses."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    env = hashlib.sha256(f"{sys.prefix}|{torch.__version__}|{cpu_flags()}".encode()).hexdigest()[:10]
    path = os.path.join(root, f"kvserve-{env}", name)
    os.makedirs(path, exist_ok=True)
    return path


def _march(capability: str) -> list[str]:
    """The instruction set to compile for: the CPU's own (-march=native), unless torch was told to run
    below it (``ATEN_CPU_CAPABILITY=avx2`` or ``default`` on an AVX-512 CPU, how the AVX2 machine is
    emulated): then that level's, so our kernels take the same code paths as on such a CPU."""
    if capability == "avx2" and " avx512f" in cpu_flags():
        return ["-march=x86-64-v3", "-mtune=native"]  # AVX2, FMA, F16C: Haswell and Zen 3
    if capability == "default" and " avx2" in cpu_flags():
        return ["-march=x86-64-v2", "-mtune=native"]  # SSE4.2: the kernels' plain C++ loops
    return ["-march=native"]


def _locked_build(build_dir: str, build):
    """Run ``build`` while holding an flock on the build folder. torch's own lock is a file that exists
    while a build runs; a process killed mid-build (Ctrl-C, a test run stopped, a session ending) leaves
    it behind, and every later load waits on it forever. The kernel releases an flock when its holder
    dies, so once we hold ours no one else is building here, and a torch lock file found now is stale."""
    with open(os.path.join(build_dir, "kvserve.flock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # waits while another live process builds this extension
        stale = os.path.join(build_dir, "lock")
        if os.path.exists(stale):
            log.warning("removing a stale build lock left by a killed build: %s", stale)
            os.remove(stale)
        return build()


def build_extension(name: str, source: str, functions: list[str], what: str):
    """Build (or load the cached build of) one C++ extension; None, with a warning, when it cannot be
    built (no compiler, no ninja, no headers) or KVSERVE_CPU_KERNELS=0. Shared by this module and
    ``cpu_quant_kernels``."""
    if os.environ.get("KVSERVE_CPU_KERNELS", "1") == "0":
        return None
    # load_inline is silent, and whether it will compile (first run, new CPU type, changed source) is
    # ninja's decision inside it. A finished build loads in ~0.1 s, so anything still running after
    # ANNOUNCE_AFTER_S seconds is a build: say so then.
    t0, done, announced, module = time.perf_counter(), threading.Event(), [], None

    def announce():
        if not done.wait(_ANNOUNCE_AFTER_S):
            announced.append(True)
            log.warning("building kvserve C++ %s (first run on this machine, ~1 min; "
                        "KVSERVE_CPU_KERNELS=0 skips them)...", what)

    threading.Thread(target=announce, name="kvserve-kernel-build-notice", daemon=True).start()
    try:
        from torch.utils.cpp_extension import load_inline

        # -fopenmp: without it at::parallel_for compiles to a serial loop.
        # -march: the build is per machine (_march); the CPU type in the name keeps an AVX-512 build from
        # being loaded on an AVX2 machine that shares the cache directory. The math flags let the compiler
        # vectorize the dot products (reassociating float sums) without assuming away the -inf above.
        cap = torch.backends.cpu.get_cpu_capability().lower()
        build_dir = build_directory(f"{name}_{cap}")
        module = _locked_build(build_dir, lambda: load_inline(
            name=f"{name}_{cap}", cpp_sources=[source], functions=functions, build_directory=build_dir,
            extra_cflags=["-O3", *_march(cap), "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
                          "-fno-trapping-math", "-fopenmp"],
            # at::parallel_for is OpenMP in the headers; the libgomp.so.1 torch already loaded serves it
            extra_ldflags=["-fopenmp"],
            verbose=False))
    except Exception as e:  # the PyTorch paths still work
        log.warning("C++ %s unavailable (%s: %s); using the PyTorch path", what, type(e).__name__, e)
    finally:
        done.set()
    if announced and module is not None:
        log.warning("kvserve C++ %s built in %.0f s (cached for later runs)", what, time.perf_counter() - t0)
    return module


def _load():
    if not _state["tried"]:
        _state["tried"] = True
        _state["module"] = build_extension(
            "kvserve_cpu_kernels", _SOURCE, ["paged_decode", "rms_norm", "add_rms_norm", "silu_and_mul", "rotary_"],
            "kernels")
    return _state["module"]


def available() -> bool:
    return _load() is not None


def kernel(name: str):
    """One of the module's C++ functions (``available()`` must be True)."""
    return getattr(_load(), name)


def supports(head_dim: int, group: int) -> bool:
    """Whether the kernel takes this shape (head_dim in 8-float chunks, up to 8 query heads per KV head)."""
    return head_dim % 8 == 0 and head_dim <= 256 and 1 <= group <= 8 and available()


def paged_decode(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, block_table: torch.Tensor,
                 lens: torch.Tensor, begins: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention for q ``[B, Hkv, G, D]`` over each request's first ``lens[b]`` cached tokens
    (from ``begins[b]`` on, under a sliding window), read through ``block_table [B, n]`` from one
    layer's pool ``[num_blocks, block_size, Hkv, D]``. Returns q's dtype (fp32 and bf16 read and written
    as they are, an fp16 q through fp32)."""
    return _load().paged_decode(q, k_blocks, v_blocks, block_table, lens, NO_BEGINS if begins is None else begins,
                                q.shape[-1] ** -0.5)


NO_BEGINS = torch.empty(0, dtype=torch.long)  # every request's keys from 0 (no sliding window)


def paged_decode_reference(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
                           block_table: torch.Tensor, lens: torch.Tensor,
                           begins: torch.Tensor | None = None) -> torch.Tensor:
    """The same, in plain PyTorch: gather the blocks, mask outside [begins, lens), softmax."""
    B, n = block_table.shape
    k = k_blocks[block_table].flatten(1, 2).transpose(1, 2).float()  # [B, Hkv, L, D]
    v = v_blocks[block_table].flatten(1, 2).transpose(1, 2).float()
    keys = torch.arange(k.shape[2], device=q.device)[None, :]
    visible = keys < lens[:, None]
    if begins is not None:
        visible &= keys >= begins[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), k, v, attn_mask=visible[:, None, None, :])
    return out.to(q.dtype)
