"""KV tiers (issue 17): conversations whose histories do not fit the pool, replayed in random order.

``--conversations`` (64) conversations, each a ``--history``-token (2,048) history of English (windows of
``pydoc_data.topics`` with distinct starts, so no two share a block) plus a short question. Pass 1 runs
each conversation once, in order (its history enters the prefix tree, and the tiers when they are on);
pass 2, the measured one, replays them in random order (seeded) with a new question each: the history
is the reusable prefix. Requests run one at a time; TTFT = add_request -> the step that returns the
first token. The pool holds ``--pool-fraction`` (a quarter) of the histories.

Set-ups, one engine each, the same weights and dtype:
  unbounded        a pool that holds every history (the hit rate the tiers aim for)
  tiers off        the quarter pool: what the tree evicts is gone and is computed again
  + host pool      the quarter pool + ``kv_offload_memory`` that holds every history
  + disk           the quarter pool + ``kv_cache_dir`` alone (every load comes from disk files)
  after restart    a new engine (empty pool and host pool) on the disk set-up's directory: no pass 1

Columns: the replay's hit rate (prompt tokens served from cache), TTFT p50/p99, total replay time, and
the tier's hits. Also the bytes the disk tier wrote per generated token, to size disks.

    .venv/bin/python benchmarks/bench_kv_tiers.py            # ~8 min on 2 cores
    .venv/bin/python benchmarks/bench_kv_tiers.py --quick    # 8 conversations of 512 tokens
"""
from __future__ import annotations

import argparse
import gc
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS_DIR, command_line, cpu_info, finish_figure, format_cpu_info, format_table,  # noqa: E402
                    median, now_iso, pyplot, save_json, settings_of)

from kvserve import LLM, SamplingParams  # noqa: E402
from kvserve.ppl import corpus_text  # noqa: E402


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def ttft(llm: LLM, ids: list[int], params: SamplingParams) -> float:
    """Seconds from add_request to the step that returns this request's first token (run to the end)."""
    e = llm.engine
    t0 = time.perf_counter()
    rid = e.add_request(None, params, prompt_token_ids=ids)
    first = None
    while e.has_unfinished_requests():
        for o in e.step():
            if first is None and o.request_id == rid and o.outputs[0].token_ids:
                first = time.perf_counter() - t0
    return first


