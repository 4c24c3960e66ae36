"""Quantized KV cache probe (issue 14): decode-attention time per layer, and the error the formats add.

Speed: one layer's decode attention, B requests x ctx cached tokens each, 16-token blocks scattered at
random in a pool. fp32 / bf16 caches go through the existing kernel (``cpu_kernels.paged_decode``), the
quantized formats through ``cpu_quant_kernels.paged_decode_quant``, each through its public Python
wrapper (what the attention backend calls). Every call reads another "layer" (its own blocks), with
enough layers that the bytes read per round are far larger than the last-level cache (the KV of a real
decode step is not in cache either). Time = per layer, median of rounds; GB/s = code + scale bytes read
per second.

Error: the relative error ||o_quant - o_fp32|| / ||o_fp32|| of the attention output, on real SmolLM2
queries, keys and values (captured from the model's attention on a ~1k-token prompt, every layer; the
last 64 positions each attend to their own prefix), else on random data with outliers (--random-kv).
fp8 also without the per-token scale (scale = 1, the values stored as they are, saturated at the
format's max), to show what the 2 bytes buy.

    .venv/bin/python benchmarks/probe_quant_decode.py            # ~3 min on 2 cores
    .venv/bin/python benchmarks/probe_quant_decode.py --quick    # fewer rounds, SmolLM2 shape only
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_info, format_cpu_info, format_table  # noqa: E402

from kvserve import hugepages  # noqa: E402
from kvserve.kv.quant import KV_QUANT, dequantize, quantize  # noqa: E402
from kvserve.models import cpu_kernels, cpu_quant_kernels  # noqa: E402

SHAPES = {"smollm2 (3 KV heads, G=3, D=64)": (3, 3, 64), "gemma3 (1 KV head, G=4, D=256)": (1, 4, 256)}
FORMATS = ("fp32", "bf16", "int8", "int4", "fp8_e4m3", "fp8_e5m2")


def layer_bytes(fmt: str, B: int, ctx: int, H: int, D: int) -> int:
    k_and_v = {"fp32": 8 * D, "bf16": 4 * D}.get(fmt) or KV_QUANT[fmt].bytes_per_token_and_head(D)
    return B * ctx * H * k_and_v


def make_layers(fmt: str, B: int, ctx: int, H: int, D: int, bs: int, L: int, g: torch.Generator):
    """L layers' pools and tables: one pool of L * B * ctx / bs blocks (+ the null block), random order."""
    nper = ctx // bs
    nblk = L * B * nper + 1
    perm = (torch.randperm(nblk - 1, generator=g) + 1).view(L, B, nper)
    if fmt in ("fp32", "bf16"):
        dt = torch.float32 if fmt == "fp32" else torch.bfloat16
        k = hugepages.empty((nblk, bs, H, D), dt)
        v = hugepages.empty((nblk, bs, H, D), dt)
        for t in (k, v):
            for c in range(0, nblk, 4096):  # fill in chunks: no full-size fp32 temporary
                t[c : c + 4096] = torch.randn(t[c : c + 4096].shape, generator=g).to(dt)
        return (k, v), perm
    fq = KV_QUANT[fmt]
    pool = []
    for rc in (fq.key, fq.value):  # K's codec, then V's (int4: q5, q4)
        codes = hugepages.empty((nblk, bs, H, rc.packed_dim(D)), rc.code_dtype)
        scales = hugepages.empty((nblk, bs, H), torch.float16)
        for c in range(0, nblk, 4096):
            cc, ss = quantize(torch.randn(codes[c : c + 4096].shape[:3] + (D,), generator=g), rc)
            codes[c : c + 4096], scales[c : c + 4096] = cc, ss
        pool += [codes, scales]
    return tuple(pool), perm


def time_format(fmt: str, B: int, ctx: int, H: int, G: int, D: int, rounds: int, bs: int = 16) -> tuple[float, float]:
    """(median microseconds per layer, GB/s of cache bytes read)."""
    g = torch.Generator().manual_seed(0)
    per_layer = layer_bytes(fmt, B, ctx, H, D)
    L = min(1000, max(4, math.ceil(512e6 / per_layer)))
    pool, perm = make_layers(fmt, B, ctx, H, D, bs, L, g)
    lens = torch.full((B,), ctx, dtype=torch.long)
    q = torch.randn(B, H, G, D, generator=g)
    if fmt == "bf16":
        q = q.bfloat16()
    if fmt in ("fp32", "bf16"):
        call = lambda t: cpu_kernels.paged_decode(q, pool[0], pool[1], t, lens)  # noqa: E731
    else:
        call = lambda t: cpu_quant_kernels.paged_decode_quant(q, *pool, t, lens, fmt)  # noqa: E731
    tables = [perm[i] for i in range(L)]
    for t in tables[: min(L, 8)]:
        call(t)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for t in tables:
            call(t)
        times.append((time.perf_counter() - t0) / L)
    med = sorted(times)[len(times) // 2]
    del pool
    return med * 1e6, per_layer / med / 1e9


# ---------------------------------------------------------------- error


def capture_smollm2(prompt_len: int):
    """Per layer: q [T, Hq, D], k, v [T, Hkv, D] (fp32, after RoPE) of one prompt through SmolLM2."""
    from common import prompt_ids
    from kvserve import LLM, SamplingParams

    llm = LLM("smollm2-135m", quantization=None, dtype="float32", enable_prefix_caching=False, max_num_seqs=1)
    backend = llm.engine.attn_backend
    seen: dict[int, list] = {}
    inner = backend.forward

    def spy(q, k, v, layer, meta):
        seen.setdefault(layer, []).append((q.detach().float().clone(), k.detach().float().clone(), v.detach().float().clone()))
        return inner(q, k, v, layer, meta)

    backend.forward = spy
    ids = prompt_ids(llm.get_tokenizer(), prompt_len)
    llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=1))
    backend.forward = inner
    out = []
    for layer in sorted(seen):
        q, k, v = (torch.cat([c[i] for c in seen[layer]]) for i in range(3))
        out.append((q, k, v))
    T = min(o[1].shape[0] for o in out)
    return [(q[:T], k[:T], v[:T]) for q, k, v in out]


