"""Offline throughput (issue 4): continuous batching over a paged cache vs HF transformers static batches.

One process, one run, the same weights (the GGUF file behind ``--model``), the same dtype, the same
thread count and the same prompt token ids for every system. The workload (fixed ``--seed``):

  * ``--num-requests`` requests (64), all present at t=0, in arrival order;
  * prompt lengths uniform in [32, 512], output lengths uniform in [16, 256];
  * each prompt is real English text (sentences of ``common.PROSE`` shuffled per request and entered
    at a random token offset, so no two requests share the same text), tokenized with the model's own
    tokenizer and cut to its length;
  * greedy, EOS ignored: every request produces exactly its output length.

Systems:

  kvserve  ``LLM(kv_cache="paged", max_num_seqs=S, max_num_batched_tokens=T).generate(prompt ids,
           [SamplingParams(temperature=0, max_tokens=n_i, ignore_eos=True), ...])`` for a few (S, T);
           plus, with ``--quantization int8,w8a8``, one row per quantization at the first setting.
  HF       ``model.generate`` on static batches of 16 and 32 requests in arrival order (no sorting by
           length), left padding, ``max_new_tokens = min_new_tokens =`` the batch's longest output.
           Only each request's own output length counts as output ("useful tokens"): the tokens a short
           request makes while its batch waits for the longest one are wasted work, not throughput.

Reported: useful output tokens / wall time (tok/s) for each, and the ratio kvserve / HF.

    .venv/bin/python benchmarks/bench_throughput.py            # full run (~15 min on 2 shared cores)
    .venv/bin/python benchmarks/bench_throughput.py --quick    # 16 requests, outputs 16-64: a smoke test
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# every system in the process (kvserve and its peer alike) allocates large tensors on 2 MiB pages
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when run as a script
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `kvserve` without an install

from common import (  # noqa: E402
    PROSE, RESULTS_DIR, command_line, cpu_info, fmt, format_cpu_info, format_table, left_pad, load_hf, now_iso,
    pyplot, save_json, settings_of,
)

from kvserve.engine.llm_engine import resolve_dtype  # noqa: E402
from kvserve.models.loader import DEFAULT_MODEL, load_tokenizer, resolve_model  # noqa: E402

DEFAULT_CONFIGS = "32x512,32x1024,64x512,64x1024"  # max_num_seqs x max_num_batched_tokens


# ---------------------------------------------------------------- workload (shared with bench_memory_waste)


def sentences(text: str = PROSE) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s.strip()]


def request_prompt_ids(tokenizer, length: int, index: int, seed: int, attempt: int = 0) -> list[int]:
    """``length`` token ids of English text that differs per request: the sentences of PROSE shuffled
    with this request's own RNG, entered at a random token offset, repeated (reshuffled) as needed."""
    rng = random.Random((seed * 1_000_003 + index) * 101 + attempt)
    sents = sentences()
    ids: list[int] = []
    offset = None
    while len(ids) < length + (offset or 0):
        rng.shuffle(sents)
        ids += tokenizer.encode(" ".join(sents) + " ", add_special_tokens=False)
        if offset is None:
            offset = rng.randrange(0, len(ids) // 2)
    return ids[offset : offset + length]


def make_workload(tokenizer, num_requests: int, seed: int, prompt_range=(32, 512), output_range=(16, 256)) -> dict:
    """Lengths drawn with ``random.Random(seed)``: prompt then output length, request by request."""
    rng = random.Random(seed)
    prompt_lens, output_lens = [], []
    for _ in range(num_requests):
        prompt_lens.append(rng.randint(*prompt_range))
        output_lens.append(rng.randint(*output_range))
    # Different text per request, and no two prompts share their first 16 tokens (a prefix-cache block):
    # the engine's prefix cache must find nothing to reuse, as HF has none.
    prompts, heads = [], set()
    for i, n in enumerate(prompt_lens):
        attempt = 0
        while True:
            ids = request_prompt_ids(tokenizer, n, i, seed, attempt)
            if tuple(ids[:16]) not in heads:
                break
            attempt += 1
        heads.add(tuple(ids[:16]))
        prompts.append(ids)
    return {
        "seed": seed,
        "num_requests": num_requests,
        "prompt_range": list(prompt_range),
        "output_range": list(output_range),
        "prompt_lens": prompt_lens,
        "output_lens": output_lens,
        "prompts": prompts,
    }


def workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="model alias or GGUF path (default %(default)s)")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on AVX2 CPUs, bf16 with avx512_bf16/AMX), float32, bfloat16")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: on 2 cores shared with other work, 2 OpenMP threads "
                        "that wait on each other made small matmuls up to 8x slower; 0 = torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-requests", type=int, default=None, help="default 64 (16 with --quick)")
    p.add_argument("--prompt-range", default="32,512", help="min,max prompt tokens (uniform)")
    p.add_argument("--output-range", default=None, help="min,max output tokens (uniform; default 16,256, 16,64 with --quick)")
    p.add_argument("--quick", action="store_true")


