"""Sliding-window KV memory and speed on Gemma 3 270M (issue 15): bytes in use against request length,
beside a full-attention cache of the same model and beside llama.cpp; decode speed beside HF
transformers and llama.cpp.

1. Memory. One request with an 8,192-token prompt (``pydoc_data.topics``), prefilled in 512-token
   chunks, then decoding. After every step: tokens in the cache and the KV bytes its blocks hold
   (``kv_bytes_in_use``); rows at the end of the prefill chunks (a sliding group still holds the blocks
   the chunk's first queries see) and at the last decode step. Twice: as the engine runs (each sliding group gives back the blocks its
   512-token window has passed), and with the giving-back turned off (every group keeps every block:
   a full-attention cache of the same model; attention still masks the window, so the tokens are the
   same). llama.cpp allocates its cache when the context is created, for ``n_ctx`` cells: its sizes are
   read from its own log, with the SWA cache at full size (llama-cpp-python's default) and without.
2. Speed. Batch-1 decode tok/s after a 64-token prompt (median of 3 runs of 64 tokens) for kvserve, HF
   transformers (``generate``, same dtype) and llama.cpp (its Q4_K_M weights as stored: not the same
   arithmetic), and a batch of 16 prompts x 128 tokens for kvserve and HF.

    .venv/bin/python benchmarks/bench_sliding_window.py            # ~6 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS_DIR, command_line, cpu_info, format_cpu_info, format_table, load_hf,  # noqa: E402
                    median, now_iso, save_json, save_line_plot, settings_of)

from kvserve import LLM, SamplingParams  # noqa: E402
from kvserve.models.loader import resolve_model  # noqa: E402
from kvserve.ppl import corpus_text  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gemma3-270m"


def memory_curve(ids: list[int], new_tokens: int, drop: bool) -> list[tuple[int, int]]:
    """(tokens in the cache, KV bytes held) after every step of one request."""
    llm = LLM(MODEL, quantization=None, max_model_len=len(ids) + new_tokens + 16, max_num_batched_tokens=512,
              enable_prefix_caching=False, kv_cache_memory="1GiB")
    e = llm.engine
    if not drop:  # every group keeps every block: full attention's memory, the same tokens
        e.kv_manager.windows = [None] * len(e.kv_manager.windows)
    rid = e.add_request({"prompt_token_ids": ids}, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    req = e.requests[rid]
    curve = []
    while e.has_unfinished_requests():
        e.step()
        if not req.is_finished:
            curve.append((req.num_computed_tokens, e.kv_bytes_in_use()))
    return curve


LLAMA_KV = r"""
import json, sys
from llama_cpp import Llama
cfg = json.loads(sys.stdin.read())
Llama(cfg["gguf"], n_ctx=cfg["n_ctx"], n_threads=1, flash_attn=True, verbose=True, swa_full=cfg["swa_full"])
"""

LLAMA_SPEED = r"""
import json, sys, time
from llama_cpp import Llama
cfg = json.loads(sys.stdin.read())
llm = Llama(cfg["gguf"], n_ctx=512, n_threads=cfg["threads"], flash_attn=True, verbose=False)
times = []
for _ in range(cfg["runs"]):
    llm.reset(); llm.eval(cfg["ids"])
    tok = cfg["ids"][-1]
    t0 = time.perf_counter()
    for _ in range(cfg["new"]):
        llm.eval([tok])
    times.append(time.perf_counter() - t0)
