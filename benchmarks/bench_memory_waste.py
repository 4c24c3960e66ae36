"""KV memory waste (issue 4): paged blocks vs the seeds' contiguous max-length reservation, measured in the engine.

The workload is bench_throughput's (same ``--seed``: 64 requests, prompts uniform in [32, 512], outputs
uniform in [16, 256], greedy, EOS ignored). The engine is driven step by step::

    e = llm.engine; e.add_request(...) for each request
    while e.has_unfinished_requests(): e.step(); sample()

and after each step we read, from the engine itself:

  reserved = cache_stats()["blocks_used"] * kv_cache.block_size      tokens of KV memory held by live requests
  used     = sum(r.num_computed_tokens for r in scheduler.running)   tokens whose K/V is actually stored

waste = 1 - used / reserved. "Time-averaged" weights each sample by the wall time of the step that
follows it (the memory is held while that step runs): 1 - integral(used dt) / integral(reserved dt).
"Step-averaged" weights every step alike. Peak = the largest reservation seen, and the waste at it.

Runs:

  paged-16     LLM(kv_cache="paged", block_size=16), the real model: time-averaged and step-averaged.
  contiguous   LLM(kv_cache="contiguous", max_model_len=M): one block of M tokens per sequence slot.
               Its schedule is the paged run's, step for step (checked: same running set, same computed
               tokens after every step), so by default it runs with the model stubbed (below) and is
               time-averaged on the paged run's step times; ``--real-contiguous`` runs the model there too
               (its steps are a little faster: one block per request is read as a view, not gathered).
               The waste of other M values follows exactly from the same trace
               (reserved = running sequences x M), printed for M = 768 (the least this workload allows),
               1024, 2048 and 8192 (the model's context).
  block sweep  paged with block_size 1, 4, 8, 16, 32, scheduler + KV manager only: the model's forward is
               replaced by a stub that returns a fixed token. With EOS ignored the schedule does not depend
               on token values, so the block tables are exactly those of a real run (the bs=16 stub trace is
               checked against the real one); only step-averaged waste is meaningful there (no real time).
  HF           the peer: HF generate's DynamicCache on static batches of 16 and 32 holds batch x (padded prompt
               + tokens so far) for every row until the batch's longest output is done; computed exactly from
               those tensor shapes and the same lengths (HF is not run here: see bench_throughput.py).

Prefix caching is off in these runs: it shares blocks between requests, which would count tokens twice.

    .venv/bin/python benchmarks/bench_memory_waste.py           # full run (~10 min on 2 shared cores)
    .venv/bin/python benchmarks/bench_memory_waste.py --quick   # 16 requests, outputs 16-64
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_throughput import finish_workload_args, header, make_workload, setup_torch, workload_args  # noqa: E402
from common import (  # noqa: E402
    RESULTS_DIR, command_line, finish_figure, fmt, format_table, now_iso, pyplot, save_json, settings_of,
)

from kvserve.engine.llm_engine import resolve_dtype  # noqa: E402
from kvserve.llm import LLM  # noqa: E402
from kvserve.models.loader import load_tokenizer, resolve_model  # noqa: E402
from kvserve.sampling_params import SamplingParams  # noqa: E402

SEEDS_FIGURE = "60-80 % (the seeds' figure for contiguous max-length reservation, from the vLLM paper)"


def stub_runner(engine) -> None:
    """Replace the model forward with a constant token: scheduler and KV manager run as they are."""
    token = 1000

    engine.runner.execute = lambda out: None  # no logits
    engine.sampler = lambda logits, requests: [(token, None) for _ in requests]


def trace_run(llm: LLM, wl: dict) -> dict:
    """Drive the engine step by step; one sample of reserved/used tokens after each step."""
    e = llm.engine
    bs = e.kv_cache.block_size
    for ids, n in zip(wl["prompts"], wl["output_lens"]):
        e.add_request(None, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), prompt_token_ids=ids)
    samples = []  # (step seconds, reserved tokens, used tokens, running)
    t0 = time.perf_counter()
    while e.has_unfinished_requests():
        ts = time.perf_counter()
        e.step()
        dt = time.perf_counter() - ts
        st = e.cache_stats()
        used = sum(r.num_computed_tokens for r in e.scheduler.running)
        samples.append((dt, st["blocks_used"] * bs, used, len(e.scheduler.running)))
    wall = time.perf_counter() - t0
    # Sample i holds the memory left after step i, i.e. while step i+1 runs: weight it by that step's time.
    durs = [s[0] for s in samples[1:]] + [0.0]
    return {"block_size": bs, "wall_s": wall, "steps": len(samples), "preemptions": e.scheduler.num_preemptions,
            "step_s": [s[0] for s in samples], "weights": durs, "reserved": [s[1] for s in samples],
            "used": [s[2] for s in samples], "running": [s[3] for s in samples]}


def waste_stats(reserved: list[float], used: list[float], weights: list[float] | None = None) -> dict:
    pts = [(r, u, w) for r, u, w in zip(reserved, used, weights or [1.0] * len(reserved)) if r > 0]
    R = sum(r * w for r, u, w in pts)
    U = sum(u * w for r, u, w in pts)
    peak = max(pts, key=lambda p: p[0])
    per = [1 - u / r for r, u, w in pts]
    return {
        "waste": 1 - U / R if R else None,
        "mean_of_step_waste": sum(per) / len(per) if per else None,
        "max_step_waste": max(per) if per else None,
        "peak_reserved_tokens": peak[0],
        "used_at_peak_tokens": peak[1],
        "waste_at_peak": 1 - peak[1] / peak[0],
        "samples": len(pts),
    }


def hf_static_waste(wl: dict, batch_size: int) -> dict:
    """DynamicCache of HF generate on static batches in arrival order: at decode step t (t = 1..T, T = the
    batch's longest output) every row holds pad_to + t - 1 tokens of K/V; a row's useful K/V is its own
    prompt + min(t - 1, its output length - 1) tokens (left padding and tokens past its length are waste).
    Step-averaged over all decode steps of all batches."""
    reserved, used = [], []
    P, O = wl["prompt_lens"], wl["output_lens"]
    for s in range(0, len(P), batch_size):
        p, o = P[s : s + batch_size], O[s : s + batch_size]
        W, T = max(p), max(o)
        for t in range(1, T + 1):
            reserved.append(len(p) * (W + t - 1))
            used.append(sum(pi + min(t - 1, oi - 1) for pi, oi in zip(p, o) if t <= oi))
    return waste_stats(reserved, used)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_args(p)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=1024, help="contiguous reservation per sequence (default %(default)s)")
    p.add_argument("--kv-cache-memory", default="2GiB", help="paged pool (default %(default)s: no preemption)")
    p.add_argument("--block-sizes", default="1,4,8,16,32")
    p.add_argument("--no-model", action="store_true", help="stub the model in every run (no time-averaged figures)")
    p.add_argument("--real-contiguous", action="store_true",
                   help="run the model in the contiguous run too (default: stub, time-averaged on the paged run's "
                        "step times, as the two schedules are identical step for step; checked)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/memory_waste.json, *_quick with --quick)")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    finish_workload_args(a)
    a.block_sizes = [int(x) for x in a.block_sizes.split(",")]
    stem = "memory_waste_quick" if a.quick else "memory_waste"
    a.out = Path(a.out) if a.out else RESULTS_DIR / f"{stem}.json"
    return a


def make_llm(a, dtype, **kw) -> LLM:
    return LLM(a.model, quantization=None, dtype=dtype, max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
               max_num_batched_tokens=a.max_num_batched_tokens, enable_prefix_caching=False, **kw)


def plot(path: Path, traces: dict[str, dict], title: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), dpi=120)
    ax = axes[0]
    first = next(iter(traces.values()))
    ax.plot(first["used"], label="used (computed tokens of running requests)", color="black", lw=2)
    for name, tr in traces.items():
        ax.plot(tr["reserved"], label=f"reserved: {name}", lw=1)
    ax.set_xlabel("engine step")
    ax.set_ylabel("KV tokens")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    ax.set_title("KV tokens reserved vs used, after each step", fontsize=9)
    ax = axes[1]
    for name, tr in traces.items():
        w = [100 * (1 - u / r) if r else None for r, u in zip(tr["reserved"], tr["used"])]
        ax.plot([x for x, y in enumerate(w) if y is not None], [y for y in w if y is not None], label=name, lw=1)
    ax.set_xlabel("engine step")
    ax.set_ylabel("waste % = 1 - used / reserved")
    ax.set_yscale("symlog", linthresh=1)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("waste after each step", fontsize=9)
    return finish_figure(fig, title, path)


def main(argv=None) -> int:
    a = parse_args(argv)
    setup_torch(a.threads)
    dtype = resolve_dtype(a.dtype, torch.device("cpu"))
    info = header(a, dtype)
    tok = load_tokenizer(resolve_model(a.model))
    wl = make_workload(tok, a.num_requests, a.seed, a.prompt_range, a.output_range)
    tightest = max(p + o for p, o in zip(wl["prompt_lens"], wl["output_lens"]))
    print(f"workload: {a.num_requests} requests, seed {a.seed}, prompts U{list(a.prompt_range)}, outputs "
          f"U{list(a.output_range)}; scheduler max_num_seqs={a.max_num_seqs}, max_num_batched_tokens="
          f"{a.max_num_batched_tokens}; prefix caching off; longest request {tightest} tokens")
    print()
    t_start = time.perf_counter()
    runs: dict[str, dict] = {}

    def run(name: str, stub: bool, **kw) -> dict:
        llm = make_llm(a, dtype, **kw)
        if stub:
            stub_runner(llm.engine)
        tr = trace_run(llm, wl)
        tr["model"] = "stub" if stub else "real"
        runs[name] = tr
        print(f"  {name}: {tr['steps']} steps, {tr['wall_s']:.1f} s, {tr['preemptions']} preemptions", flush=True)
        del llm
        gc.collect()
        return tr

    real = not a.no_model
    run("paged bs=16", not real, kv_cache="paged", block_size=16, kv_cache_memory=a.kv_cache_memory)
    con = run(f"contiguous M={a.max_model_len}", not (real and a.real_contiguous), kv_cache="contiguous")
    if real and not a.real_contiguous and con["used"] == runs["paged bs=16"]["used"]:
        # same schedule, step for step: time-average the contiguous trace on the paged run's clock
        con["weights"] = runs["paged bs=16"]["weights"]
        con["clock"] = "paged bs=16 run (same schedule)"
    for bs in a.block_sizes:
        run(f"paged bs={bs} (stub)", True, kv_cache="paged", block_size=bs, kv_cache_memory=a.kv_cache_memory)
    total_s = time.perf_counter() - t_start

    p16, con = runs["paged bs=16"], runs[f"contiguous M={a.max_model_len}"]
    same_schedule = p16["used"] == con["used"] and p16["running"] == con["running"]
    stub16 = runs.get("paged bs=16 (stub)")
    stub_matches = stub16 is not None and stub16["used"] == p16["used"] and stub16["reserved"] == p16["reserved"]

    rows, results = [], {}

    def add(name: str, kind: str, ws_time: dict | None, ws_step: dict, note: str = "") -> None:
        results[name] = {"kind": kind, "time_averaged": ws_time, "step_averaged": ws_step, "note": note}
        rows.append([name, kind,
                     fmt(100 * ws_time["waste"], 2) if ws_time else "-",
                     fmt(100 * ws_step["waste"], 2),
                     fmt(ws_step["peak_reserved_tokens"], 0), fmt(ws_step["used_at_peak_tokens"], 0),
                     fmt(100 * ws_step["waste_at_peak"], 2), note])

    w = p16["weights"] if p16["model"] == "real" else None
    add("paged, block_size 16", "measured" + (" (model)" if w else " (stub)"),
        waste_stats(p16["reserved"], p16["used"], w) if w else None, waste_stats(p16["reserved"], p16["used"]))
    wc = con["weights"] if con["model"] == "real" or con.get("clock") else None
    add(f"contiguous, max_model_len {a.max_model_len}", "measured" + (" (model)" if con["model"] == "real" else " (stub)"),
        waste_stats(con["reserved"], con["used"], wc) if wc else None, waste_stats(con["reserved"], con["used"]),
        "one max_model_len block per sequence" + ("; timed on the paged run's clock" if con.get("clock") else ""))
    for M in sorted({tightest, 768, 1024, 2048, 8192} - {a.max_model_len}):
        if M < tightest:
            continue
        res = [n * M for n in con["running"]]
        add(f"contiguous, max_model_len {M}", "from the trace",
            waste_stats(res, con["used"], wc) if wc else None, waste_stats(res, con["used"]),
            "running x M" + (" (least for this workload)" if M == tightest else ""))
    for bs in a.block_sizes:
        tr = runs[f"paged bs={bs} (stub)"]
        add(f"paged, block_size {bs} (sweep)", "measured (stub)", None, waste_stats(tr["reserved"], tr["used"]),
            f"~{(bs - 1) / 2:.1f} tokens/seq expected")
    for b in (16, 32):
        if b <= a.num_requests:
            add(f"HF static batch {b} (DynamicCache)", "computed", None, hf_static_waste(wl, b),
                "padding + finished rows")

    headers = ["layout", "how", "waste % (time-avg)", "waste % (step-avg)", "peak reserved tok",
               "used at peak tok", "waste % at peak", "note"]
    table = format_table(headers, rows)
    print()
    print(table)
    print()
    bpt = None
    try:
        from kvserve.kv.spec import KVSpec
        from kvserve.models.loader import load_model_config

        bpt = KVSpec.from_model(load_model_config(resolve_model(a.model)), dtype).bytes_per_token
    except Exception:  # noqa: BLE001 - only for the bytes line
        pass
    if bpt:
        pk, ck = results["paged, block_size 16"]["step_averaged"], results[f"contiguous, max_model_len {a.max_model_len}"]["step_averaged"]
        print(f"KV bytes per token: {bpt} ({str(dtype).removeprefix('torch.')}); peak reserved: paged-16 "
              f"{pk['peak_reserved_tokens'] * bpt / 2**20:.1f} MiB, contiguous M={a.max_model_len} "
              f"{ck['peak_reserved_tokens'] * bpt / 2**20:.1f} MiB")
    mean_running = sum(p16["running"]) / max(1, len(p16["running"]))
    mean_used = sum(p16["used"]) / max(1, len(p16["used"]))
    print(f"mean running requests {mean_running:.1f}, mean used tokens {mean_used:.0f} "
          f"({mean_used / max(1e-9, mean_running):.0f} per request): a last partial block of 16 wastes 7.5 tokens "
          f"per request on average, i.e. ~{7.5 * mean_running / max(1, mean_used) * 100:.1f} % here")
    print(f"seeds' figure for contiguous reservation: {SEEDS_FIGURE}")
    print(f"paged and contiguous runs had the same schedule: {same_schedule}; bs=16 stub trace == real trace: {stub_matches}")
    print(f"benchmark time: {total_s:.0f} s")

    doc = {
        "benchmark": "memory_waste",
        "date": now_iso(),
        "command": command_line(),
        "machine": info,
        "settings": settings_of(a),
        "workload": {k: v for k, v in wl.items() if k != "prompts"},
        "method": __doc__,
        "results": results,
        "checks": {"paged_and_contiguous_same_schedule": same_schedule, "stub_bs16_matches_real": stub_matches},
        "seeds_figure": SEEDS_FIGURE,
        "traces": {k: {kk: v for kk, v in tr.items()} for k, tr in runs.items()},
        "table_markdown": table,
        "kv_bytes_per_token": bpt,
        "benchmark_seconds": total_s,
    }
    save_json(a.out, doc)
    print(f"JSON: {a.out}")
    if not a.no_plot:
        traces = {"paged bs=16": p16, f"contiguous M={a.max_model_len}": con}
        for bs in a.block_sizes:
            if bs != 16:
                traces[f"paged bs={bs}"] = runs[f"paged bs={bs} (stub)"]
        png = plot(a.out.with_suffix(".png"), traces,
                   f"{a.num_requests} requests (seed {a.seed}), max_num_seqs={a.max_num_seqs}, "
                   f"max_num_batched_tokens={a.max_num_batched_tokens}")
        if png:
            print(f"PNG:  {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
