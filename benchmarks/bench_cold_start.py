"""A fresh server's first requests: the KV pool touched in idle time (the default) or on first use.

The KV pool is reserved with ``empty``: no page of it holds RAM until something writes there. The first
write to each page then costs a page fault, and on the VMs we measure on a fresh 2 MiB page costs ~13 ms
(the host backs it). A fresh ``kvserve serve`` therefore ran its first bursts of requests slower, until
every page had been touched once. By default its idle engine thread now zeroes the pool a slice at a time
(``AsyncLLM``, ``KVCache.prefault``); ``--no-kv-prefault`` turns that off. vLLM and llama.cpp touch their
whole pool at startup.

Each round starts one fresh server per setting (the order alternates between rounds), waits until it
answers ``/health`` and then ``--idle`` seconds more (with the prefault: until ``/metrics`` shows the whole
pool touched, which it reports), then sends ``--bursts`` bursts of ``--concurrency`` streaming requests of
``--input-len`` words (new text in every burst, so the prefix cache finds nothing) through the load
generator (``kvserve bench serve``'s), one burst after another. Reported per burst: wall time, TTFT p50,
medians over rounds.

    .venv/bin/python benchmarks/bench_cold_start.py                 # 3 rounds, ~5 min on 2 cores
"""
from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` and `bench_serve` when run as a script
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `kvserve` without an install

from bench_serve import ROOT, free_port, stop, wait_ready  # noqa: E402
from common import (  # noqa: E402
    RESULTS_DIR, command_line, cpu_info, format_cpu_info, format_table, median, now_iso, save_json, save_line_plot,
)

from kvserve.models.loader import DEFAULT_MODEL  # noqa: E402
from kvserve.server.bench import add_bench_args, bench  # noqa: E402

SETTINGS = {"prefault": [], "no-prefault": ["--no-kv-prefault"]}


def touched(base: str) -> tuple[float, float]:
    """(bytes touched, bytes allocated) of the server's KV pool, from /metrics."""
    import httpx

    text = httpx.get(f"{base}/metrics", timeout=10).text
    get = lambda name: float(re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M).group(1))  # noqa: E731
    return get("kvserve_kv_cache_bytes_touched"), get("kvserve_kv_cache_bytes_allocated")


def one_server(setting: str, a: argparse.Namespace, round_no: int) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "kvserve.cli", "serve", "--model", a.model, "--port", str(port),
           "--log-level", "warning", *a.server_args.split(), *SETTINGS[setting]]
    log = open(RESULTS_DIR / "bench_cold_start_server.log", "a")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"{base}/health", proc)
        ready_s = time.perf_counter() - t0
        deadline = time.perf_counter() + a.idle
        touched_s = None
        while time.perf_counter() < deadline or (setting == "prefault" and touched_s is None):
            done, total = touched(base)
            if done == total and touched_s is None:
                touched_s = time.perf_counter() - t0
            time.sleep(0.1)
        before = touched(base)
        bursts = []
        for i in range(a.bursts):
            b = argparse.Namespace(**vars(a.bench))
            b.base_url, b.concurrency, b.num_prompts = base, a.concurrency, a.concurrency
            b.seed = 1000 * round_no + i  # new text in every burst and round
            b.min_tokens = b.max_tokens
            res = asyncio.run(bench(b))
            if res["failed"]:
                raise RuntimeError(f"{setting}: {res['failed']} requests failed")
            bursts.append({"wall_s": res["duration_s"], "ttft_p50_s": res["ttft_s"]["p50"],
                           "tpot_p50_s": res["tpot_s"]["p50"], "touched_after": touched(base)[0]})
            print(f"  round {round_no} {setting:<11} burst {i}: {res['duration_s']:.2f} s, TTFT p50 "
                  f"{res['ttft_s']['p50'] * 1000:.0f} ms, pool touched {bursts[-1]['touched_after'] / before[1]:.0%}",
                  flush=True)
    finally:
        stop(proc)
        log.close()
    return {"setting": setting, "round": round_no, "ready_s": ready_s, "touched_s": touched_s,
            "touched_before": before[0], "pool_bytes": before[1], "bursts": bursts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bursts", type=int, default=6)
    p.add_argument("--concurrency", type=int, default=16, help="requests per burst, all at once")
    p.add_argument("--idle", type=float, default=5.0, help="seconds between /health and the first burst (at least)")
    p.add_argument("--server-args", default="", help="more `kvserve serve` flags, e.g. '--kv-cache-memory 2GiB'")
    p.add_argument("--out", default=str(RESULTS_DIR / "cold_start.json"))
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args()
    bench_p = add_bench_args(argparse.ArgumentParser())
    a.bench = bench_p.parse_args(["--input-len", "350", "--max-tokens", "16", "--ignore-eos"])
    a.bench.model = None

    info = cpu_info()
    print(format_cpu_info(info), flush=True)
    t_start = time.perf_counter()
    runs = []
    for r in range(a.rounds):
        order = list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]
        for setting in order:
            runs.append(one_server(setting, a, r))

    rows, summary = [], {}
    for setting in SETTINGS:
        mine = [x for x in runs if x["setting"] == setting]
        walls = [median([x["bursts"][i]["wall_s"] for x in mine]) for i in range(a.bursts)]
        ttfts = [median([x["bursts"][i]["ttft_p50_s"] for x in mine]) for i in range(a.bursts)]
        summary[setting] = {"burst_wall_s": walls, "burst_ttft_p50_s": ttfts, "total_s": sum(walls),
                            "touched_s": median([x["touched_s"] for x in mine]) if setting == "prefault" else None}
        for i in range(a.bursts):
            rows.append([setting, str(i), f"{walls[i]:.2f}", f"{ttfts[i] * 1000:.0f}"])
    headers = ["setting", "burst", "wall s (median)", "TTFT p50 ms (median)"]
    print()
    print(format_table(headers, rows))
    ratio = summary["no-prefault"]["total_s"] / summary["prefault"]["total_s"]
    print(f"\nall {a.bursts} bursts: {summary['prefault']['total_s']:.1f} s with the pool touched in idle time, "
          f"{summary['no-prefault']['total_s']:.1f} s without ({ratio:.2f}x); the idle prefault was done "
          f"{summary['prefault']['touched_s']:.1f} s after the server started (median)")
    out = Path(a.out)
    save_json(out, {
        "benchmark": "cold_start", "date": now_iso(), "command": command_line(), "machine": info,
        "settings": {k: v for k, v in vars(a).items() if k != "bench"} | {"bench": vars(a.bench)},
        "runs": runs, "summary": summary, "ratio_total": ratio, "table_markdown": format_table(headers, rows),
        "benchmark_seconds": time.perf_counter() - t_start,
    })
    print(f"JSON: {out}")
    if not a.no_plot:
        png = save_line_plot(
            out.with_suffix(".png"),
            {setting: (list(range(a.bursts)), summary[setting]["burst_wall_s"]) for setting in SETTINGS},
            title="A fresh server's first bursts: the KV pool touched in idle time, or on first use",
            xlabel=f"burst ({a.concurrency} requests of {a.bench.input_len} words each, one burst after another)",
            ylabel="wall time per burst, s (median over rounds)", note=format_cpu_info(info).splitlines()[0])
        if png:
            print(f"PNG:  {png}")

if __name__ == "__main__":
    main()
