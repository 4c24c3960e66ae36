"""One stream, batch 1 (issue 16): what a person running ``make run`` or ``kvserve chat`` sees.

Same GGUF (SmolLM2-135M-Instruct, Q4_1 layers and a Q8_0 embedding/LM head), same thread count, in one
run: a 128-token and a 1,024-token prompt of real text, 128 generated tokens (greedy, no early stop),
median of ``--repeats`` (default 5) per system:

- kvserve in each weight setting (``--kvserve``): ``default`` (what ``make run`` uses:
  ``quantization="auto"``, int4 for this Q4_1 file on the CPU), ``none`` (the float weights in the
  dtype ``auto`` picks), ``fp32``, ``int8`` (weight-only, Q8_0's blocks), ``w8a8`` (8-bit activations too), ``int4`` (4-bit codes + scale
  and zero per 32 weights: Q4_1's 5 bits, LM head int8). Timed on the engine's own steps: TTFT is the prefill
  step that samples the first token; each later step is one token.
- llama.cpp (llama-cpp-python in its own venv, ``make bench-llama``): its default, and with flash
  attention. TTFT is ``eval`` of the prompt plus the first sample; each later token is one ``eval``.
- HF transformers (``generate``, the same dtype as kvserve's default, from the same GGUF), timed by a
  logits processor that runs once per token.

Columns: TTFT, decode tok/s, ms per token, weight bytes read per token (the matrices a step
multiplies: every layer and the LM head, at the setting's bytes per weight, scales included), and the
share of the memory-bandwidth limit that reaches (bandwidth / bytes per token, with the read
bandwidth of this machine measured in the same run).

    .venv/bin/python benchmarks/bench_single_stream.py             # ~6 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (LLAMA_NO_EXTRA_BUFTS, RESULTS_DIR, command_line, cpu_info, format_cpu_info,  # noqa: E402
                    format_table, llama_extra_bufts_work, llama_system_info, load_hf, now_iso, prompt_ids, pyplot, save_json,
                    settings_of)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"

# bytes per weight of the layers' matrices and of the LM head, scales included
BYTES_PER_WEIGHT = {
    "bf16": (2.0, 2.0), "fp32": (4.0, 4.0),
    "int8": (1 + 2 / 32, 1 + 2 / 32),  # Q8_0's layout: 8 bits + a 16-bit scale per 32 weights
    "w8a8": (1 + 2 / 32, 1 + 2 / 32),  # int8's codes (of the rotated weights); its LM head int8
    "w8a8-channel": (1.0, 1.0),  # + one scale per row; its down_proj, in the model dtype, is not counted
    "int4": (0.5 + 4 / 32, 1 + 2 / 32),  # 4 bits + a 16-bit scale and zero per 32 weights; LM head int8
    # llama.cpp: the GGUF's own bytes (gguf_matrix_bytes): for SmolLM2 Q4_1 layers (16 bytes of codes + fp16
    # d and m per 32) and a Q8_0 head (32 + fp16 d)
}


def gguf_matrix_bytes(path: str) -> tuple[int, int]:
    """(bytes of the layers' matrices, bytes of the LM head) as stored in a GGUF file: what llama.cpp reads
    per decode step. The head is ``output.weight``, or the tied ``token_embd.weight``."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(path).tensors}
    layers = sum(int(t.n_bytes) for name, t in tensors.items() if name.startswith("blk.") and len(t.shape) == 2)
    head = tensors.get("output.weight") or tensors["token_embd.weight"]
    return layers, int(head.n_bytes)


def read_bandwidth_gbs() -> float:
    """This machine's read bandwidth: the best of 5 sums over a 1 GiB tensor (all threads)."""
    x = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def matrix_params(cfg) -> tuple[int, int]:
    """(parameters of the layers' matrices, parameters of the LM head): what one decode step reads."""
    per_layer = cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * cfg.hidden_size \
        + 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_layers * per_layer, cfg.vocab_size * cfg.hidden_size


def run_kvserve(setting: str, prompts: dict[int, list[int]], new: int, repeats: int) -> dict:
    from kvserve import LLM, SamplingParams

    kw = {"default": {}, "fp32": {"dtype": "float32", "quantization": "none"}}.get(setting, {"quantization": setting})
    llm = LLM(MODEL, max_model_len=2048, enable_prefix_caching=False, **kw)
    e = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    dtype = str(e.dtype).replace("torch.", "")
    # what a decode step reads: the resolved weight setting ("default" is whatever "auto" chose here)
    out = {"dtype": dtype, "quantization": e.quantization, "quantization_reason": e.quantization_reason,
           "weights": e.quantization or {"bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)}
    for n, ids in prompts.items():
        runs = []
        for rep in range(repeats + 1):  # the first is a warm-up
            e.add_request({"prompt_token_ids": ids}, sp)
            t = time.perf_counter()
            e.step()
            ttft = time.perf_counter() - t
            steps = []
            while e.has_unfinished_requests():
                t = time.perf_counter()
                e.step()
                steps.append(time.perf_counter() - t)
            if rep:
                runs.append({"ttft_s": ttft, "ms_per_token": 1e3 * statistics.median(steps)})
        out[n] = _summary(runs)
    llm.shutdown()
    return out


def _summary(runs: list[dict]) -> dict:
    ttft = statistics.median(r["ttft_s"] for r in runs)
    ms = statistics.median(r["ms_per_token"] for r in runs)
    return {"ttft_ms": 1e3 * ttft, "ms_per_token": ms, "decode_tok_s": 1e3 / ms, "runs": runs}


LLAMA_SCRIPT = r"""
import json, statistics, sys, time
from llama_cpp import Llama
a = json.loads(sys.argv[1])
if not a["extra_bufts"]:
    exec(a["no_extra_bufts"])
out = {}
for fa in (False, True):
    llm = Llama(model_path=a["gguf"], n_ctx=2048, n_threads=a["threads"], n_threads_batch=a["threads"],
                n_batch=2048, flash_attn=fa, verbose=False)
    res = {}
    for n, ids in a["prompts"].items():
        runs = []
        for rep in range(a["repeats"] + 1):
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids)
            tok = llm.sample(temp=0.0)
            ttft = time.perf_counter() - t
            steps = []
            for _ in range(a["new"] - 1):
                t = time.perf_counter()
                llm.eval([tok])
                tok = llm.sample(temp=0.0)
                steps.append(time.perf_counter() - t)
            if rep:
                runs.append({"ttft_s": ttft, "ms_per_token": 1e3 * statistics.median(steps)})
        res[n] = runs
    out["flash_attn" if fa else "default"] = res
    del llm
print("JSON" + json.dumps(out))
"""


def run_llama(python: str, prompts: dict[int, list[int]], new: int, repeats: int, threads: int) -> tuple[dict, bool]:
    """llama.cpp's rows, and whether its extra buffer types ran: on where a probe survives them
    (``common.llama_extra_bufts_work``; on the Sapphire Rapids machine its AMX kernel segfaults)."""
    from kvserve.models.loader import resolve_model

    gguf = str(resolve_model(MODEL).path)
    extra = llama_extra_bufts_work(python, gguf)
    args = {"gguf": gguf, "prompts": {str(k): v for k, v in prompts.items()}, "new": new, "repeats": repeats,
            "threads": threads, "extra_bufts": extra, "no_extra_bufts": LLAMA_NO_EXTRA_BUFTS}
    proc = subprocess.run([python, "-c", LLAMA_SCRIPT, json.dumps(args)], capture_output=True, text=True, timeout=1800)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("JSON")), None)
    if line is None:
        raise RuntimeError(f"llama.cpp failed (exit {proc.returncode}, extra_bufts={extra}):\n{proc.stderr[-3000:]}")
    raw = json.loads(line[4:])
    return {mode: {int(n): _summary(runs) for n, runs in res.items()} for mode, res in raw.items()}, extra


def run_hf(dtype: torch.dtype, prompts: dict[int, list[int]], new: int, repeats: int) -> dict:
    from transformers import LogitsProcessor, LogitsProcessorList

    from kvserve.models.loader import resolve_model

    model, _ = load_hf(resolve_model(MODEL), dtype)

    class Clock(LogitsProcessor):  # called once per generated token, after that token's forward
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    out = {}
    for n, ids in prompts.items():
        runs = []
        x = torch.tensor([ids])
        for rep in range(repeats + 1):
            clock = Clock()
            t = time.perf_counter()
            with torch.inference_mode():
                model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, logits_processor=LogitsProcessorList([clock]), pad_token_id=0)
            if rep:
                gaps = [b - a for a, b in zip(clock.times, clock.times[1:])]
                runs.append({"ttft_s": clock.times[0] - t, "ms_per_token": 1e3 * statistics.median(gaps)})
        out[n] = _summary(runs)
    return out


