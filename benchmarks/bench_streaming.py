"""StreamingLLM's figure on SmolLM2 (issue 15): perplexity per 1k-token segment over a 20k-token text,
for the full cache (memory grows with the text, defined up to the model's 8k context), the window alone
and attention sinks + the window (both in a memory of about 1k tokens).

The text is ``pydoc_data.topics`` (Python's standard library), tokenized and cut to ``--tokens``. Each
configuration scores it as one request, teacher-forced (``prompt_logprobs=0``: the log-probability of
every next token), prefilled in ``--chunk``-token chunks, so every token is predicted from what the
cache holds at that point: everything (full), the last ~``--window`` tokens (window alone), or the
first ``--sinks`` tokens plus the last ~``--window`` (sinks + window). Positions count within the cache
for the two bounded ones (the sink_window policy re-rotates kept keys as blocks leave the middle).

    .venv/bin/python benchmarks/bench_streaming.py            # ~6 min on 2 cores
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS_DIR, command_line, cpu_info, format_cpu_info, format_table, now_iso,  # noqa: E402
                    save_json, save_line_plot, settings_of)

from kvserve import LLM, SamplingParams  # noqa: E402
from kvserve.ppl import corpus_text  # noqa: E402


def token_nll(llm: LLM, ids: list[int]) -> list[float]:
    """-log p(token i | tokens before it, as the cache holds them), for i = 1 .. len - 1."""
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    return [-out.prompt_logprobs[i][ids[i]] for i in range(1, len(ids))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=20480)
    p.add_argument("--segment", type=int, default=1024)
    p.add_argument("--window", type=int, default=1008, help="recent tokens kept (sinks + window ~ 1k)")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--out", default=str(RESULTS_DIR / "streaming.json"))
    args = p.parse_args()
    info = cpu_info()
    print(format_cpu_info(info), flush=True)
    t_start = time.perf_counter()
    base = LLM(args.model, quantization=None, max_model_len=64, num_kv_blocks=8)
    ids = base.get_tokenizer().encode(corpus_text())[: args.tokens]
    context = base.engine.model_config.max_position_embeddings
    del base
    common = dict(max_num_batched_tokens=args.chunk, enable_prefix_caching=False)
    bounded = dict(kv_cache_policy="sink_window", sink_window=args.window, max_model_len=2048, **common)
    configs = {
        "full cache": (LLM(args.model, quantization=None, max_model_len=context, **common), ids[: context - 1]),
        "window alone": (LLM(args.model, quantization=None, num_sink_tokens=0, **bounded), ids),
        "sinks + window": (LLM(args.model, quantization=None, num_sink_tokens=args.sinks, **bounded), ids),
    }
    nll = {}
    for name, (llm, text) in configs.items():
        t0 = time.perf_counter()
        nll[name] = token_nll(llm, text)
        print(f"  {name}: {len(text)} tokens scored in {time.perf_counter() - t0:.0f} s", flush=True)
        del llm
    configs.clear()
    n_seg = args.tokens // args.segment
    table, per_segment = [], {k: [] for k in nll}
    for s in range(n_seg):
        row = [f"{s * args.segment // 1024}k-{(s + 1) * args.segment // 1024}k"]
        for name, v in nll.items():
            part = v[s * args.segment : (s + 1) * args.segment]
            ppl = math.exp(sum(part) / len(part)) if len(part) == args.segment else None
            per_segment[name].append(ppl)
            row.append(f"{ppl:.2f}" if ppl else "-")
        f, sw = per_segment["full cache"][s], per_segment["sinks + window"][s]
        row.append(f"{sw / f - 1:+.1%}" if f and sw else "-")
        table.append(row)
    print(format_table(["segment"] + list(nll) + ["sinks+window vs full"], table))
    worst = max((sw / f - 1 for f, sw in zip(per_segment["full cache"], per_segment["sinks + window"]) if f and sw),
                default=None)
    print(f"worst segment, sinks + window vs full: {worst:+.1%} (target: within +10 %)")
    out = save_json(args.out, {"benchmark": "streaming", "time": now_iso(), "command": command_line(),
                               "settings": settings_of(args), "cpu": info, "per_segment_ppl": per_segment,
                               "worst_vs_full": worst, "seconds": time.perf_counter() - t_start})
    xs = [(s + 0.5) * args.segment / 1024 for s in range(n_seg)]
    save_line_plot(Path(args.out).with_suffix(".png"), {name: (xs, ys) for name, ys in per_segment.items()},
                   title=f"StreamingLLM on {args.model}: window {args.window}, {args.sinks} sinks",
                   xlabel="position in the text (k tokens)", ylabel="perplexity of the segment", logy=True,
                   note=f"the full cache is defined up to the model's context ({context} tokens)")
    print(f"benchmark time: {time.perf_counter() - t_start:.0f} s\nJSON: {out}")


if __name__ == "__main__":
    main()
