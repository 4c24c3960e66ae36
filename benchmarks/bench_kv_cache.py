"""KV cache vs no cache (issue 3): the seeds' central claim, measured.

One process, one run, the same weights (the GGUF file behind ``--model``), the same dtype and the same
prompt token ids for every system:

  off       kvserve LLM(kv_cache="off"): no cache, every step recomputes the whole sequence
  contig    kvserve LLM(kv_cache="contiguous"): the seeds' preallocated per-sequence cache
  int8      kvserve LLM(kv_cache="contiguous", quantization="int8"): same, int8 weight-only linears
  hf        HF transformers generate(use_cache=True): DynamicCache
  hf-nc     HF transformers generate(use_cache=False): only at the shortest lengths (it is very slow)

For each prompt length: TTFT (prefill + first sample) and the decode rate after the first token, greedy,
EOS ignored, batch 1; medians over ``--runs`` runs, interleaved (length -> run -> system) so that drift in
a shared machine's load hits every system alike. The no-cache systems are O(n^2) in the generated
length, so they make ``--new-tokens-nocache`` tokens; compare systems by ms per new token.

    .venv/bin/python benchmarks/bench_kv_cache.py            # full run (~15 min on 2 cores)
    .venv/bin/python benchmarks/bench_kv_cache.py --quick    # 1 run at 128 and 512, a smoke test
"""
from __future__ import annotations

import argparse
import gc
import os
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
    RESULTS_DIR, cpu_info, fmt, format_cpu_info, format_table, load_hf, median, now_iso, prompt_ids,
    save_json, save_line_plot,
)

from kvserve.engine.llm_engine import resolve_dtype  # noqa: E402
from kvserve.llm import LLM  # noqa: E402
from kvserve.models.loader import DEFAULT_MODEL, load_tokenizer, resolve_model  # noqa: E402
from kvserve.sampling_params import SamplingParams  # noqa: E402

SYSTEMS = {
    # key: (label, cached?)
    "off": ("kvserve kv_cache=off (no cache)", False),
    "contig": ("kvserve kv_cache=contiguous", True),
    "int8": ("kvserve contiguous + int8 weight-only", True),
    "hf": ("HF generate use_cache=True (DynamicCache)", True),
    "hf-nc": ("HF generate use_cache=False", False),
}

METHOD = {
    "kvserve": "engine driven directly: add_request(prompt_token_ids, SamplingParams(temperature=0, max_tokens=N, "
               "ignore_eos=True)), then step() until no request is unfinished. TTFT = add_request -> the step that "
               "returns the first token (prefill in one step: max_num_batched_tokens = max_model_len). Decode = "
               "(N-1) tokens / (time of the last token - time of the first token).",
    "hf": "model.generate(input_ids, attention_mask, do_sample=False, max_new_tokens=N, min_new_tokens=N, "
          "use_cache=...) under torch.inference_mode(), timed with a streamer that stamps time.perf_counter() at each "
          "put(): the first put() after the prompt's is the first token (TTFT), the rest give the decode rate as "
          "for kvserve.",
    "ms_per_new_token": "1000 / decode tok/s: the time per new token after the first, at that context length.",
}


# ---------------------------------------------------------------- systems


class KVServeSystem:
    def __init__(self, key: str, model: str, dtype: torch.dtype, max_model_len: int, **kw):
        t0 = time.perf_counter()
        self.key = key
        kw.setdefault("quantization", None)  # the float weights, as HF's (the int8 row asks for its own)
        self.llm = LLM(model, dtype=dtype, max_model_len=max_model_len, max_num_seqs=1,
                       max_num_batched_tokens=max_model_len, **kw)
        self.engine = self.llm.engine
        self.load_s = time.perf_counter() - t0

    def run(self, ids: list[int], n: int) -> dict:
        e = self.engine
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        stamps, tokens = [], []
        t0 = time.perf_counter()
        e.add_request(None, params, prompt_token_ids=ids)
        while e.has_unfinished_requests():
            outs = e.step()
            now = time.perf_counter()
            for o in outs:
                got = o.outputs[0].token_ids
                if len(got) > len(tokens):  # one new token per step at batch 1
                    stamps.append(now)
                    tokens = list(got)
        return _timing(t0, stamps, tokens, n)


