"""Beyond one process (issue 20), two parts: ``--parts tp,routing`` (default both).

**tp**: tensor parallelism on this machine: SmolLM2-135M at TP=1 and TP=3 (its 9 query / 3
KV heads allow 1, 3), the same requests, in one run.

Per setting: decode tok/s at batch 1 and 16 (128-token prompts, 64 generated, the median decode step),
KV bytes per token per rank and over all ranks, and the communication cost per step. Two all-reduces
per layer (after o_proj and after the MLP) are the only collectives of a step, besides rank 0's
broadcast of the step plan:

- "all-reduce, alone": N gloo processes doing nothing but all-reduces of one step's [batch, hidden]
  tensors, median of 200: the wire cost, times 2 x layers per step;
- "in all-reduce on rank 0": the time rank 0 spent inside the model's all-reduces during the run,
  per decode step: the wire cost plus waiting for the slowest rank;
- "broadcast of the plan": rank 0's pickle + send of the step, per decode step.

A 2-core machine cannot show a speed-up (3 ranks share 2 cores); the figures say what a step costs in
communication, to plan GPU runs. With a GPU machine: ``--device cuda`` (NCCL), same table.
Saved to results/distributed.json and .png.

**routing**: ``kvserve serve --replicas 2`` (a local Ray instance, one CPU per replica), once with
``--router round-robin`` and once with ``--router prefix``, the same workload: 8 system prompts of
1,024 tokens (8 different texts of Python's documentation) x 16 questions each, 128 requests in one
random order, 4 at a time, streamed, 8 tokens each. Per router: the prefix-hit rate (prompt tokens the
replicas found in their prefix caches / prompt tokens looked up, from /replicas before and after) and
the mean and median TTFT seen by the client; each the median of ``--repeats`` runs (default 3) on fresh
servers. Each replica's KV pool is ``--routing-pools`` (default
110MiB: ~4.8k tokens in bf16, room for 4 of the 8 system prompts: the case routing is for; with a pool
that holds all 8 on every replica, both routers hit nearly always after the first misses, and the
second pool size shows that). Saved to results/distributed_routing.json and .png.

    .venv/bin/python benchmarks/bench_distributed.py                  # both parts, ~13 min on 2 cores
    .venv/bin/python benchmarks/bench_distributed.py --parts routing
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS_DIR, command_line, cpu_info, format_cpu_info, format_table, now_iso, prompt_ids,  # noqa: E402
                    pyplot, save_json, settings_of)


def _allreduce_worker(rank: int, world: int, address: str, shapes: list, dtype, iters: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world)
    res = {}
    for shape in shapes:
        x = torch.ones(shape, dtype=dtype)
        for _ in range(10):
            dist.all_reduce(x)
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t)
        res[str(shape)] = statistics.median(times)
    if rank == 0:
        out.put(res)
    dist.destroy_process_group()


def allreduce_alone(world: int, shapes: list, dtype, iters: int = 200) -> dict:
    """Median seconds of one all-reduce per shape, N processes doing nothing else."""
    from kvserve.engine.tp import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    address = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_allreduce_worker, args=(r, world, address, shapes, dtype, iters, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = q.get(timeout=300)
    for p in procs:
        p.join()
    return res


def run(world: int, batch: int, prompts: list[list[int]], new: int, dtype: str, device: str | None) -> dict:
    import kvserve.models.decoder as decoder
    from kvserve import LLM, SamplingParams

    llm = LLM("smollm2-135m", quantization=None, dtype=dtype, device=device, tensor_parallel_size=world, max_num_seqs=batch,
              max_num_batched_tokens=max(512, 128 * batch), kv_cache_memory="256MiB", enable_prefix_caching=False)
    e = llm.engine
    spent = {"all_reduce": 0.0, "broadcast": 0.0}
    real_reduce = decoder.dist.all_reduce

    def timed_reduce(x, *a, **kw):
        t = time.perf_counter()
        real_reduce(x, *a, **kw)
        spent["all_reduce"] += time.perf_counter() - t

    if e.tp is not None:
        real_send = e.tp.send

        def timed_send(msg):
            t = time.perf_counter()
            real_send(msg)
            spent["broadcast"] += time.perf_counter() - t

        e.tp.send = timed_send
    decoder.dist.all_reduce = timed_reduce
    try:
        sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
        for p in prompts[:batch]:
            e.add_request({"prompt_token_ids": p}, sp)
        steps = []
        while e.has_unfinished_requests():
            before = dict(spent)
            t = time.perf_counter()
            decoding = not e.scheduler.waiting and all(r.num_computed_tokens >= r.num_prompt_tokens
                                                       for r in e.scheduler.running)
            e.step()
            if decoding:  # a decode step: every running request past its prompt
                steps.append((time.perf_counter() - t, spent["all_reduce"] - before["all_reduce"],
                              spent["broadcast"] - before["broadcast"]))
        stats = llm.cache_stats()
    finally:
        decoder.dist.all_reduce = real_reduce
        llm.shutdown()
    step = statistics.median(s[0] for s in steps)
    return {"decode_tok_s": batch / step, "step_ms": 1e3 * step,
            "in_all_reduce_ms": 1e3 * statistics.median(s[1] for s in steps),
            "broadcast_ms": 1e3 * statistics.median(s[2] for s in steps),
            "kv_bytes_per_token_per_rank": stats["kv_bytes_per_token"],
            "kv_bytes_per_token_all_ranks": stats["kv_bytes_per_token_all_ranks"], "decode_steps": len(steps)}


# ---------------------------------------------------------------- routing


def routing_workload(tok, systems: int, questions: int, system_len: int, seed: int = 0) -> list[list[int]]:
    """``systems`` x ``questions`` prompts (token ids): a system prompt of ``system_len`` tokens (each
    from a different documentation topic, so no two share a first token run) and a short question;
    shuffled once."""
    import random

    from pydoc_data.topics import topics

    long = [t for _, t in sorted(topics.items()) if len(t) > 5000]
    texts = long[:: max(1, len(long) // systems)][:systems]
    prompts = []
    for i, text in enumerate(texts):
        sys_ids = prompt_ids(tok, system_len, text=f"System prompt {i}.\n{text}")
        for q in range(questions):
            prompts.append(sys_ids + tok.encode(f"\nQuestion {q}: in one line, what does section {q + 1} say?",
                                                add_special_tokens=False))
    random.Random(seed).shuffle(prompts)
    return prompts


def serve_replicas(router: str, pool: str, max_model_len: int, dtype: str):
    """``kvserve serve --replicas 2`` in a subprocess (its own local Ray instance); (process, url)."""
    import subprocess

    import httpx

    from kvserve.engine.tp import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "kvserve.server", "--replicas", "2", "--router", router, "--port", str(port),
           "--kv-cache-memory", pool, "--max-model-len", str(max_model_len), "--dtype", dtype, "--log-level", "warning"]
    import tempfile

    log = open(Path(tempfile.gettempdir()) / f"kvserve_routing_{router}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); see {log.name}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server not ready after 300 s")


def _replica_totals(url: str) -> dict:
    import httpx

    data = httpx.get(f"{url}/replicas", timeout=10).json()["data"]
    return {"hits": sum(r["prefix_cache_hits"] or 0 for r in data),
            "queries": sum(r["prefix_cache_queries"] or 0 for r in data),
            "per_replica_tokens": {r["id"]: r["generation_tokens"] or 0 for r in data}}


async def _drive(url: str, prompts: list[list[int]], concurrency: int, max_tokens: int) -> list[float]:
    """Stream every prompt, ``concurrency`` at a time; the TTFT of each, in seconds."""
    import asyncio

    import httpx

    sem = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []

    async def one(client: httpx.AsyncClient, ids: list[int]) -> None:
        async with sem:
            t0 = time.perf_counter()
            first = None
            body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True}
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if first is None and line.startswith("data: {"):
                        first = time.perf_counter() - t0
            ttfts.append(first)

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(one(client, p) for p in prompts))
    return ttfts


def _one_routing_run(router: str, pool: str, prompts: list[list[int]], args) -> dict:
    """A fresh 2-replica server (cold caches), the whole workload, its figures."""
    import asyncio

    proc, url = serve_replicas(router, pool, args.system_len + 512, args.dtype)
    try:
        before = _replica_totals(url)
        t = time.perf_counter()
        ttfts = asyncio.run(_drive(url, prompts, args.concurrency, args.routing_tokens))
        wall = time.perf_counter() - t
        time.sleep(1.5)  # the replicas publish their stats twice a second
        after = _replica_totals(url)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    hits, queries = after["hits"] - before["hits"], after["queries"] - before["queries"]
    run = {"hit_rate": hits / queries, "hit_tokens": hits, "query_tokens": queries,
           "ttft_mean_s": statistics.mean(ttfts), "ttft_median_s": statistics.median(ttfts),
           "ttft_p90_s": sorted(ttfts)[int(0.9 * len(ttfts))], "wall_s": wall,
           "tokens_per_replica": sorted(after["per_replica_tokens"].values())}
    print(f"  {pool} {router}: hit rate {run['hit_rate']:.1%}, mean TTFT {1e3 * run['ttft_mean_s']:.0f} ms", flush=True)
    return run


def routing_part(args, info: dict) -> None:
    from kvserve.models.loader import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("smollm2-135m"))
    prompts = routing_workload(tok, args.systems, args.questions, args.system_len)
    rows, results = [], {}
    for pool in args.routing_pools.split(","):
        for router in ("round-robin", "prefix"):
            runs = [_one_routing_run(router, pool, prompts, args) for _ in range(args.repeats)]
            r = {"pool": pool, "router": router, "runs": runs}
            for key in ("hit_rate", "ttft_mean_s", "ttft_median_s", "ttft_p90_s", "wall_s"):
                r[key] = statistics.median(x[key] for x in runs)
            r["tokens_per_replica"] = runs[-1]["tokens_per_replica"]
            results[f"{pool}_{router}"] = r
            rows.append([pool, router, f"{r['hit_rate']:.1%}", f"{1e3 * r['ttft_mean_s']:.0f}",
                         f"{1e3 * r['ttft_median_s']:.0f}", f"{1e3 * r['ttft_p90_s']:.0f}", f"{r['wall_s']:.1f}",
                         "/".join(map(str, r["tokens_per_replica"]))])
            print(rows[-1], flush=True)
        rr, pf = results[f"{pool}_round-robin"], results[f"{pool}_prefix"]
        results[f"{pool}_ratios"] = {"hit_rate": pf["hit_rate"] / rr["hit_rate"],
                                     "ttft_mean": rr["ttft_mean_s"] / pf["ttft_mean_s"]}
        print(f"pool {pool}: prefix-aware hit rate {results[f'{pool}_ratios']['hit_rate']:.2f}x round-robin's, "
              f"mean TTFT {results[f'{pool}_ratios']['ttft_mean']:.2f}x lower", flush=True)
    print(format_table(["KV pool per replica", "router", "prefix-hit rate", "TTFT mean ms", "TTFT median ms",
                        "TTFT p90 ms", "wall s", "generated tokens per replica"], rows))
    out = RESULTS_DIR / "distributed_routing.json"
    save_json(out, {"date": now_iso(), "command": command_line(), "settings": settings_of(args), "cpu": info,
                    "requests": len(prompts), "results": results})
    plt = pyplot()
    if plt is not None:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8), dpi=110)
        pools = args.routing_pools.split(",")
        x = range(len(pools))
        for k, router in enumerate(("round-robin", "prefix")):
            a1.bar([i + 0.4 * k for i in x], [results[f"{p}_{router}"]["hit_rate"] for p in pools], 0.4, label=router)
            a2.bar([i + 0.4 * k for i in x], [1e3 * results[f"{p}_{router}"]["ttft_mean_s"] for p in pools], 0.4,
                   label=router)
        for a, yl in ((a1, "prefix-hit rate"), (a2, "mean TTFT (ms)")):
            a.set_xticks([i + 0.2 for i in x], [f"pool {p}" for p in pools])
            a.set_ylabel(yl)
            a.grid(alpha=0.3, axis="y")
            a.legend(fontsize=8)
        fig.suptitle(f"2 replicas, {len(prompts)} requests: {args.systems} system prompts x {args.questions} questions")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="tp,routing")
    ap.add_argument("--sizes", default="1,3")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=str(RESULTS_DIR / "distributed.json"))
    ap.add_argument("--routing-pools", default="110MiB,256MiB", help="KV pool per replica, one run of each")
    ap.add_argument("--systems", type=int, default=8)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--system-len", type=int, default=1024)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--routing-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="routing: fresh servers per router and pool, medians")
    args = ap.parse_args()
    info = cpu_info()
    print(format_cpu_info(info), flush=True)
    parts = args.parts.split(",")
    if "tp" in parts:
        tp_part(args, info)
    if "routing" in parts:
        routing_part(args, info)


def tp_part(args, info: dict) -> None:
    from kvserve.engine.llm_engine import resolve_device, resolve_dtype
    from kvserve.models.loader import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("smollm2-135m"))
    batches = [int(b) for b in args.batches.split(",")]
    prompts = [prompt_ids(tok, 128 + i)[-128:] for i in range(max(batches))]
    dtype = resolve_dtype(args.dtype, resolve_device(args.device))
    rows, results = [], {}
    for n in [int(x) for x in args.sizes.split(",")]:
        wire = allreduce_alone(n, [(b, 576) for b in batches], dtype) if n > 1 else {}
        for b in batches:
            r = run(n, b, prompts, args.new_tokens, args.dtype, args.device)
            r["all_reduce_alone_ms_per_step"] = 1e3 * 2 * 30 * wire[str((b, 576))] if n > 1 else 0.0
            results[f"tp{n}_b{b}"] = r
            rows.append([n, b, f"{r['decode_tok_s']:.1f}", f"{r['step_ms']:.1f}", f"{r['all_reduce_alone_ms_per_step']:.2f}",
                         f"{r['in_all_reduce_ms']:.2f}", f"{r['broadcast_ms']:.2f}", f"{r['kv_bytes_per_token_per_rank']:,}",
                         f"{r['kv_bytes_per_token_all_ranks']:,}"])
            print(rows[-1], flush=True)
    print(format_table(["TP", "batch", "decode tok/s", "ms/step", "all-reduce alone ms/step", "in all-reduce on rank 0 ms/step",
                        "broadcast of the plan ms/step", "KV B/token per rank", "KV B/token all ranks"], rows))
    save_json(args.out, {"date": now_iso(), "command": command_line(), "settings": settings_of(args), "cpu": info,
                         "dtype": str(dtype), "results": results})
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        labels = list(results)
        comp = [results[k]["step_ms"] - results[k]["in_all_reduce_ms"] - results[k]["broadcast_ms"] for k in labels]
        ax.bar(labels, comp, label="compute (and the rest)")
        ax.bar(labels, [results[k]["in_all_reduce_ms"] for k in labels], bottom=comp, label="in all-reduce (rank 0)")
        ax.bar(labels, [results[k]["broadcast_ms"] for k in labels],
               bottom=[c + results[k]["in_all_reduce_ms"] for c, k in zip(comp, labels)], label="broadcast of the plan")
        ax.set(ylabel="ms per decode step", title=f"SmolLM2-135M tensor parallel, {os.cpu_count()} cores, {dtype}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
