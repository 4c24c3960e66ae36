"""Quantized KV cache (issue 14): bytes, capacity, perplexity and decode speed per KV dtype, beside
llama.cpp's quantized caches on the same GGUF file.

For each ``--kv-cache-dtype`` (auto = the model dtype, int8, fp8_e4m3, fp8_e5m2, int4), in one run:

* bytes per token (codes + scales) and how many 2,048-token sequences fit in a 256 MiB pool
  (the engine's own pool planning);
* perplexity over the first ``--ppl-tokens`` tokens of ``pydoc_data.topics`` (``kvserve ppl``'s
  path: windows of ``--window`` tokens prefilled in 64-token chunks, so most reads come from the cache);
* decode tok/s at batch 1 and 16 and at 1k and 4k context: 16 requests with distinct prompts (windows
  of the same text) are prefilled, then ``--segments`` x ``--steps`` decode steps are timed (median
  per segment); then 15 requests are aborted and the remaining one is timed alone (batch 1).

llama.cpp (llama-cpp-python in ``.venv-llama``, ``make bench-llama``): the same GGUF with
``type_k/type_v`` f16, q8_0 and q4_0 (flash attention on, which quantized V needs): its perplexity over
the same token ids and windows (``n_batch`` 64), and its batch-1 decode speed at 1k and 4k.

    .venv/bin/python benchmarks/bench_kv_quant.py                     # ~25 min on 2 cores
    .venv/bin/python benchmarks/bench_kv_quant.py --quick             # fewer tokens, no 4k batch 16
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (LLAMA_NO_EXTRA_BUFTS, RESULTS_DIR, command_line, cpu_info, fmt, format_cpu_info,  # noqa: E402
                    format_table, llama_extra_bufts_work, median, now_iso, pyplot, save_json, settings_of)

from kvserve import LLM, SamplingParams  # noqa: E402
from kvserve.models.loader import resolve_model  # noqa: E402
from kvserve.ppl import corpus_text, perplexity  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("auto", "int8", "fp8_e4m3", "fp8_e5m2", "int4")
LLAMA_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # ggml type ids


def decode_speed(llm: LLM, ids: list[int], ctx: int, batch: int, steps: int, segments: int) -> dict:
    """Prefill ``batch`` distinct ``ctx``-token prompts, then time decode steps at that batch and at 1."""
    e = llm.engine
    # max_tokens far past what is timed: the first requests decode while the others still prefill, and
    # a request that finished inside a timed segment would make its steps empty (and the rate too high)
    sp = SamplingParams(temperature=0, max_tokens=512, ignore_eos=True)
    rids = [e.add_request(None, sp, prompt_token_ids=ids[i * ctx : (i + 1) * ctx]) for i in range(batch)]
    while any(not e.requests[r].output_token_ids for r in rids):  # prefill (chunked) until each has a token
        e.step()

    def timed() -> float:
        times = []
        for _ in range(segments):
            t0 = time.perf_counter()
            for _ in range(steps):
                e.step()
            times.append(time.perf_counter() - t0)
        assert all(r in e.requests and not e.requests[r].is_finished for r in live), "a timed request finished"
        return median(times)

    live = rids

    out = {}
    if batch > 1:
        out[f"b{batch}_tok_s"] = batch * steps / timed()
        for r in rids[1:]:
            e.abort_request(r)
        live = rids[:1]
    out["b1_tok_s"] = steps / timed()
    e.abort_request(rids[0])
    return out


def run_kvserve(kind: str, ids: list[int], args) -> dict:
    row: dict = {"system": "kvserve", "kv_cache_dtype": kind}
    llm = LLM(args.model, quantization=None, kv_cache_dtype=kind, kv_cache_memory="256MiB", max_model_len=2048)
    spec, kv = llm.engine.kv_spec, llm.engine.kv_cache
    row.update(storage=spec.storage_name, model_dtype=str(llm.engine.dtype).removeprefix("torch."),
               bytes_per_token=spec.bytes_per_token, blocks_in_256MiB=kv.num_blocks - 1,
               seqs_2048_in_256MiB=(kv.num_blocks - 1) // (2048 // kv.block_size))
    del llm
    gc.collect()

    llm = LLM(args.model, quantization=None, kv_cache_dtype=kind, max_num_batched_tokens=64, max_num_seqs=4,
              max_model_len=args.window + 1, enable_prefix_caching=False, kv_cache_memory="1GiB")
    t0 = time.perf_counter()
    r = perplexity(llm, ids, window=args.window, max_tokens=args.ppl_tokens)
    row.update(perplexity=r.perplexity, ppl_tokens=r.num_tokens, ppl_seconds=time.perf_counter() - t0)
    print(f"  {kind:9s} ppl {r.perplexity:.4f} over {r.num_tokens} tokens ({row['ppl_seconds']:.0f} s)", flush=True)
    del llm
    gc.collect()

    llm = LLM(args.model, quantization=None, kv_cache_dtype=kind, max_num_batched_tokens=2048, max_num_seqs=16,
              max_model_len=4096 + 600, enable_prefix_caching=False,
              kv_cache_memory="2GiB")
    # Touch every block once before timing, as a running server's pool is: a never-used block costs
    # its first writer page faults and zeroing, which would land inside the first timed steps.
    llm.engine.kv_cache.zero_new(list(range(llm.engine.kv_cache.num_blocks)))
    for ctx in args.contexts:
        # 16 distinct 4k prompts are 64k prefill tokens (~5 min per dtype here): batch 16 at 4k runs for
        # the dtypes in --b16-4k only, the others get batch 1 there
        batch = 16 if ctx <= 1024 or kind in args.b16_4k.split(",") else 1
        if args.quick and ctx > 1024:
            batch = 1
        t0 = time.perf_counter()
        d = decode_speed(llm, ids, ctx, batch, args.steps, args.segments)
        row[f"decode_{ctx}"] = d
        print(f"  {kind:9s} ctx {ctx}: " + ", ".join(f"{k} {v:.1f}" for k, v in d.items())
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    del llm
    gc.collect()
    return row


LLAMA_WORKER = r"""
import json, math, sys, time
import numpy as np
from llama_cpp import Llama
cfg = json.loads(sys.stdin.read())
ids, out = cfg["ids"], {}
def load(t, n_ctx, logits_all):
    return Llama(cfg["gguf"], n_ctx=n_ctx, n_batch=cfg["n_batch"], n_ubatch=cfg["n_batch"], n_threads=cfg["threads"],
                 type_k=t, type_v=t, flash_attn=True, logits_all=logits_all, verbose=False)