def random_layers(T: int, n_layers: int = 4, H: int = 3, G: int = 3, D: int = 64):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_layers):
        k = torch.randn(T, H, D, generator=g) * 2
        k[:, :, 5] += 20  # an outlier channel, as real keys have
        v = torch.randn(T, H, D, generator=g) * 0.5
        q = torch.randn(T, H * G, D, generator=g) * 2
        out.append((q, k, v))
    return out


def attention_error(layers, n_queries: int = 64, bs: int = 16) -> tuple[dict, dict]:
    """Relative attention-output error per format (and K/V round-trip errors), over all layers."""
    fmt_names = list(KV_QUANT) + ["fp8_e4m3 (scale=1)", "fp8_e5m2 (scale=1)"]
    num = {f: 0.0 for f in fmt_names}
    kv_err = {f: [0.0, 0.0] for f in fmt_names}
    den, kden, vden = 0.0, 0.0, 0.0
    for q, k, v in layers:
        T, H, D = k.shape
        G = q.shape[1] // H
        nblk = -(-T // bs)
        pad = nblk * bs - T
        kb = torch.cat([k, k.new_zeros(pad, H, D)]).view(nblk, bs, H, D)
        vb = torch.cat([v, v.new_zeros(pad, H, D)]).view(nblk, bs, H, D)
        pos = torch.arange(T - n_queries, T)
        lens = pos + 1
        table = torch.arange(nblk).expand(n_queries, nblk).contiguous()
        qq = q[pos].view(n_queries, H, G, D).contiguous()  # q head i -> KV head i // G
        ref = cpu_kernels.paged_decode_reference(qq, kb, vb, table, lens)
        den += float(ref.norm() ** 2)
        kden += float(k.norm() ** 2)
        vden += float(v.norm() ** 2)
        for f in fmt_names:
            kind = f.split(" ")[0]
            fq = KV_QUANT[kind]
            if "scale=1" in f:
                mx = fq.key.qmax
                enc = lambda x, rc: (x.clamp(-mx, mx).to(rc.code_dtype), torch.ones(x.shape[:-1], dtype=torch.float16))  # noqa: E731
            else:
                enc = quantize
            kc, ks = enc(kb, fq.key)
            vc, vs = enc(vb, fq.value)
            if cpu_quant_kernels.supports_quant(D, G, kind):
                out = cpu_quant_kernels.paged_decode_quant(qq, kc, ks, vc, vs, table, lens, kind)
            else:
                out = cpu_quant_kernels.paged_decode_quant_reference(qq, kc, ks, vc, vs, table, lens, kind)
            num[f] += float((out - ref).norm() ** 2)
            kv_err[f][0] += float((dequantize(kc, ks, fq.key) - kb).norm() ** 2)
            kv_err[f][1] += float((dequantize(vc, vs, fq.value) - vb).norm() ** 2)
    rel = {f: math.sqrt(num[f] / den) for f in fmt_names}
    kv = {f: (math.sqrt(kv_err[f][0] / kden), math.sqrt(kv_err[f][1] / vden)) for f in fmt_names}
    return rel, kv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 rounds, SmolLM2 shape only")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--random-kv", action="store_true", help="skip the model: random K/V with an outlier channel")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--no-error", action="store_true")
    args = p.parse_args()
    rounds = 3 if args.quick else args.rounds
    print(format_cpu_info(cpu_info()))
    print(f"threads {torch.get_num_threads()}; quant kernel built: {cpu_quant_kernels.available()}")

    if not args.no_speed:
        shapes = dict(list(SHAPES.items())[:1]) if args.quick else SHAPES
        for name, (H, G, D) in shapes.items():
            rows = []
            for B, ctx in ((1, 1024), (1, 4096), (16, 1024), (16, 4096)):
                base = None
                for fmt in FORMATS:
                    us, gbs = time_format(fmt, B, ctx, H, G, D, rounds)
                    base = base or us
                    rows.append([f"B={B} ctx={ctx}", fmt, f"{layer_bytes(fmt, B, ctx, H, D) / 1e6:.2f}",
                                 f"{us:.1f}", f"{gbs:.1f}", f"{base / us:.2f}x"])
            print(f"\n### decode attention per layer, {name}")
            print(format_table(["batch / context", "KV format", "MB read", "us / layer", "GB/s", "vs fp32"], rows))

    if not args.no_error:
        src = "random K/V (outlier channel)"
        layers = None
        if not args.random_kv:
            try:
                layers = capture_smollm2(args.prompt_len)
                src = f"SmolLM2-135M, {layers[0][1].shape[0]}-token prompt, {len(layers)} layers, last 64 positions"
            except Exception as e:  # the engine's internals moved: say so and use random data
                print(f"(could not capture SmolLM2 K/V: {type(e).__name__}: {e}; using random data)")
        layers = layers or random_layers(args.prompt_len)
        rel, kv = attention_error(layers)
        rows = [[f, f"{kv[f][0]:.2e}", f"{kv[f][1]:.2e}", f"{rel[f]:.2e}"] for f in rel]
        print(f"\n### relative error vs fp32 ({src})")
        print(format_table(["KV format", "K round trip", "V round trip", "attention output"], rows))


if __name__ == "__main__":
    main()
