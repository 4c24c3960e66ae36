"""Tensor parallelism on this machine (issue 20, part 1): SmolLM2-135M at TP=1 and TP=3 (its 9 query / 3
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

    .venv/bin/python benchmarks/bench_distributed.py        # ~3 min on 2 cores
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

    llm = LLM("smollm2-135m", dtype=dtype, device=device, tensor_parallel_size=world, max_num_seqs=batch,
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,3")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=str(RESULTS_DIR / "distributed.json"))
    args = ap.parse_args()
    info = cpu_info()
    print(format_cpu_info(info), flush=True)
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