def main() -> None:
    global MODEL  # --model: the functions above read it
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kvserve", default="default,none,fp32,int8,w8a8,int4",
                    help="kvserve weight settings: default (quantization='auto', what make run uses), none (the "
                         "model dtype), fp32, or a quantization")
    ap.add_argument("--model", default=MODEL, help="a GGUF model llama.cpp can read too (smollm2-135m, gemma3-270m)")
    ap.add_argument("--prompt-lens", default="128,1024")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--llama-python", default=str(ROOT / ".venv-llama" / "bin" / "python"))
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default=str(RESULTS_DIR / "single_stream.json"))
    args = ap.parse_args()
    MODEL = args.model
    info = cpu_info()
    print(format_cpu_info(info), flush=True)
    bw = read_bandwidth_gbs()
    print(f"read bandwidth: {bw:.1f} GB/s", flush=True)

    from kvserve.engine.llm_engine import resolve_device, resolve_dtype
    from kvserve.models.loader import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(MODEL))
    prompts = {n: prompt_ids(tok, n) for n in map(int, args.prompt_lens.split(","))}
    default_dtype = resolve_dtype("auto", resolve_device(None))
    results: dict[str, dict] = {}
    for s in args.kvserve.split(","):
        results[f"kvserve {s}"] = run_kvserve(s, prompts, args.new_tokens, args.repeats)
        print(f"kvserve {s}: " + ", ".join(f"{n}: {r['decode_tok_s']:.1f} tok/s, TTFT {r['ttft_ms']:.0f} ms"
                                         for n, r in results[f"kvserve {s}"].items() if isinstance(n, int)), flush=True)
    llama_extra_bufts, llama_isa = None, None
    if Path(args.llama_python).exists():
        llama_isa = llama_system_info(args.llama_python)
        print(f"llama.cpp build: {llama_isa}", flush=True)
        llama, llama_extra_bufts = run_llama(args.llama_python, prompts, args.new_tokens, args.repeats,
                                             torch.get_num_threads())
        for mode, res in llama.items():
            results[f"llama.cpp {mode}"] = res
            print(f"llama.cpp {mode}: " + ", ".join(f"{n}: {r['decode_tok_s']:.1f} tok/s, TTFT {r['ttft_ms']:.0f} ms"
                                                  for n, r in res.items()), flush=True)
    else:
        print(f"llama-cpp-python not found at {args.llama_python} (make bench-llama): no llama.cpp rows", file=sys.stderr)
    if not args.no_hf:
        results["HF transformers"] = run_hf(default_dtype, prompts, args.new_tokens, args.repeats)

    from kvserve.models.loader import load_model_config

    layer_params, head_params = matrix_params(load_model_config(resolve_model(MODEL)))
    llama_bytes = sum(gguf_matrix_bytes(str(resolve_model(MODEL).path)))  # one parse for both llama.cpp rows
    default_kind = "bf16" if default_dtype == torch.bfloat16 else "fp32"
    rows = []
    for name, res in results.items():
        kind = res.get("weights") or default_kind  # HF: the default dtype
        if name.startswith("llama.cpp"):
            wbytes = llama_bytes
        else:
            per_layer, per_head = BYTES_PER_WEIGHT[kind]
            wbytes = layer_params * per_layer + head_params * per_head
        for n in prompts:
            r = res[n]
            r["weight_bytes_per_token"] = wbytes
            r["bandwidth_share"] = r["decode_tok_s"] * wbytes / (bw * 1e9)
            rows.append([name, n, f"{r['ttft_ms']:.1f}", f"{r['decode_tok_s']:.1f}", f"{r['ms_per_token']:.2f}",
                         f"{wbytes / 1e6:.0f} MB", f"{r['bandwidth_share']:.0%}"])
    print(format_table(["system", "prompt", "TTFT ms", "decode tok/s", "ms/token", "weights read/token",
                        "of bandwidth limit"], rows))
    ratios = {}
    for mode in ("default", "flash_attn"):
        ref = results.get(f"llama.cpp {mode}")
        if ref is None:
            continue
        for name, res in results.items():
            if name.startswith("kvserve"):
                for n in prompts:
                    ratios[f"{name} / llama.cpp {mode} @ {n}"] = {
                        "decode": res[n]["decode_tok_s"] / ref[n]["decode_tok_s"],
                        "ttft": res[n]["ttft_ms"] / ref[n]["ttft_ms"]}
    for k, v in ratios.items():
        print(f"{k}: decode {v['decode']:.2f}x, TTFT {v['ttft']:.2f}x")
    save_json(args.out, {"date": now_iso(), "command": command_line(), "settings": settings_of(args), "cpu": info,
                         "read_bandwidth_gbs": bw, "default_dtype": str(default_dtype), "results": results,
                         "llama_cpp_extra_buffer_types": llama_extra_bufts, "llama_cpp_system_info": llama_isa,
                         "ratios": ratios})
    plt = pyplot()
    if plt is not None:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
        names = list(results)
        for k, n in enumerate(prompts):
            xs = [i + 0.4 * k for i in range(len(names))]
            a1.bar(xs, [results[s][n]["decode_tok_s"] for s in names], 0.4, label=f"{n}-token prompt")
            a2.bar(xs, [results[s][n]["ttft_ms"] for s in names], 0.4, label=f"{n}-token prompt")
        for a, yl in ((a1, "decode tok/s (batch 1)"), (a2, "TTFT (ms)")):
            a.set_xticks([i + 0.2 for i in range(len(names))], names, rotation=35, ha="right", fontsize=8)
            a.set_ylabel(yl)
            a.grid(alpha=0.3, axis="y")
            a.legend(fontsize=8)
        fig.suptitle(f"{MODEL}, one stream, {torch.get_num_threads()} threads, {info['cpu_model']}")
        fig.tight_layout()
        fig.savefig(Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