def finish_workload_args(a: argparse.Namespace) -> None:
    a.num_requests = a.num_requests or (16 if a.quick else 64)
    a.prompt_range = tuple(int(x) for x in a.prompt_range.split(","))
    a.output_range = tuple(int(x) for x in (a.output_range or ("16,64" if a.quick else "16,256")).split(","))


def setup_torch(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def header(a, dtype: torch.dtype) -> dict:
    info = cpu_info()
    print(format_cpu_info(info))
    print(f"dtype:        {str(dtype).removeprefix('torch.')} (--dtype {a.dtype})")
    print(f"model:        {a.model}")
    print(f"git:          {git_state()}")
    print()
    info["dtype"] = str(dtype).removeprefix("torch.")
    info["git"] = git_state()
    return info


def git_state() -> str:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "kvserve"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return f"{head}{' + uncommitted changes in kvserve/' if dirty else ''}"
    except OSError:
        return "unknown"


# ---------------------------------------------------------------- systems

WARMUP_TEXT = ("Before the measured work begins, each system answers two short requests like this one, so that "
               "first-call costs such as memory allocation and kernel selection are paid outside the timed region.")
_warmup_ids: list[int] = []


def warmup_prompts(tokenizer) -> list[list[int]]:
    if not _warmup_ids:
        _warmup_ids.extend(tokenizer.encode(WARMUP_TEXT, add_special_tokens=False))
    return [_warmup_ids[:40], _warmup_ids[3:30]]


def run_kvserve(a, wl: dict, dtype, max_num_seqs: int, max_num_batched_tokens: int, quantization=None) -> dict:
    from kvserve.llm import LLM
    from kvserve.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(a.model, dtype=dtype, kv_cache="paged", max_model_len=a.max_model_len, kv_cache_memory=a.kv_cache_memory,
              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, quantization=quantization)
    load_s = time.perf_counter() - t0
    e = llm.engine
    # warm-up. The pool's pages are touched first (KVCache.prefault): a server has used its pool, and on the
    # VMs we measure on a fresh 2 MiB page costs ~13 ms the first time, ~7 s of a 70 s run here otherwise
    # (results: prefault_s). Then first calls allocate and pick kernels (text outside the workload, so the
    # prefix cache keeps nothing the timed prompts could reuse).
    t0 = time.perf_counter()
    if a.prefault == "on":
        e.kv_cache.prefault()
    prefault_s = time.perf_counter() - t0
    llm.generate(warmup_prompts(e.tokenizer), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    steps0, pre0 = e.stats["steps"], e.scheduler.num_preemptions
    q0, h0 = e.kv_manager.prefix_queries, e.kv_manager.prefix_hits
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in wl["output_lens"]]
    t0 = time.perf_counter()
    outs = llm.generate(wl["prompts"], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    got = [len(o.outputs[0].token_ids) for o in outs]
    if got != wl["output_lens"]:
        raise RuntimeError(f"kvserve produced {got} tokens, expected {wl['output_lens']}")
    useful = sum(wl["output_lens"])
    name = f"kvserve paged seqs={max_num_seqs} tokens={max_num_batched_tokens}" + (f" {quantization}" if quantization else "")
    res = {
        "system": name,
        "engine": "kvserve",
        "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": max_num_batched_tokens,
        "quantization": quantization,
        "wall_s": wall,
        "useful_output_tokens": useful,
        "computed_output_tokens": useful,
        "output_tok_s": useful / wall,
        "total_tok_s": (useful + sum(wl["prompt_lens"])) / wall,
        "steps": e.stats["steps"] - steps0,
        "preemptions": e.scheduler.num_preemptions - pre0,
        "prefix_cache_hit_tokens": e.kv_manager.prefix_hits - h0,
        "prefix_cache_query_tokens": e.kv_manager.prefix_queries - q0,
        "kv_blocks_total": e.cache_stats()["blocks_total"],
        "load_s": load_s,
        "prefault_s": prefault_s,
        "tokens": [o.outputs[0].token_ids for o in outs],
    }
    del llm, e
    gc.collect()
    return res


@torch.inference_mode()
def hf_generate_batch(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> list[list[int]]:
    ids, mask = left_pad(prompts, pad_id)
    width = ids.shape[1]
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
    return out[:, width:].tolist()


def run_hf(model, wl: dict, batch_size: int, pad_id: int) -> dict:
    prompts, outs_n = wl["prompts"], wl["output_lens"]
    hf_generate_batch(model, warmup_prompts(None), 4, pad_id)  # warm-up
    tokens: list[list[int]] = []
    computed = 0
    batches = []
    t0 = time.perf_counter()
    for s in range(0, len(prompts), batch_size):
        b_prompts, b_n = prompts[s : s + batch_size], outs_n[s : s + batch_size]
        tb = time.perf_counter()
        gen = hf_generate_batch(model, b_prompts, max(b_n), pad_id)
        batches.append({"size": len(b_prompts), "pad_to": max(len(p) for p in b_prompts), "new_tokens": max(b_n),
                        "useful_tokens": sum(b_n), "seconds": time.perf_counter() - tb})
        computed += len(b_prompts) * max(b_n)
        tokens += [g[:n] for g, n in zip(gen, b_n)]  # each request's own output length counts
    wall = time.perf_counter() - t0
    useful = sum(outs_n)
    return {
        "system": f"HF generate static batch={batch_size}",
        "engine": "hf",
        "batch_size": batch_size,
        "wall_s": wall,
        "useful_output_tokens": useful,
        "computed_output_tokens": computed,
        "output_tok_s": useful / wall,
        "total_tok_s": (useful + sum(wl["prompt_lens"])) / wall,
        "batches": batches,
        "tokens": tokens,
    }


def agreement(a_tokens: list[list[int]], b_tokens: list[list[int]]) -> dict:
    """How many requests produced identical greedy tokens, and the mean common prefix fraction."""
    same, frac = 0, []
    for x, y in zip(a_tokens, b_tokens):
        k = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        same += x == y
        frac.append(k / max(1, len(x)))
    return {"identical_requests": same, "requests": len(a_tokens), "mean_common_prefix": sum(frac) / max(1, len(frac))}


# ---------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_args(p)
    p.add_argument("--configs", default=None,
                   help=f"kvserve settings max_num_seqs x max_num_batched_tokens, comma separated (default {DEFAULT_CONFIGS}; "
                        "32x512 with --quick)")
    p.add_argument("--quantization", default="",
                   help="also run kvserve with these quantizations at the first setting, comma separated: int8 "
                        "(weight-only; slower than fp32 for batches above 16 rows), w8a8 (8-bit activations per block too), "
                        "w8a8-channel (int8 weights x per-token int8 activations in fbgemm); default none")
    p.add_argument("--hf-w8a8", choices=("on", "off"), default="off",
                   help="also run HF at its largest batch size with torch's dynamic int8 quantization of every nn.Linear "
                        "(int8 weights x int8 activations, fbgemm): the same-arithmetic peer for kvserve w8a8-channel")
    p.add_argument("--hf-batch-sizes", default=None, help="HF static batch sizes (default 16,32; 16 with --quick)")
    p.add_argument("--prefault", choices=("on", "off"), default="on",
                   help="touch kvserve's whole KV pool before the timed run (KVCache.prefault; untimed, reported as "
                        "prefault_s), as a server that has been serving has; off: the cold pool's page faults are timed")
    p.add_argument("--max-model-len", type=int, default=1024, help="kvserve max_model_len (>= longest prompt + output)")
    p.add_argument("--kv-cache-memory", default="2GiB", help="kvserve paged pool size (default %(default)s)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/throughput.json, *_quick with --quick)")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    finish_workload_args(a)
    a.configs = [tuple(int(v) for v in c.lower().split("x")) for c in (a.configs or ("32x512" if a.quick else DEFAULT_CONFIGS)).split(",")]
    a.quantization = [q for q in a.quantization.split(",") if q]
    a.hf_batch_sizes = [int(x) for x in (a.hf_batch_sizes or ("16" if a.quick else "16,32")).split(",") if x]
    stem = "throughput_quick" if a.quick else "throughput"
    a.out = Path(a.out) if a.out else RESULTS_DIR / f"{stem}.json"
    if a.prompt_range[1] + a.output_range[1] > a.max_model_len:
        p.error("--max-model-len must hold the longest prompt + output")
    return a


def plot(path: Path, results: list[dict], title: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    names = [r["system"].replace("kvserve paged ", "kvserve\n").replace("HF generate static ", "HF\n") for r in results]
    vals = [r["output_tok_s"] for r in results]
    colors = ["tab:blue" if r["engine"] == "kvserve" else "tab:orange" for r in results]
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(results)), 5), dpi=120)
    bars = ax.bar(range(len(vals)), vals, color=colors)
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(vals)))
    ax.set_xticklabels(names, fontsize=7)
    ax.set_ylabel("useful output tokens / s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    a = parse_args(argv)
    setup_torch(a.threads)
    dtype = resolve_dtype(a.dtype, torch.device("cpu"))
    info = header(a, dtype)
    src = resolve_model(a.model)
    tok = load_tokenizer(src)
    wl = make_workload(tok, a.num_requests, a.seed, a.prompt_range, a.output_range)
    warmup_prompts(tok)
    print(f"workload: {a.num_requests} requests, seed {a.seed}, prompt tokens {sum(wl['prompt_lens'])} "
          f"(uniform {a.prompt_range}), output tokens {sum(wl['output_lens'])} (uniform {a.output_range}), greedy, ignore_eos")
    print()
    results: list[dict] = []
    t_start = time.perf_counter()
    for seqs, toks in a.configs:
        r = run_kvserve(a, wl, dtype, seqs, toks)
        results.append(r)
        print(f"  {r['system']}: {r['wall_s']:.1f} s, {r['output_tok_s']:.1f} tok/s, {r['steps']} steps, "
              f"{r['preemptions']} preemptions" + (f" (pool prefaulted in {r['prefault_s']:.1f} s, untimed)"
                                                   if a.prefault == "on" else ""), flush=True)
    for q in a.quantization:
        seqs, toks = a.configs[0]
        r = run_kvserve(a, wl, dtype, seqs, toks, quantization=q)
        results.append(r)
        print(f"  {r['system']}: {r['wall_s']:.1f} s, {r['output_tok_s']:.1f} tok/s", flush=True)
    hf_results = []
    if a.hf_batch_sizes:
        model, hf_load = load_hf(resolve_model(a.model), dtype)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        for bs in a.hf_batch_sizes:
            r = run_hf(model, wl, bs, pad)
            r["load_s"] = hf_load
            results.append(r)
            hf_results.append(r)
            print(f"  {r['system']}: {r['wall_s']:.1f} s, {r['output_tok_s']:.1f} tok/s "
                  f"(computed {r['computed_output_tokens']} output tokens for {r['useful_output_tokens']} useful)", flush=True)
        if a.hf_w8a8 == "on":
            import warnings

            if dtype != torch.float32:  # torch's dynamic int8 linears take fp32 activations only
                del model
                gc.collect()
                model, _ = load_hf(resolve_model(a.model), torch.float32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
            bs = max(a.hf_batch_sizes)
            r = run_hf(model, wl, bs, pad)
            r["system"] += " w8a8-channel (torch dynamic int8)"
            r["quantization"] = "w8a8-channel"
            results.append(r)
            print(f"  {r['system']}: {r['wall_s']:.1f} s, {r['output_tok_s']:.1f} tok/s", flush=True)
        del model
        gc.collect()
    total_s = time.perf_counter() - t_start

    kv_fp = [r for r in results if r["engine"] == "kvserve" and not r["quantization"]]
    best_kv = max(kv_fp, key=lambda r: r["output_tok_s"])
    best_hf = max(hf_results, key=lambda r: r["output_tok_s"]) if hf_results else None  # fp32 (same dtype)
    for r in results:
        r["vs_best_hf"] = r["output_tok_s"] / best_hf["output_tok_s"] if best_hf else None
        if best_hf:
            r["greedy_agreement_vs_hf"] = agreement(r["tokens"], best_hf["tokens"]) if r is not best_hf else None

    print()
    headers = ["system", "wall s", "useful out tok/s", "in+out tok/s", "steps", "preempt", "x best HF"]
    rows = []
    for r in results:
        rows.append([r["system"], fmt(r["wall_s"]), fmt(r["output_tok_s"]), fmt(r["total_tok_s"]),
                     r.get("steps", "-"), r.get("preemptions", "-"), fmt(r["vs_best_hf"], 2) + "x" if r["vs_best_hf"] else "-"])
    table = format_table(headers, rows)
    print(table)
    print()
    summary = {"best_kvserve": best_kv["system"], "best_kvserve_tok_s": best_kv["output_tok_s"]}
    if best_hf:
        summary.update(best_hf=best_hf["system"], best_hf_tok_s=best_hf["output_tok_s"],
                       ratio_best_kvserve_vs_best_hf=best_kv["output_tok_s"] / best_hf["output_tok_s"])
        for r in hf_results:
            summary[f"ratio_best_kvserve_vs_hf_batch{r['batch_size']}"] = best_kv["output_tok_s"] / r["output_tok_s"]
        print(f"best kvserve ({best_kv['system']}): {best_kv['output_tok_s']:.1f} tok/s; best HF ({best_hf['system']}): "
              f"{best_hf['output_tok_s']:.1f} tok/s; ratio {summary['ratio_best_kvserve_vs_best_hf']:.2f}x (target >= 3x)")
        ag = best_kv["greedy_agreement_vs_hf"]
        print(f"greedy tokens, best kvserve vs best HF: {ag['identical_requests']}/{ag['requests']} requests identical, "
              f"mean common prefix {ag['mean_common_prefix']:.0%} of the output")
        hf_waste = {r["system"]: 1 - r["useful_output_tokens"] / r["computed_output_tokens"] for r in hf_results}
        print("HF decode slots spent on tokens past a request's own length: "
              + ", ".join(f"{k}: {v:.0%}" for k, v in hf_waste.items()))
        summary["hf_wasted_output_fraction"] = hf_waste
    kv_q = {r["quantization"]: r for r in results if r["engine"] == "kvserve" and r["quantization"]}
    hf_q = next((r for r in results if r["engine"] == "hf" and r.get("quantization") == "w8a8-channel"), None)
    if hf_q and "w8a8-channel" in kv_q:
        summary["ratio_kvserve_w8a8_channel_vs_hf_w8a8"] = kv_q["w8a8-channel"]["output_tok_s"] / hf_q["output_tok_s"]
        print(f"same int8 arithmetic: kvserve w8a8-channel {kv_q['w8a8-channel']['output_tok_s']:.1f} tok/s vs HF "
              f"dynamic int8 {hf_q['output_tok_s']:.1f} tok/s: {summary['ratio_kvserve_w8a8_channel_vs_hf_w8a8']:.2f}x")
    print(f"prefix-cache hits in the kvserve runs (prompt tokens): {best_kv['prefix_cache_hit_tokens']} of "
          f"{best_kv['prefix_cache_query_tokens']}")
    print(f"benchmark time: {total_s:.0f} s")
    for r in results:
        r.pop("tokens", None)
    doc = {
        "benchmark": "throughput",
        "date": now_iso(),
        "command": command_line(),
        "machine": info,
        "settings": settings_of(a),
        "workload": {k: v for k, v in wl.items() if k != "prompts"},
        "method": {
            "kvserve": "LLM(kv_cache='paged', max_num_seqs, max_num_batched_tokens).generate(all prompt id lists, "
                       "per-request SamplingParams(temperature=0, max_tokens=n_i, ignore_eos=True)); wall time of that call.",
            "hf": "AutoModelForCausalLM (same GGUF, same dtype).generate on static batches in arrival order, left "
                  "padding, max_new_tokens=min_new_tokens=max output length of the batch; wall time of all batches.",
            "useful_output_tokens": "sum of each request's own output length; HF's extra tokens past a request's "
                                    "length are not counted",
            "warm_up": "each system runs a 2-request, 4-token generate before its timed run",
        },
        "results": results,
        "summary": summary,
        "table_markdown": table,
        "benchmark_seconds": total_s,
    }
    save_json(a.out, doc)
    print(f"JSON: {a.out}")
    if not a.no_plot:
        title = (f"{a.num_requests} requests, prompts U{list(a.prompt_range)}, outputs U{list(a.output_range)}, "
                 f"{info['dtype']}, {info['torch_num_threads']} thread(s), {info['cpu_model']}")
        png = plot(a.out.with_suffix(".png"), results, title)
        if png:
            print(f"PNG:  {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