class _Stamps:
    """A generate() streamer that only records when each token arrives."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt ids
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFSystem:
    def __init__(self, key: str, model, use_cache: bool):
        self.key, self.model, self.use_cache = key, model, use_cache
        self.load_s = 0.0

    @torch.inference_mode()
    def run(self, ids: list[int], n: int) -> dict:
        x = torch.tensor([ids], dtype=torch.long)
        streamer = _Stamps()
        t0 = time.perf_counter()
        out = self.model.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n, min_new_tokens=n,
            use_cache=self.use_cache, streamer=streamer, pad_token_id=self.model.generation_config.eos_token_id,
            temperature=None, top_p=None, top_k=None,
        )
        tokens = out[0, len(ids):].tolist()
        return _timing(t0, streamer.times, tokens, n)


def _timing(t0: float, stamps: list[float], tokens: list[int], n: int) -> dict:
    if len(stamps) != n or len(tokens) != n:
        raise RuntimeError(f"expected {n} tokens, got {len(tokens)} tokens and {len(stamps)} time stamps")
    ttft = stamps[0] - t0
    decode = stamps[-1] - stamps[0]
    rate = (n - 1) / decode if n > 1 and decode > 0 else None
    return {
        "ttft_s": ttft,
        "decode_s": decode,
        "total_s": stamps[-1] - t0,
        "new_tokens": n,
        "decode_tok_s": rate,
        "ms_per_new_token": 1000.0 / rate if rate else None,
        "token_times_ms": [1000 * (b - a) for a, b in zip(stamps, stamps[1:])],  # per new token after the first
        "tokens": tokens,
    }


# ---------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model alias or GGUF path (default %(default)s)")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on AVX2 CPUs, bf16 with avx512_bf16/AMX), float32, bfloat16")
    p.add_argument("--lengths", default=None, help="prompt lengths, comma separated (default 128,256,512,1024,2048)")
    p.add_argument("--runs", type=int, default=None, help="runs per system and length; medians are reported (default 3)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens for the cached systems (default 64)")
    p.add_argument("--new-tokens-nocache", type=int, default=None, help="new tokens for the no-cache systems (default 8)")
    p.add_argument("--hf-nocache-lengths", type=int, default=2, help="run HF use_cache=False at this many shortest lengths")
    p.add_argument("--nocache-budget-s", type=float, default=90.0,
                   help="seconds a no-cache system may spend at one length: no further run starts there when it would "
                        "pass this (there is always 1 run; default %(default)s)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 run, lengths 128,512, 16/4 new tokens")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kv_cache.json, *_quick for --quick)")
    p.add_argument("--plot", default=None, help="PNG path (default next to the JSON)")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    quick = a.quick
    a.lengths = [int(x) for x in (a.lengths or ("128,512" if quick else "128,256,512,1024,2048")).split(",")]
    a.runs = a.runs or (1 if quick else 3)
    a.new_tokens = a.new_tokens or (16 if quick else 64)
    a.new_tokens_nocache = a.new_tokens_nocache or (4 if quick else 8)
    a.systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    bad = [s for s in a.systems if s not in SYSTEMS]
    if bad:
        p.error(f"unknown systems {bad}; choose from {list(SYSTEMS)}")
    if min(a.new_tokens, a.new_tokens_nocache) < 2:
        p.error("new tokens must be >= 2 (the decode rate needs a token after the first)")
    stem = "kv_cache_quick" if quick else "kv_cache"
    a.out = Path(a.out) if a.out else RESULTS_DIR / f"{stem}.json"
    a.plot = Path(a.plot) if a.plot else a.out.with_suffix(".png")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started, t_start = now_iso(), time.perf_counter()
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    machine = cpu_info()
    print(format_cpu_info(machine))
    print(f"dtype:        {str(dtype).removeprefix('torch.')} (--dtype {args.dtype})")
    print(f"model:        {args.model}; lengths {args.lengths}; runs {args.runs}; new tokens {args.new_tokens} "
          f"(cached) / {args.new_tokens_nocache} (no cache); batch 1, greedy, EOS ignored")
    load = machine.get("load_average")
    if load and load[0] > 0.75 * (machine["logical_cpus"] or 1) and machine["torch_num_threads"] > 1:
        print(f"warning: load average {load[0]:.1f} on {machine['logical_cpus']} CPUs: other work shares them, and "
              f"{machine['torch_num_threads']} torch threads then wait on each other; --threads 1 is steadier")
    sys.stdout.flush()

    src = resolve_model(args.model)
    tok = load_tokenizer(src)
    prompts = {L: prompt_ids(tok, L) for L in args.lengths}
    max_model_len = max(args.lengths) + max(args.new_tokens, args.new_tokens_nocache) + 1
    hf_nc_lengths = sorted(args.lengths)[: args.hf_nocache_lengths]

    # ---- load everything first (weights are read once per dtype; engines each hold their copy)
    systems: dict[str, object] = {}
    hf_model = None
    for key in args.systems:
        print(f"loading {key}: {SYSTEMS[key][0]} ...", end=" ", flush=True)
        if key in ("off", "contig", "int8"):
            kw = {"kv_cache": "off" if key == "off" else "contiguous"}
            if key == "int8":
                kw["quantization"] = "int8"
            systems[key] = KVServeSystem(key, args.model, dtype, max_model_len, **kw)
        else:
            if hf_model is None:
                hf_model, hf_load_s = load_hf(src, dtype)
            systems[key] = HFSystem(key, hf_model, use_cache=key == "hf")
            systems[key].load_s = hf_load_s  # one model shared by hf and hf-nc
        print(f"{systems[key].load_s:.1f}s", flush=True)

    # ---- warm up each system once on a short prompt (first-call allocations, lazy inits)
    warm_ids = prompt_ids(tok, 32)
    for key, s in systems.items():
        s.run(warm_ids, 3)

    # ---- measure: length -> run -> system, so load drift on a shared machine hits all systems alike
    raw: dict[str, dict[int, list[dict]]] = {k: {L: [] for L in args.lengths} for k in systems}
    spent: dict[tuple[str, int], float] = {}
    for L in args.lengths:
        ids = prompts[L]
        for r in range(args.runs):
            for key, s in systems.items():
                cached = SYSTEMS[key][1]
                if key == "hf-nc" and L not in hf_nc_lengths:
                    continue
                done = raw[key][L]
                if not cached and done and spent[(key, L)] + done[-1]["total_s"] > args.nocache_budget_s:
                    continue  # another run would pass the budget: keep the runs already made
                n = args.new_tokens if cached else args.new_tokens_nocache
                gc.collect()
                t0 = time.perf_counter()
                res = s.run(ids, n)
                spent[(key, L)] = spent.get((key, L), 0.0) + time.perf_counter() - t0
                res["run"] = r
                raw[key][L].append(res)
                print(f"  len {L:5d} run {r + 1}/{args.runs} {key:7s} TTFT {res['ttft_s'] * 1000:9.1f} ms  "
                      f"decode {fmt(res['decode_tok_s'], 2):>7s} tok/s  {fmt(res['ms_per_new_token'], 1):>8s} ms/tok  "
                      f"({res['total_s']:.1f}s)", flush=True)

    # ---- medians, ratios, agreement
    med: dict[str, dict[int, dict]] = {}
    for key in systems:
        med[key] = {}
        for L, runs in raw[key].items():
            if not runs:
                continue
            med[key][L] = {
                "runs": len(runs),
                "new_tokens": runs[0]["new_tokens"],
                "ttft_ms": 1000 * median(x["ttft_s"] for x in runs),
                "decode_tok_s": median(x["decode_tok_s"] for x in runs),
                "ms_per_new_token": median(x["ms_per_new_token"] for x in runs),
            }

    def get(key, L, metric):
        return med.get(key, {}).get(L, {}).get(metric)

    def ratio(a, b):
        return a / b if a is not None and b else None

    ratios = {
        "contig_vs_off_decode_speedup": {L: ratio(get("off", L, "ms_per_new_token"), get("contig", L, "ms_per_new_token"))
                                         for L in args.lengths},
        "int8_vs_off_decode_speedup": {L: ratio(get("off", L, "ms_per_new_token"), get("int8", L, "ms_per_new_token"))
                                       for L in args.lengths},
        "hf_cache_vs_nocache_decode_speedup": {L: ratio(get("hf-nc", L, "ms_per_new_token"), get("hf", L, "ms_per_new_token"))
                                               for L in hf_nc_lengths},
    }
    L0 = min(args.lengths)
    ratios[f"contig_vs_hf_decode_tok_s_at_{L0}"] = ratio(get("contig", L0, "decode_tok_s"), get("hf", L0, "decode_tok_s"))
    ratios[f"int8_vs_hf_decode_tok_s_at_{L0}"] = ratio(get("int8", L0, "decode_tok_s"), get("hf", L0, "decode_tok_s"))
    ratios[f"contig_vs_hf_ttft_at_{L0}"] = ratio(get("hf", L0, "ttft_ms"), get("contig", L0, "ttft_ms"))

    # greedy agreement with kvserve contiguous (same weights, same dtype: fp32 should match token for token)
    agreement = {}
    ref_key = "contig" if "contig" in systems else next(iter(systems))
    for key in systems:
        agreement[key] = {}
        for L in args.lengths:
            a, b = raw[key][L], raw[ref_key][L]
            if a and b:
                ta, tb = a[0]["tokens"], b[0]["tokens"]
                m = min(len(ta), len(tb))
                same = next((i for i in range(m) if ta[i] != tb[i]), m)
                agreement[key][L] = f"{same}/{m}"

    # ---- report
    keys = list(systems)
    headers = ["len"]
    for k in keys:
        headers += [f"{k} TTFT ms", f"{k} tok/s", f"{k} ms/tok"]
    rows = []
    for L in args.lengths:
        row = [str(L)]
        for k in keys:
            row += [fmt(get(k, L, "ttft_ms"), 1), fmt(get(k, L, "decode_tok_s"), 2), fmt(get(k, L, "ms_per_new_token"), 1)]
        rows.append(row)
    table = format_table(headers, rows)
    print()
    print("systems:")
    for k in keys:
        nt = args.new_tokens if SYSTEMS[k][1] else args.new_tokens_nocache
        extra = f", lengths {hf_nc_lengths} only" if k == "hf-nc" else ""
        print(f"  {k:7s} {SYSTEMS[k][0]} ({nt} new tokens{extra})")
    print(f"\nmedians of up to {args.runs} runs (ms/tok = 1000 / decode tok/s: time per new token after the first)")
    print(table)
    short = [k for k in keys if any(m["runs"] < args.runs for m in med[k].values())]
    for k in short:
        print(f"runs made by {k} (no-cache budget {args.nocache_budget_s:.0f}s per length): "
              + ", ".join(f"{L}={m['runs']}" for L, m in med[k].items()))
    def fx(v):
        return "-" if v is None else f"{v:.1f}x"

    ratio_rows = [[str(L), fx(ratios["contig_vs_off_decode_speedup"][L]), fx(ratios["int8_vs_off_decode_speedup"][L])]
                  for L in args.lengths]
    print("\ndecode speedup from the KV cache (off ms/tok / cached ms/tok):")
    print(format_table(["len", "contig vs off", "int8 vs off"], ratio_rows))
    if 1024 in args.lengths:
        sp = ratios["contig_vs_off_decode_speedup"][1024]
        if sp is not None:
            print(f"target: contiguous >= 25x faster per new token than no cache at 1024 -> {sp:.1f}x "
                  f"({'met' if sp >= 25 else 'NOT met'})")
    for L in hf_nc_lengths:
        v = ratios["hf_cache_vs_nocache_decode_speedup"].get(L)
        if v is not None:
            print(f"HF for comparison at {L}: use_cache=True is {v:.1f}x faster per new token than use_cache=False")
    print(f"\nat {L0} tokens, decode tok/s vs HF use_cache=True: kvserve contiguous "
          f"{fx(ratios[f'contig_vs_hf_decode_tok_s_at_{L0}'])}, kvserve contiguous + int8 "
          f"{fx(ratios[f'int8_vs_hf_decode_tok_s_at_{L0}'])} (>1x = kvserve faster); TTFT: HF / kvserve contiguous = "
          f"{fx(ratios[f'contig_vs_hf_ttft_at_{L0}'])}")
    print(f"greedy tokens matching kvserve {ref_key} (first run, leading tokens): "
          + "; ".join(f"{k}: " + ", ".join(f"{L}={v}" for L, v in agreement[k].items()) for k in keys if k != ref_key))
    machine["load_average_end"] = list(os.getloadavg())
    elapsed = time.perf_counter() - t_start
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in machine['load_average_end'])}; "
          f"wall time {elapsed / 60:.1f} min")

    # ---- save
    result = {
        "benchmark": "kv_cache",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": started,
        "elapsed_s": elapsed,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dtype": str(dtype).removeprefix("torch."),
        "model": {"name": args.model, "path": str(src.path)},
        "max_model_len": max_model_len,
        "machine": machine,
        "method": METHOD,
        "systems": {k: {"label": SYSTEMS[k][0], "cached": SYSTEMS[k][1], "load_s": systems[k].load_s,
                        "new_tokens": args.new_tokens if SYSTEMS[k][1] else args.new_tokens_nocache,
                        "lengths": hf_nc_lengths if k == "hf-nc" else args.lengths} for k in keys},
        "prompt_token_ids_head": {L: prompts[L][:16] for L in args.lengths},
        "medians": med,
        "ratios": ratios,
        "greedy_agreement_vs_" + ref_key: agreement,
        "raw": raw,
        "table_markdown": table,
    }
    print(f"\nsaved {save_json(args.out, result)}")
    if not args.no_plot:
        series = {f"{k}: {SYSTEMS[k][0]}": (args.lengths, [get(k, L, "ms_per_new_token") for L in args.lengths])
                  for k in keys}
        path = save_line_plot(
            args.plot, series, logx=True, logy=True,
            styles={f"{k}: {SYSTEMS[k][0]}": {"linestyle": "-" if SYSTEMS[k][1] else "--"} for k in keys},
            title=f"{args.model} ({str(dtype).removeprefix('torch.')}, batch 1): time per new token vs context",
            xlabel="context length (prompt tokens)", ylabel="ms per new token (log)",
            note=f"{machine['cpu_model']}, {machine['torch_num_threads']} threads, torch {machine['torch_version']}; "
                 f"medians of {args.runs} runs; {started[:10]}",
        )
        if path:
            print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
