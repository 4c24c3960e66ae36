"""Chunked prefill (issue 4): decode streams' inter-token latency while long prompts arrive, chunking on vs off.

``--streams`` (8) requests with short prompts (``--stream-prompt`` 32 tokens of English text, different per
stream) decode ``--stream-tokens`` (300) tokens each, greedy, EOS ignored. While they decode, a long
prompt (``--long-prompt`` 2,048 tokens of English text, ``--long-tokens`` 16 output tokens) arrives before
each engine step listed in ``--arrivals``. The engine is driven step by step::

    while e.has_unfinished_requests():
        if step in arrivals: e.add_request(long prompt)
        t0 = perf_counter(); outs = e.step(); t1 = perf_counter()
        every stream in outs that got a token: token time = t1

A stream's inter-token latency (ITL) is the time between two of its successive tokens; its first token
(after its own prefill) starts the series. Systems (same process, same weights, same prompts):

  chunked-N  LLM(max_model_len=4096, max_num_batched_tokens=N, enable_chunked_prefill=True): a step
             holds the running decodes first, then at most N - (decodes) tokens of the long prompt.
  off        LLM(max_model_len=4096, enable_chunked_prefill=False): the whole 2,048-token prompt runs
             in one step (the engine raises the step budget to max_model_len), the decodes wait for it.

Why several arrivals (default 5) and not one: p99 of ~8 x 300 ITLs is the 24th-largest value. With one
arrival the unchunked run has only 8 slow ITLs (one per stream) and p99 would not see them, while the 5
chunked steps give 40 mildly slow ones: p99 would compare the wrong things. With 5 arrivals the slow
ITLs are >1 % of the samples in both modes. ``--arrivals 20`` runs the single-arrival case; max ITL and
the long prompts' TTFT are reported either way.

    .venv/bin/python benchmarks/bench_chunked_prefill.py           # full run (~5 min on 2 shared cores)
    .venv/bin/python benchmarks/bench_chunked_prefill.py --quick   # 60-token streams, 2 arrivals
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_throughput import header, request_prompt_ids, setup_torch, warmup_prompts  # noqa: E402
from common import (  # noqa: E402
    RESULTS_DIR, command_line, finish_figure, fmt, format_table, now_iso, pyplot, save_json, settings_of,
)

from kvserve.engine.llm_engine import resolve_dtype  # noqa: E402
from kvserve.llm import LLM  # noqa: E402
from kvserve.models.loader import DEFAULT_MODEL, load_tokenizer, resolve_model  # noqa: E402
from kvserve.sampling_params import SamplingParams  # noqa: E402


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def run_mode(a, dtype, tok, chunk: int | None) -> dict:
    """chunk = max_num_batched_tokens with chunked prefill on; None = chunked prefill off."""
    kw = dict(enable_chunked_prefill=True, max_num_batched_tokens=chunk) if chunk else dict(enable_chunked_prefill=False)
    llm = LLM(a.model, quantization=None, dtype=dtype, max_model_len=a.max_model_len, max_num_seqs=a.streams + len(a.arrivals), **kw)
    e = llm.engine
    budget = e.scheduler_config.max_num_batched_tokens
    # warm-up outside the timed run: short prompts and one long-ish prompt, so kernels for both shapes are picked
    w = warmup_prompts(tok)
    llm.generate(w + [request_prompt_ids(tok, min(600, a.long_prompt), 9_999, a.seed)],
                 SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)

    stream_ids = []
    for i in range(a.streams):
        ids = request_prompt_ids(tok, a.stream_prompt, i, a.seed)
        stream_ids.append(e.add_request(None, SamplingParams(temperature=0, max_tokens=a.stream_tokens, ignore_eos=True),
                                        prompt_token_ids=ids))
    long_ids: dict[str, dict] = {}
    token_times: dict[str, list[float]] = {r: [] for r in stream_ids}
    token_kind: dict[str, list[str]] = {}  # what else ran in the step that produced each stream token
    steps = []
    t0 = time.perf_counter()
    k = 0
    pending = sorted(a.arrivals)
    while e.has_unfinished_requests() or pending:
        while pending and pending[0] <= k:
            pending.pop(0)
            ids = request_prompt_ids(tok, a.long_prompt, 1000 + len(long_ids), a.seed)
            ta = time.perf_counter()
            rid = e.add_request(None, SamplingParams(temperature=0, max_tokens=a.long_tokens, ignore_eos=True),
                                prompt_token_ids=ids)
            long_ids[rid] = {"arrival_step": k, "arrival_s": ta - t0, "first_token_s": None, "prefill_steps": 0}
        running_long = [r for r in e.scheduler.running + list(e.scheduler.waiting) if r.request_id in long_ids
                        and r.num_computed_tokens < r.num_prompt_tokens]
        long_decoding = sum(1 for r in e.scheduler.running if r.request_id in long_ids
                            and r.num_computed_tokens >= r.num_prompt_tokens)
        kind = "long prefill" if running_long else ("long decoding" if long_decoding else "streams only")
        ts = time.perf_counter()
        outs = e.step()
        te = time.perf_counter()
        steps.append({"start_s": ts - t0, "end_s": te - t0, "seconds": te - ts, "long_prefill_running": len(running_long),
                      "long_decoding": long_decoding, "kind": kind})
        for r in running_long:
            long_ids[r.request_id]["prefill_steps"] += 1
        for o in outs:
            if o.request_id in token_times:
                token_times[o.request_id].append(te - t0)
                token_kind.setdefault(o.request_id, []).append(kind)
            elif o.request_id in long_ids and long_ids[o.request_id]["first_token_s"] is None:
                long_ids[o.request_id]["first_token_s"] = te - t0
        k += 1
    wall = time.perf_counter() - t0
    for rid in stream_ids:
        if len(token_times[rid]) != a.stream_tokens:
            raise RuntimeError(f"stream {rid} produced {len(token_times[rid])} tokens, expected {a.stream_tokens}")
    itl_series = []  # (time of the token, itl seconds, stream, what ran beside the streams in that step)
    for rid in stream_ids:
        tt, kk = token_times[rid], token_kind[rid]
        itl_series += [(tt[j], tt[j] - tt[j - 1], rid, kk[j]) for j in range(1, len(tt))]
    itls = [x[1] for x in itl_series]
    by_kind = {}
    for kind in ("streams only", "long decoding", "long prefill"):
        v = [x[1] for x in itl_series if x[3] == kind]
        if v:
            by_kind[kind] = {"count": len(v), "p50": 1000 * percentile(v, 50), "max": 1000 * max(v)}
    ttfts = [v["first_token_s"] - v["arrival_s"] for v in long_ids.values()]
    name = f"chunked, max_num_batched_tokens={chunk}" if chunk else f"no chunking (step budget {budget})"
    res = {
        "system": name,
        "chunked_prefill": bool(chunk),
        "max_num_batched_tokens": budget,
        "wall_s": wall,
        "steps": len(steps),
        "itl_ms": {
            "p50": 1000 * percentile(itls, 50),
            "p90": 1000 * percentile(itls, 90),
            "p99": 1000 * percentile(itls, 99),
            "max": 1000 * max(itls),
            "mean": 1000 * statistics.fmean(itls),
            "count": len(itls),
        },
        "long_ttft_s": {"mean": statistics.fmean(ttfts), "each": ttfts, "min": min(ttfts), "max": max(ttfts)},
        "long_requests": long_ids,
        "stream_tok_s": a.streams * a.stream_tokens / wall,
        "itl_ms_by_step_kind": by_kind,
        "itl_series": [[round(t, 5), round(d, 6)] for t, d, _, _ in sorted(itl_series)],
        "steps_detail": steps,
    }
    del llm, e
    gc.collect()
    return res


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1; 0 = torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--stream-prompt", type=int, default=32)
    p.add_argument("--stream-tokens", type=int, default=None, help="default 300 (60 with --quick)")
    p.add_argument("--long-prompt", type=int, default=2048)
    p.add_argument("--long-tokens", type=int, default=16)
    p.add_argument("--arrivals", default=None, help="engine steps before which a long prompt arrives "
                                                    "(default 20,70,120,170,220; 10,35 with --quick)")
    p.add_argument("--chunks", default=None, help="max_num_batched_tokens values with chunking on (default 512,256)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    a.stream_tokens = a.stream_tokens or (60 if a.quick else 300)
    a.arrivals = [int(x) for x in (a.arrivals or ("10,35" if a.quick else "20,70,120,170,220")).split(",")]
    a.chunks = [int(x) for x in (a.chunks or "512,256").split(",")]
    if a.long_prompt + a.long_tokens > a.max_model_len:
        p.error("--max-model-len must hold the long prompt and its output")
    stem = "chunked_prefill_quick" if a.quick else "chunked_prefill"
    a.out = Path(a.out) if a.out else RESULTS_DIR / f"{stem}.json"
    return a


def plot(path: Path, results: list[dict], title: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(len(results), 1, figsize=(11, 2.6 * len(results) + 0.8), dpi=120, sharey=True)
    axes = axes if len(results) > 1 else [axes]
    for ax, r in zip(axes, results):
        xs = [t for t, _ in r["itl_series"]]
        ys = [1000 * d for _, d in r["itl_series"]]
        ax.scatter(xs, ys, s=4, alpha=0.6, color="tab:blue" if r["chunked_prefill"] else "tab:red", label="stream ITL")
        for i, lr in enumerate(r["long_requests"].values()):
            ax.axvline(lr["arrival_s"], color="gray", ls="--", lw=0.8, label="long prompt arrives" if i == 0 else None)
            ax.axvline(lr["first_token_s"], color="green", ls=":", lw=0.8, label="its first token" if i == 0 else None)
        ax.axhline(r["itl_ms"]["p99"], color="black", lw=0.8, label=f"p99 {r['itl_ms']['p99']:.0f} ms")
        ax.set_yscale("log")
        ax.set_title(f"{r['system']}: ITL p50 {r['itl_ms']['p50']:.0f} ms, p99 {r['itl_ms']['p99']:.0f} ms, "
                     f"max {r['itl_ms']['max']:.0f} ms; long TTFT mean {r['long_ttft_s']['mean']:.2f} s", fontsize=9)
        ax.set_ylabel("ITL (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("time since the streams started (s)")
    return finish_figure(fig, title, path)


def main(argv=None) -> int:
    a = parse_args(argv)
    setup_torch(a.threads)
    dtype = resolve_dtype(a.dtype, torch.device("cpu"))
    info = header(a, dtype)
    tok = load_tokenizer(resolve_model(a.model))
    print(f"workload: {a.streams} streams x ({a.stream_prompt} prompt + {a.stream_tokens} output tokens), "
          f"{len(a.arrivals)} long prompt(s) of {a.long_prompt} tokens (+{a.long_tokens} output) arriving before "
          f"steps {a.arrivals}; max_model_len {a.max_model_len}")
    print()
    t_start = time.perf_counter()
    results = []
    for chunk in a.chunks + [None]:
        r = run_mode(a, dtype, tok, chunk)
        results.append(r)
        print(f"  {r['system']}: {r['wall_s']:.1f} s, {r['steps']} steps, ITL p50 {r['itl_ms']['p50']:.1f} ms, "
              f"p99 {r['itl_ms']['p99']:.1f} ms, max {r['itl_ms']['max']:.1f} ms, long TTFT mean "
              f"{r['long_ttft_s']['mean']:.2f} s", flush=True)
    total_s = time.perf_counter() - t_start
    off = results[-1]
    headers = ["system", "step budget", "ITL p50 ms", "ITL p90 ms", "ITL p99 ms", "ITL max ms", "long TTFT s (mean)",
               "long prefill steps", "p99: off / this", "max: off / this"]
    rows = []
    for r in results:
        pre = [v["prefill_steps"] for v in r["long_requests"].values()]
        rows.append([r["system"], r["max_num_batched_tokens"], fmt(r["itl_ms"]["p50"]), fmt(r["itl_ms"]["p90"]),
                     fmt(r["itl_ms"]["p99"]), fmt(r["itl_ms"]["max"]), fmt(r["long_ttft_s"]["mean"], 2),
                     f"{min(pre)}-{max(pre)}" if min(pre) != max(pre) else str(pre[0]),
                     fmt(off["itl_ms"]["p99"] / r["itl_ms"]["p99"], 2) + "x",
                     fmt(off["itl_ms"]["max"] / r["itl_ms"]["max"], 2) + "x"])
    table = format_table(headers, rows)
    print()
    print(table)
    print()
    print("stream ITL p50 by what else ran in the step (ms): " + "; ".join(
        r["system"] + ": " + ", ".join(f"{k} {v['p50']:.0f} (n={v['count']})" for k, v in r["itl_ms_by_step_kind"].items())
        for r in results))
    best = min(results[:-1], key=lambda r: r["itl_ms"]["p99"]) if len(results) > 1 else None
    summary = {}
    if best:
        summary = {
            "best_chunked": best["system"],
            "p99_ratio_off_over_chunked": off["itl_ms"]["p99"] / best["itl_ms"]["p99"],
            "max_ratio_off_over_chunked": off["itl_ms"]["max"] / best["itl_ms"]["max"],
            "long_ttft_ratio_chunked_over_off": best["long_ttft_s"]["mean"] / off["long_ttft_s"]["mean"],
        }
        print(f"p99 ITL: no chunking {off['itl_ms']['p99']:.1f} ms vs {best['system']} {best['itl_ms']['p99']:.1f} ms: "
              f"{summary['p99_ratio_off_over_chunked']:.2f}x lower with chunking (target >= 3x)")
        print(f"long prompt TTFT: {best['long_ttft_s']['mean']:.2f} s chunked vs {off['long_ttft_s']['mean']:.2f} s "
              f"unchunked ({summary['long_ttft_ratio_chunked_over_off']:.2f}x)")
    print(f"benchmark time: {total_s:.0f} s")
    doc = {
        "benchmark": "chunked_prefill",
        "date": now_iso(),
        "command": command_line(),
        "machine": info,
        "settings": settings_of(a),
        "method": __doc__,
        "results": results,
        "summary": summary,
        "table_markdown": table,
        "benchmark_seconds": total_s,
    }
    save_json(a.out, doc)
    print(f"JSON: {a.out}")
    if not a.no_plot:
        png = plot(a.out.with_suffix(".png"), results,
                   f"{a.streams} decode streams; {a.long_prompt}-token prompts arrive at steps {a.arrivals}; "
                   f"{info['dtype']}, {info['torch_num_threads']} thread(s), {info['cpu_model']}")
        if png:
            print(f"PNG:  {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