llm = load(cfg["type"], cfg["window"] + 8, True)
total, n = 0.0, 0
for i in range(0, min(len(ids), cfg["ppl_tokens"]), cfg["window"]):
    w = ids[i : i + cfg["window"]]
    if len(w) < 2: continue
    llm.reset(); llm.eval(w)
    s = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
    m = s.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(s - m).sum(axis=1)))
    total += float((s[np.arange(len(w) - 1), w[1:]] - lse).sum()); n += len(w) - 1
out["perplexity"], out["ppl_tokens"] = math.exp(-total / n), n
del llm
llm = load(cfg["type"], 4096 + 256, False)
for ctx in cfg["contexts"]:
    llm.reset(); llm.eval(ids[:ctx])
    times = []
    tok = ids[ctx]
    for _ in range(cfg["segments"]):
        t0 = time.perf_counter()
        for _ in range(cfg["steps"]):
            llm.eval([tok])
        times.append(time.perf_counter() - t0)
    times.sort()
    out[f"decode_{ctx}"] = {"b1_tok_s": cfg["steps"] / times[len(times) // 2]}
print(json.dumps(out))
"""


def run_llama(name: str, ids: list[int], args, prelude: str = "") -> dict | None:
    """llama.cpp with KV type ``name`` in its own venv; ``prelude``: code run before the worker (turning
    off the extra buffer types where they crash)."""
    cfg = {"gguf": str(resolve_model(args.model).path), "ids": ids[: max(args.ppl_tokens, 4096 + 8)],
           "type": LLAMA_TYPES[name], "window": args.window, "ppl_tokens": args.ppl_tokens, "n_batch": 64,
           "threads": torch.get_num_threads(), "contexts": args.contexts, "steps": args.steps,
           "segments": args.segments}
    t0 = time.perf_counter()
    p = subprocess.run([args.llama_python, "-c", prelude + LLAMA_WORKER], input=json.dumps(cfg), capture_output=True,
                       text=True)
    if p.returncode != 0:
        print(f"  llama.cpp {name} failed: {p.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    row = {"system": "llama.cpp", "kv_cache_dtype": name, **json.loads(p.stdout.strip().splitlines()[-1])}
    print(f"  llama.cpp {name}: ppl {row['perplexity']:.4f}, "
          + ", ".join(f"{c}: {row[f'decode_{c}']['b1_tok_s']:.1f} tok/s" for c in args.contexts)
          + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--steps", type=int, default=16, help="decode steps per timed segment")
    p.add_argument("--segments", type=int, default=3, help="timed segments (the median is reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--b16-4k", default="auto,int8", help="KV dtypes also measured at batch 16 with 4k contexts")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--llama-python", default=str(ROOT / ".venv-llama" / "bin" / "python"))
    p.add_argument("--llama-types", default="f16,q8_0,q4_0")
    p.add_argument("--out", default=str(RESULTS_DIR / "kv_quant.json"))
    args = p.parse_args()
    if args.quick:
        args.ppl_tokens, args.window = 2048, 1024
    args.contexts = [1024, 4096]
    torch.set_num_threads(args.threads)
    info = cpu_info()
    print(format_cpu_info(info), flush=True)
    t_start = time.perf_counter()
    from kvserve.models.loader import load_tokenizer

    ids = load_tokenizer(resolve_model(args.model)).encode(corpus_text())
    print(f"text: pydoc_data.topics, {len(ids):,} tokens; perplexity over the first {args.ppl_tokens:,} "
          f"in windows of {args.window}", flush=True)

    rows = [run_kvserve(k, ids, args) for k in args.kinds.split(",")]
    llama_rows, extra_bufts = [], None
    if Path(args.llama_python).exists():
        # llama.cpp's AMX buffers crash on some Sapphire Rapids machines (docs/benchmarks.md): probe, and
        # run without them there
        extra_bufts = llama_extra_bufts_work(args.llama_python, str(resolve_model(args.model).path))
        if not extra_bufts:
            print("  llama.cpp crashes with its extra buffer types (AMX) here: running it without them", flush=True)
        prelude = "" if extra_bufts else LLAMA_NO_EXTRA_BUFTS
        llama_rows = [r for t in args.llama_types.split(",") if (r := run_llama(t, ids, args, prelude))]
    else:
        print(f"llama-cpp-python not found at {args.llama_python} (make bench-llama): kvserve only", flush=True)

    def ratio(x, y):
        return "-" if not x or not y else f"{x / y:.2f}x"

    base = rows[0]
    table = []
    for r in rows:
        d1, d4 = r.get("decode_1024", {}), r.get("decode_4096", {})
        table.append([r["kv_cache_dtype"] if r["kv_cache_dtype"] != "auto" else f"auto ({r['storage']})",
                      r["bytes_per_token"], f"{r['bytes_per_token'] / base['bytes_per_token']:.3f}x",
                      r["seqs_2048_in_256MiB"], f"{r['perplexity']:.4f}",
                      f"{(r['perplexity'] / base['perplexity'] - 1) * 100:+.2f} %",
                      fmt(d1.get("b1_tok_s")), fmt(d1.get("b16_tok_s")),
                      fmt(d4.get("b1_tok_s")), fmt(d4.get("b16_tok_s")),
                      ratio(d4.get("b16_tok_s"), base.get("decode_4096", {}).get("b16_tok_s"))])
    print()
    print(format_table(["kvserve KV dtype", "bytes/token", "vs 16-bit", "2k seqs in 256 MiB", "perplexity",
                        "ppl change", "decode b1 @1k", "b16 @1k", "b1 @4k", "b16 @4k", "b16 @4k vs 16-bit"], table))
    if llama_rows:
        lbase = llama_rows[0]
        print()
        print(format_table(["llama.cpp KV type", "perplexity", "ppl change", "decode b1 @1k", "b1 @4k",
                            "b1 @4k vs f16"],
                           [[r["kv_cache_dtype"], f"{r['perplexity']:.4f}",
                             f"{(r['perplexity'] / lbase['perplexity'] - 1) * 100:+.2f} %",
                             fmt(r["decode_1024"]["b1_tok_s"]), fmt(r["decode_4096"]["b1_tok_s"]),
                             fmt(r["decode_4096"]["b1_tok_s"] / lbase["decode_4096"]["b1_tok_s"], 2) + "x"]
                            for r in llama_rows]))
    seconds = time.perf_counter() - t_start
    print(f"\nbenchmark time: {seconds:.0f} s")
    out = save_json(args.out, {"benchmark": "kv_quant", "time": now_iso(), "command": command_line(),
                               "settings": settings_of(args), "cpu": info, "kvserve": rows, "llama_cpp": llama_rows,
                               "llama_extra_bufts": extra_bufts,
                               "seconds": seconds})
    print(f"JSON: {out}")
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.5), dpi=110)
        names = [r["kv_cache_dtype"] for r in rows]
        axes[0].bar(names, [r["bytes_per_token"] for r in rows])
        axes[0].set_title("KV bytes per token (scales included)")
        axes[1].bar(names + [f"llama {r['kv_cache_dtype']}" for r in llama_rows],
                    [r["perplexity"] for r in rows] + [r["perplexity"] for r in llama_rows])
        axes[1].set_ylim(min(r["perplexity"] for r in rows + llama_rows) * 0.97,
                         max(r["perplexity"] for r in rows + llama_rows) * 1.02)
        axes[1].set_title("perplexity (pydoc_data.topics)")
        axes[1].tick_params(axis="x", rotation=45)
        x = range(len(rows))
        for j, (key, label) in enumerate([("decode_1024", "1k"), ("decode_4096", "4k")]):
            for b in ("b1", "b16"):
                vals = [r.get(key, {}).get(f"{b}_tok_s") or 0 for r in rows]
                axes[2].plot(list(x), vals, marker="o", label=f"{b} @{label}")
        axes[2].set_xticks(list(x))
        axes[2].set_xticklabels(names)
        axes[2].set_yscale("log")
        axes[2].set_title("decode tok/s")
        axes[2].legend(fontsize=7)
        fig.suptitle(f"kvserve quantized KV cache, {args.model}, {info.get('model_name', '')}", fontsize=9)
        fig.tight_layout()
        png = Path(args.out).with_suffix(".png")
        fig.savefig(png)
        print(f"PNG:  {png}")


if __name__ == "__main__":
    main()
