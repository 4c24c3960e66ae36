"""One small C++ kernel: single-token decode attention read straight from the paged KV pool (CPU).

Why a kernel at all: a decode step is bound by reading the cache. In plain PyTorch the step's K/V are
first gathered from their blocks into a padded copy (read + write every byte), then SDPA reads the copy
again: three passes over the bytes. vLLM's PagedAttention reads each cached byte once, following the
block table inside the kernel; this is the same idea in ~60 lines of C++ for the CPU.

It computes exactly what ``paged_decode_reference`` below computes (the tests compare them), with an
online softmax (flash-decoding style) one block of keys at a time:

    for each (request b, KV head h), in parallel over torch's threads:
        m, l, acc = -inf, 0, 0                               per query head g of the group
        for each block in b's block table, t < lens[b]:
            s_t = q_g . k_t * scale                         t in this block
            m'  = max(m, max_t s_t);  acc *= e^(m - m');  l *= e^(m - m')
            acc += sum_t e^(s_t - m') v_t;  l += sum_t e^(s_t - m');  m = m'
        out_g = acc / l

Built on first use with ``torch.utils.cpp_extension.load_inline`` (g++ and ninja; ~1 minute, cached per
CPU type under ~/.cache/torch_extensions). Anything missing -> a warning and the PyTorch path.
KVSERVE_CPU_KERNELS=0 turns it off.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("kvserve")

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

// exp(x) for x <= 0 in plain arithmetic the compiler can vectorize (libm's expf is a scalar call, and
// three of them per cached token per query head were most of the kernel's time). Cephes' expf: x = k ln2
// + r, e^r by a degree-6 polynomial, 2^k through the exponent bits; ~1 ulp, 0 below -87.
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

template <typename T>
static void decode(const float* q, const T* kp, const T* vp, const int64_t* table, const int64_t* lens, float* out,
                   int64_t B, int64_t H, int64_t G, int64_t D, int64_t bs, int64_t nb, float scale) {
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(G * D), m(G), l(G), s(bs);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, len = lens[b];
      const float* qb = q + bh * G * D;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t j = 0; j < nb && j * bs < len; ++j) {
        const int64_t n = std::min(bs, len - j * bs);
        const T* kb = kp + (table[b * nb + j] * bs * H + h) * D;  // token t of the block: kb + t * H * D
        const T* vb = vp + (table[b * nb + j] * bs * H + h) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qb + g * D;
          float* sc = s.data();
          float mx = m[g];
          for (int64_t t = 0; t < n; ++t) {
            const T* kt = kb + t * H * D;
            float dot = 0.f;
            for (int64_t d = 0; d < D; ++d) dot += qg[d] * static_cast<float>(kt[d]);
            sc[t] = dot * scale;
            mx = std::max(mx, sc[t]);
          }
          const float corr = std::exp(m[g] - mx);  // 0 on the first block (m = -inf)
          float sum = 0.f;
          for (int64_t t = 0; t < n; ++t) {
            sc[t] = exp_nonpositive(sc[t] - mx);
            sum += sc[t];
          }
          float* a = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) a[d] *= corr;
          for (int64_t t = 0; t < n; ++t) {
            const T* vt = vb + t * H * D;
            const float p = sc[t];
            for (int64_t d = 0; d < D; ++d) a[d] += p * static_cast<float>(vt[d]);
          }
          m[g] = mx;
          l[g] = l[g] * corr + sum;
        }
      }
      float* ob = out + bh * G * D;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) ob[g * D + d] = acc[g * D + d] / l[g];
    }
  });
}

// q [B, H, G, D] float32; k/v blocks [num_blocks, bs, H, D]; block_table [B, nb] int64; lens [B] int64 (>= 1)
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_blocks, torch::Tensor v_blocks,
                           torch::Tensor block_table, torch::Tensor lens, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat && q.is_contiguous() && q.dim() == 4, "q: contiguous float32 [B, H, G, D]");
  TORCH_CHECK(k_blocks.is_contiguous() && v_blocks.is_contiguous() && k_blocks.dim() == 4, "k/v blocks: contiguous [N, bs, H, D]");
  TORCH_CHECK(block_table.scalar_type() == torch::kLong && lens.scalar_type() == torch::kLong, "int64 block table and lens");
  auto table = block_table.contiguous();
  auto n = lens.contiguous();
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3);
  auto out = torch::empty_like(q);
  pybind11::gil_scoped_release no_gil;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_blocks.scalar_type(), "paged_decode", [&] {
    decode<scalar_t>(q.data_ptr<float>(), k_blocks.data_ptr<scalar_t>(), v_blocks.data_ptr<scalar_t>(),
                     table.data_ptr<int64_t>(), n.data_ptr<int64_t>(), out.data_ptr<float>(),
                     B, H, G, D, k_blocks.size(1), table.size(1), static_cast<float>(scale));
  });
  return out;
}
"""

_state: dict = {"module": None, "tried": False}


def _load():
    if _state["tried"]:
        return _state["module"]
    _state["tried"] = True
    if os.environ.get("KVSERVE_CPU_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        # -fopenmp: without it at::parallel_for compiles to a serial loop.
        # -march=native: the build is per machine; the CPU type in the name keeps an AVX-512 build from
        # being loaded on an AVX2 machine that shares the cache directory. The math flags let the compiler
        # vectorize the dot products (reassociating float sums) without assuming away the -inf above.
        cap = torch.backends.cpu.get_cpu_capability().lower()
        _state["module"] = load_inline(
            name=f"kvserve_cpu_kernels_{cap}", cpp_sources=[_SOURCE], functions=["paged_decode"],
            extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
                          "-fno-trapping-math", "-fopenmp"],
            # at::parallel_for is OpenMP in the headers; the libgomp.so.1 torch already loaded serves it
            extra_ldflags=["-fopenmp"],
            verbose=False)
    except Exception as e:  # no compiler, no ninja, no headers: the PyTorch path still works
        log.warning("CPU paged-decode kernel unavailable (%s: %s); using gather + SDPA", type(e).__name__, e)
    return _state["module"]


def available() -> bool:
    return _load() is not None


def paged_decode(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, block_table: torch.Tensor,
                 lens: torch.Tensor) -> torch.Tensor:
    """Decode attention for q ``[B, Hkv, G, D]`` over each request's first ``lens[b]`` cached tokens,
    read through ``block_table [B, n]`` from one layer's pool ``[num_blocks, block_size, Hkv, D]``."""
    out = _load().paged_decode(q.float().contiguous(), k_blocks, v_blocks, block_table, lens, q.shape[-1] ** -0.5)
    return out.to(q.dtype)


def paged_decode_reference(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
                           block_table: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """The same, in plain PyTorch: gather the blocks, mask past each length, softmax."""
    B, n = block_table.shape
    k = k_blocks[block_table].flatten(1, 2).transpose(1, 2).float()  # [B, Hkv, L, D]
    v = v_blocks[block_table].flatten(1, 2).transpose(1, 2).float()
    visible = torch.arange(k.shape[2], device=q.device)[None, :] < lens[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), k, v, attn_mask=visible[:, None, None, :])
    return out.to(q.dtype)