def run_pass(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict:
    st0 = llm.cache_stats()
    t0 = time.perf_counter()
    times = [ttft(llm, p, params) for p in prompts]
    total = time.perf_counter() - t0
    st = llm.cache_stats()
    hits = st["prefix_cache_hits"] - st0["prefix_cache_hits"]
    queries = st["prefix_cache_queries"] - st0["prefix_cache_queries"]
    tiers = {k: st[k] - st0.get(k, 0) for k in st if k.startswith("kv_tier_") and isinstance(st[k], (int, float))}
    return {"ttft": times, "ttft_p50": median(times), "ttft_p99": percentile(times, 0.99), "total_s": total,
            "hit_rate": hits / max(1, queries), "tiers": tiers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--conversations", type=int, default=64)
    p.add_argument("--history", type=int, default=2048)
    p.add_argument("--pool-fraction", type=float, default=0.25)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(RESULTS_DIR / "kv_tiers.json"))
    args = p.parse_args()
    if args.quick:
        args.conversations, args.history = 8, 512
    info = cpu_info()
    print(format_cpu_info(info), flush=True)
    t_start = time.perf_counter()

    base = LLM(args.model, quantization=None, max_model_len=64, num_kv_blocks=8)
    tok = base.get_tokenizer()
    corpus = tok.encode(corpus_text())
    del base
    n, H = args.conversations, args.history
    stride = (len(corpus) - H) // n
    histories = [corpus[i * stride : i * stride + H] for i in range(n)]
    q = lambda i, k: tok.encode(f"\n\nQuestion {k} about part {i}: what does this say?", add_special_tokens=False)  # noqa: E731
    first = [h + q(i, 1) for i, h in enumerate(histories)]
    order = list(range(n))
    random.Random(args.seed).shuffle(order)
    replay = [histories[i] + q(i, 2) for i in order]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    longest = max(len(x) for x in first + replay)
    bs = 16
    blocks_per = -(-(longest + args.max_tokens) // bs)
    quarter = int(n * args.pool_fraction) * blocks_per + 1
    common = dict(max_model_len=longest + args.max_tokens + 16, max_num_batched_tokens=512, max_num_seqs=1)
    bytes_per_token = None

    tmp = Path(tempfile.mkdtemp(prefix="kvserve-tiers-"))
    setups = {
        "unbounded": dict(num_kv_blocks=2 * n * blocks_per + 1),  # every history, and room to spare
        "tiers off": dict(num_kv_blocks=quarter),
        "+ host pool": dict(num_kv_blocks=quarter, kv_offload_memory=None),  # sized below
        "+ disk": dict(num_kv_blocks=quarter, kv_cache_dir=str(tmp / "disk")),
        "after restart": dict(num_kv_blocks=quarter, kv_offload_memory=None, kv_cache_dir=str(tmp / "disk")),
    }
    results = {}
    written_per_gen = None
    for name, kw in setups.items():
        if "kv_offload_memory" in kw:
            kw["kv_offload_memory"] = int(1.2 * n * blocks_per * bytes_per_token * bs)
        llm = LLM(args.model, quantization=None, **common, **kw)
        bytes_per_token = llm.cache_stats()["kv_bytes_per_token"]
        if name != "after restart":
            run_pass(llm, first, params)
        r = run_pass(llm, replay, params)
        llm.engine.flush_kv_tiers()
        st = llm.cache_stats()
        if name == "+ disk":
            generated = llm.engine.stats["generation_tokens"]
            written_per_gen = st.get("kv_tier_disk_bytes_stored", 0) / max(1, generated)
            r["disk_bytes_written"] = st.get("kv_tier_disk_bytes_stored", 0)
        results[name] = r
        print(f"  {name}: hit rate {r['hit_rate']:.1%}, TTFT p50 {r['ttft_p50'] * 1e3:.1f} ms, "
              f"p99 {r['ttft_p99'] * 1e3:.1f} ms, replay {r['total_s']:.1f} s", flush=True)
        del llm
        gc.collect()
    shutil.rmtree(tmp, ignore_errors=True)

    off = results["tiers off"]["ttft_p50"]
    rows = []
    for name, r in results.items():
        t = r["tiers"]
        rows.append([name, f"{r['hit_rate']:.1%}", f"{r['ttft_p50'] * 1e3:.1f}", f"{r['ttft_p99'] * 1e3:.1f}",
                     f"{r['total_s']:.1f}", f"{off / r['ttft_p50']:.1f}x",
                     t.get("kv_tier_host_hits", "-"), t.get("kv_tier_disk_hits", "-")])
    print(format_table(["set-up", "replay hit rate", "TTFT p50 (ms)", "TTFT p99 (ms)", "replay (s)",
                        "TTFT vs tiers off", "host hits (blocks)", "disk hits (blocks)"], rows))
    checks = {
        "hit rate within 5 points of unbounded (host)": results["unbounded"]["hit_rate"] - results["+ host pool"]["hit_rate"] <= 0.05,
        "hit rate within 5 points of unbounded (disk)": results["unbounded"]["hit_rate"] - results["+ disk"]["hit_rate"] <= 0.05,
        "host TTFT >= 10x lower than recompute": off / results["+ host pool"]["ttft_p50"] >= 10,
        "disk TTFT >= 5x lower than recompute": off / results["+ disk"]["ttft_p50"] >= 5,
        "after restart >= 10x faster than cold": off / results["after restart"]["ttft_p50"] >= 10,
    }
    for k, v in checks.items():
        print(f"  {'met' if v else 'MISSED'}: {k}")
    print(f"disk tier: {written_per_gen / 1024:.1f} KiB written per generated token "
          f"({bytes_per_token / 1024:.1f} KiB of KV per token; every prompt and output block is written once)")
    out = save_json(args.out, {"benchmark": "kv_tiers", "time": now_iso(), "command": command_line(),
                               "settings": settings_of(args), "cpu": info, "results": results, "checks": checks,
                               "disk_bytes_per_generated_token": written_per_gen,
                               "kv_bytes_per_token": bytes_per_token, "seconds": time.perf_counter() - t_start})
    plt = pyplot()
    if plt is not None:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
        names = list(results)
        a.bar(names, [results[k]["ttft_p50"] * 1e3 for k in names], color="#3b7dd8")
        a.set_yscale("log")
        a.set_ylabel(f"TTFT p50, ms (log): a {args.history}-token history + question")
        b.bar(names, [100 * results[k]["hit_rate"] for k in names], color="#2e9e5b")
        b.set_ylabel("replay hit rate, % of prompt tokens")
        for ax in (a, b):
            ax.tick_params(axis="x", rotation=20)
        finish_figure(fig, f"KV tiers on {args.model}: {n} conversations, a pool for {args.pool_fraction:.0%} of them",
                      Path(args.out).with_suffix(".png"))
    print(f"benchmark time: {time.perf_counter() - t_start:.0f} s\nJSON: {out}")


if __name__ == "__main__":
    main()