times.sort()
print(json.dumps({"b1_tok_s": cfg["new"] / times[len(times) // 2]}))
"""


def llama_kv_bytes(python: str, n_ctx: int, swa_full: bool | None) -> int | None:
    """llama.cpp's KV buffers for a context of n_ctx cells, summed from its log ("CPU KV buffer size")."""
    p = subprocess.run([python, "-c", LLAMA_KV], input=json.dumps(
        {"gguf": str(resolve_model(MODEL).path), "n_ctx": n_ctx, "swa_full": swa_full}), capture_output=True, text=True)
    sizes = re.findall(r"KV buffer size =\s*([\d.]+) MiB", p.stderr)
    return int(sum(float(s) for s in sizes) * 2**20) if p.returncode == 0 and sizes else None


def llama_speed(python: str, ids: list[int], new: int, runs: int) -> float | None:
    p = subprocess.run([python, "-c", LLAMA_SPEED], capture_output=True, text=True, input=json.dumps(
        {"gguf": str(resolve_model(MODEL).path), "ids": ids, "new": new, "runs": runs,
         "threads": torch.get_num_threads()}))
    return json.loads(p.stdout.strip().splitlines()[-1])["b1_tok_s"] if p.returncode == 0 else None


def kvserve_speed(ids_list: list[list[int]], new: int, runs: int) -> float:
    """(new - 1) decode tokens per request over the time after the first token, as for HF below."""
    llm = LLM(MODEL, quantization=None, max_model_len=1024, enable_prefix_caching=False, max_num_seqs=len(ids_list))
    prompts = [{"prompt_token_ids": i} for i in ids_list]
    run = lambda n: llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),  # noqa: E731
                                 use_tqdm=False)
    run(2)  # warm-up
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(1)
        t1 = time.perf_counter()
        run(new)
        t2 = time.perf_counter()
        rates.append(len(ids_list) * (new - 1) / ((t2 - t1) - (t1 - t0)))
    return median(rates)


def hf_speed(ids_list: list[list[int]], new: int, runs: int, dtype: torch.dtype) -> float:
    """HF generate: (new - 1) decode tokens per request over the time after the first token."""
    model, _ = load_hf(resolve_model(MODEL), dtype)
    x = torch.tensor(ids_list)  # equal lengths: no padding
    rates = []
    with torch.no_grad():
        model.generate(x, max_new_tokens=2, do_sample=False)
        for _ in range(runs):
            t0 = time.perf_counter()
            model.generate(x, max_new_tokens=1, do_sample=False)
            t1 = time.perf_counter()
            model.generate(x, max_new_tokens=new, do_sample=False, min_new_tokens=new)
            t2 = time.perf_counter()
            rates.append(len(ids_list) * (new - 1) / ((t2 - t1) - (t1 - t0)))
    return median(rates)


def plot(path: Path, curves: dict[str, list], llama: dict[str, int | None], dtype: str) -> None:
    """KV MiB against tokens in the cache; llama.cpp's up-front allocations as flat dashed lines."""
    series = {("kvserve (sliding groups give blocks back)" if name == "sliding" else "full-attention cache"):
              ([n for n, _ in c], [b / 2**20 for _, b in c]) for name, c in curves.items()}
    xs = [n for n, _ in curves["sliding"]]
    styles = {}
    for label, b in llama.items():
        if b:
            name = f"{label}, allocated at n_ctx"
            series[name] = ([xs[0], xs[-1]], [b / 2**20] * 2)
            styles[name] = {"linestyle": "--", "marker": ""}
    save_line_plot(path, series, title=f"Gemma 3 270M KV memory ({dtype})", xlabel="tokens in the cache",
                   ylabel="KV MiB", styles=styles)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=8192, help="prompt tokens of the memory run")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--llama-python", default=str(ROOT / ".venv-llama" / "bin" / "python"))
    p.add_argument("--out", default=str(RESULTS_DIR / "sliding_window.json"))
    args = p.parse_args()
    info = cpu_info()
    print(format_cpu_info(info), flush=True)
    t_start = time.perf_counter()

    llm_tok = LLM(MODEL, quantization=None, max_model_len=64, num_kv_blocks=64).get_tokenizer()
    ids = llm_tok.encode(corpus_text()[: args.length * 8])[: args.length]
    curves = {}
    for drop in (True, False):
        t0 = time.perf_counter()
        curves["sliding" if drop else "full"] = memory_curve(ids, args.new_tokens, drop)
        print(f"  memory curve, {'sliding groups give blocks back' if drop else 'every block kept'}: "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    ours, full = dict(curves["sliding"]), dict(curves["full"])
    marks = [n for n in (512, 1024, 2048, 4096, 8192) if n in ours and n in full]
    llama = {}
    if Path(args.llama_python).exists():
        for label, swa_full in (("llama.cpp (swa_full, the default)", None), ("llama.cpp (swa_full=False)", False)):
            llama[label] = llama_kv_bytes(args.llama_python, args.length + args.new_tokens, swa_full)
    mib = lambda b: f"{b / 2**20:.1f}" if b is not None else "-"  # noqa: E731
    rows = [[n, mib(ours[n]), mib(full[n]), f"{ours[n] / full[n]:.3f}x"] + [mib(v) for v in llama.values()] for n in marks]
    # the last step: decoding past the prompt (the prefill rows above include the chunk in flight, whose
    # queries still need up to 511 older positions: a sliding group then holds W + 512 tokens' blocks)
    (n_end, ours_end), (_, full_end) = curves["sliding"][-1], curves["full"][-1]
    rows.append([f"{n_end} (decoding)", mib(ours_end), mib(full_end), f"{ours_end / full_end:.3f}x"]
                + [mib(v) for v in llama.values()])
    print(format_table(["tokens", "kvserve MiB", "full attention MiB", "ratio"] + [f"{k} MiB" for k in llama], rows))

    # speed
    prompts = [ids[i * 64 : (i + 1) * 64] for i in range(16)]
    dtype = LLM(MODEL, quantization=None, max_model_len=64, num_kv_blocks=64).engine.dtype
    speed = {"kvserve_b1": kvserve_speed(prompts[:1], 64, args.runs),
             "kvserve_b16": kvserve_speed(prompts, 128, args.runs),
             "hf_b1": hf_speed(prompts[:1], 64, args.runs, dtype),
             "hf_b16": hf_speed(prompts, 128, args.runs, dtype)}
    if Path(args.llama_python).exists():
        speed["llama_b1"] = llama_speed(args.llama_python, prompts[0], 64, args.runs)
    print(format_table(["figure", "tok/s"], [[k, f"{v:.1f}" if v else "-"] for k, v in speed.items()]))
    print(f"kvserve / HF: b1 {speed['kvserve_b1'] / speed['hf_b1']:.2f}x, b16 {speed['kvserve_b16'] / speed['hf_b16']:.2f}x"
          + (f"; kvserve / llama.cpp b1 {speed['kvserve_b1'] / speed['llama_b1']:.2f}x" if speed.get("llama_b1") else ""))

    out = save_json(args.out, {"benchmark": "sliding_window", "time": now_iso(), "command": command_line(),
                               "settings": settings_of(args), "cpu": info, "model": MODEL, "dtype": str(dtype),
                               "memory": {k: [list(x) for x in v] for k, v in curves.items()},
                               "memory_at": {str(n): {"kvserve": ours[n], "full_attention": full[n]} for n in marks},
                               "memory_decoding": {"tokens": n_end, "kvserve": ours_end, "full_attention": full_end,
                                                   "ratio": ours_end / full_end},
                               "llama_cpp_kv_bytes": llama, "speed": speed,
                               "seconds": time.perf_counter() - t_start})
    plot(Path(args.out).with_suffix(".png"), curves, llama, str(dtype))
    print(f"benchmark time: {time.perf_counter() - t_start:.0f} s\nJSON: {out}")


if __name__ == "__main__":
    main()
