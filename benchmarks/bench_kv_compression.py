"""Importance-based KV compression (issue 18): kvserve's presses beside NVIDIA kvpress on HF transformers,
the same model (SmolLM2-135M-Instruct, fp32), prompts and ratios, in one run.

Prompts: passkey retrieval ("needle in a haystack"): filler from ``pydoc_data.topics`` of 1k, 2k and
4k tokens, a 5-digit pass key stated at 20 %, 50 % and 80 % of it, and the question at the end. Each
system compresses the whole prompt after its prefill (kvpress: ``with press(model)`` around the
prefill; kvserve: ``SamplingParams(kv_compression=...)``), then answers greedily (16 tokens).

Per method (snapkv, streaming_llm, knorm, tova) and ratio (0.25, 0.5, 0.75), for both systems:

- needle: the share of prompts whose answer contains the key;
- agreement: the share whose 16-token answer equals the same system's uncompressed answer;
- KL: of the next-token distribution at the second answer token (after the same first token, which
  the uncompressed prefill decides) from the uncompressed one, mean over prompts;
- and, kvserve against kvpress directly: the share of prompts whose compressed answers are identical.

Memory and speed (kvserve, in the engine's default dtype): KV bytes per 2k-token request after
compression, and 32 requests of 2k tokens through one 512 MiB pool, generating 32 tokens each (a
prefill-bound load: compression cannot speed up the prefill it follows) and 256 each (decode matters):
the most running at once and the throughput (prompt + generated tokens per second), uncompressed and
with each method at 0.5. ``--parts throughput`` runs this part alone (no kvpress needed).

    make kvpress-venv                                    # once: kvpress in its own venv
    .venv/bin/python benchmarks/bench_kv_compression.py  # ~25 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS_DIR, command_line, cpu_info, format_cpu_info, format_table, now_iso, pyplot,  # noqa: E402
                    save_json, settings_of)

from kvserve import LLM, SamplingParams  # noqa: E402
from kvserve.models.loader import load_tokenizer, resolve_model  # noqa: E402
from kvserve.ppl import corpus_text  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("snapkv", "streaming_llm", "knorm", "tova")
RATIOS = (0.25, 0.5, 0.75)
NEW = 16


def needle_prompts(tok, lengths: list[int], depths: list[float]) -> list[tuple[list[int], str]]:
    """(token ids, key) per length and depth: filler, the key sentence at ``depth``, the question."""
    text = corpus_text()
    filler = tok.encode(text[:200000], add_special_tokens=False)
    question = tok.encode("\n\nWhat is the pass key? The pass key is", add_special_tokens=False)
    out, k = [], 0
    for n in lengths:
        for d in depths:
            key = str(41000 + 7919 * k)[-5:]
            needle = tok.encode(f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n", add_special_tokens=False)
            body = n - len(needle) - len(question)
            start = (k * 3001) % (len(filler) - body)  # a different stretch of filler for each prompt
            hay = filler[start : start + body]
            at = int(body * d)
            out.append((hay[:at] + needle + hay[at:] + question, key))
            k += 1
    return out


def run_kvserve(llm: LLM, prompts, press: str | None) -> list[dict]:
    """Greedy answers, one prompt at a time, and the log-probabilities at the second answer token
    (read from the sampler's input: the engine's own logits)."""
    e = llm.engine
    seen = {}
    sample = e.sampler

    def recording(logits, requests):
        for row, r in zip(logits, requests):
            if len(r.output_token_ids) == 1:
                seen[r.request_id] = torch.log_softmax(row.double(), -1)
        return sample(logits, requests)

    e.sampler = recording
    out = []
    try:
        for ids, _ in prompts:
            t0 = time.perf_counter()
            params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, kv_compression=press)
            rid = e.add_request({"prompt_token_ids": ids}, params)
            while e.has_unfinished_requests():
                done = [o for o in e.step() if o.finished]
            out.append({"answer": list(done[0].outputs[0].token_ids), "lp2": seen.pop(rid),
                        "seconds": time.perf_counter() - t0, "metrics": dict(done[0].metrics)})
    finally:
        e.sampler = sample
    return out


def throughput(press: str | None, ids: list[list[int]], pool: str, new: int) -> dict:
    llm = LLM("smollm2-135m", quantization=None, max_model_len=4096, kv_cache_memory=pool, max_num_seqs=32,
              max_num_batched_tokens=2048, enable_prefix_caching=False)
    e = llm.engine
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True, kv_compression=press)
    for p in ids:
        e.add_request({"prompt_token_ids": p}, params)
    t0, peak, tokens = time.perf_counter(), 0, 0
    while e.has_unfinished_requests():
        for o in e.step():
            if o.finished:
                tokens += len(o.prompt_token_ids) + len(o.outputs[0].token_ids)
        peak = max(peak, len(e.scheduler.running))
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens_per_s": tokens / dt, "peak_running": peak, "dtype": str(e.dtype).replace("torch.", ""),
            "preemptions": e.scheduler.num_preemptions, "kv_bytes_per_token": e.kv_spec.bytes_per_token,
            "tokens_after_compression": e.stats["kv_compression_tokens_after"] / max(1, e.stats["kv_compressions"])}


def quality(tok, src, prompts) -> tuple[dict, dict]:
    """kvpress (in its venv) and kvserve on the same passkey prompts: needle, agreement, KL per press."""
    presses = [f"{m}:{r}" for m in METHODS for r in RATIOS]
    with tempfile.TemporaryDirectory() as d:
        spec, res = Path(d) / "in.json", Path(d) / "out.json"
        spec.write_text(json.dumps({"mode": "bench", "model_dir": str(src.path.parent), "gguf_file": src.path.name,
                                    "prompts": [p for p, _ in prompts], "new_tokens": NEW,
                                    "presses": [[p.split(":")[0], float(p.split(":")[1])] for p in presses]}))
        t0 = time.perf_counter()
        subprocess.run([str(ROOT / ".venv-kvpress/bin/python"), str(ROOT / "benchmarks/kvpress_reference.py"),
                        str(spec), str(res)], check=True, stderr=subprocess.DEVNULL)
        ref = json.loads(res.read_text())
        print(f"kvpress {ref['kvpress_version']} (transformers {ref['transformers_version']}): "
              f"{time.perf_counter() - t0:.0f} s", flush=True)

    llm = LLM("smollm2-135m", quantization=None, dtype="float32", max_model_len=8192, kv_cache_memory="1GiB", enable_prefix_caching=False,
              max_num_batched_tokens=512)
    ours = {"full": run_kvserve(llm, prompts, None)}
    for p in presses:
        ours[p] = run_kvserve(llm, prompts, p)
        print(f"kvserve {p}: {sum(r['seconds'] for r in ours[p]):.0f} s", flush=True)

    dec = lambda ids: tok.decode(ids)  # noqa: E731
    rows, table = [], {}
    full_ours = ours["full"]
    full_ref = [r["full"] for r in ref["results"]]
    for label, system in (("full", None), *((p, p) for p in presses)):
        o = ours[label]
        found = sum(key in dec(r["answer"]) for r, (_, key) in zip(o, prompts)) / len(prompts)
        entry = {"kvserve_needle": found}
        if system is not None:
            k = [r[system] for r in ref["results"]]
            entry |= {
                "kvpress_needle": sum(key in dec(r["answer"]) for r, (_, key) in zip(k, prompts)) / len(prompts),
                "kvserve_agreement": sum(a["answer"] == b["answer"] for a, b in zip(o, full_ours)) / len(prompts),
                "kvpress_agreement": sum(a["answer"] == b["answer"] for a, b in zip(k, full_ref)) / len(prompts),
                "kvserve_kl": sum(float((f["lp2"].exp() * (f["lp2"] - c["lp2"])).sum()) for f, c in zip(full_ours, o)) / len(prompts),
                "kvpress_kl": sum(r["kl"] for r in k) / len(prompts),
                "same_answer_as_kvpress": sum(a["answer"] == b["answer"] for a, b in zip(o, k)) / len(prompts),
                "kept_tokens": [r["metrics"].get("kv_compression_tokens_after") for r in o],
            }
        else:
            entry["kvpress_needle"] = sum(key in dec(r["answer"]) for r, (_, key) in zip(full_ref, prompts)) / len(prompts)
            entry["same_answer_as_kvpress"] = sum(a["answer"] == b["answer"] for a, b in zip(o, full_ref)) / len(prompts)
        table[label] = entry
        pct = lambda x: f"{100 * x:.0f} %"  # noqa: E731
        rows.append([label, pct(entry["kvserve_needle"]), pct(entry["kvpress_needle"]),
                     pct(entry["kvserve_agreement"]) if system else "", pct(entry["kvpress_agreement"]) if system else "",
                     f"{entry['kvserve_kl']:.4f}" if system else "", f"{entry['kvpress_kl']:.4f}" if system else "",
                     pct(entry["same_answer_as_kvpress"])])
    print(format_table(["press", "needle kvserve", "needle kvpress", "agreement kvserve", "agreement kvpress",
                        "KL kvserve", "KL kvpress", "same answer as kvpress"], rows), flush=True)
    return table, {"kvpress_version": ref["kvpress_version"], "transformers_version_kvpress": ref["transformers_version"]}


def speed(tok, requests: int, pool: str, news: list[int], repeats: int = 1) -> dict:
    """32 x 2k-token prompts through one pool, uncompressed and with each method at 0.5, per output length;
    ``repeats`` rounds (every setting once per round), the median throughput of each."""
    text = tok.encode(corpus_text()[:400000], add_special_tokens=False)
    long = [text[i * 2048 : (i + 1) * 2048] for i in range(requests)]
    out = {}
    for new in news:
        runs: dict[str, list[dict]] = {}
        for _ in range(repeats):
            for press in (None, *(f"{m}:0.5" for m in METHODS)):
                r = throughput(press, long, pool, new)
                runs.setdefault(press or "none", []).append(r)
                print(f"{new} new tokens, {press}: {r['seconds']:.0f} s", flush=True)
        tput = {}
        for k, rs in runs.items():
            mid = sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2]
            tput[k] = {**mid, "tokens_per_s_runs": [r["tokens_per_s"] for r in rs]}
        base = tput["none"]
        for v in tput.values():
            v["concurrency_vs_none"] = v["peak_running"] / base["peak_running"]
            v["throughput_vs_none"] = v["tokens_per_s"] / base["tokens_per_s"]
        print(f"{requests} x 2048-token prompts, {new} generated tokens each, {pool} pool ({base['dtype']}):")
        print(format_table(["press", "most running at once", "vs none", "KV tokens per request after prefill",
                            "throughput tok/s", "vs none", "preemptions"],
                           [[k, v["peak_running"], f"{v['concurrency_vs_none']:.2f}x",
                             f"{v['tokens_after_compression']:.0f}" if k != "none" else "2048",
                             f"{v['tokens_per_s']:.0f}", f"{v['throughput_vs_none']:.2f}x", v["preemptions"]]
                            for k, v in tput.items()]), flush=True)
        out[str(new)] = tput
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="quality,throughput", help="quality (needs .venv-kvpress), throughput")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--depths", default="0.2,0.5,0.8")
    ap.add_argument("--requests", type=int, default=32, help="throughput part: requests of 2k tokens")
    ap.add_argument("--pool", default="512MiB", help="throughput part: the KV pool")
    ap.add_argument("--new-tokens", default="32,256", help="throughput part: tokens generated per request")
    ap.add_argument("--repeats", type=int, default=1, help="throughput part: rounds; the median of each setting")
    ap.add_argument("--out", default=str(RESULTS_DIR / "kv_compression.json"))
    args = ap.parse_args()
    parts = args.parts.split(",")
    info = cpu_info()
    print(format_cpu_info(info), flush=True)
    src = resolve_model("smollm2-135m")
    tok = load_tokenizer(src)
    prompts = needle_prompts(tok, [int(x) for x in args.lengths.split(",")], [float(x) for x in args.depths.split(",")])
    table, versions = quality(tok, src, prompts) if "quality" in parts else (None, {})
    news = [int(x) for x in args.new_tokens.split(",")]
    tput = speed(tok, args.requests, args.pool, news, args.repeats) if "throughput" in parts else None

    targets = {}
    if table is not None:
        gaps = [abs(e[f"kvserve_{q}"] - e[f"kvpress_{q}"]) for e in table.values() if "kvpress_agreement" in e
                for q in ("needle", "agreement")]
        targets["quality within 1 point of kvpress"] = max(gaps) <= 0.01
    if tput is not None:
        at = tput[str(max(news))]
        targets["ratio 0.5: >= 1.8x concurrent"] = min(v["concurrency_vs_none"] for k, v in at.items() if k != "none") >= 1.8
        targets[f"throughput >= 1.5x uncompressed ({max(news)} generated)"] = max(
            v["throughput_vs_none"] for k, v in at.items() if k != "none") >= 1.5
    print("targets:", targets)
    save_json(args.out, {"date": now_iso(), "command": command_line(), "settings": settings_of(args), "cpu": info,
                         **versions, "prompts": [{"tokens": len(p), "key": k} for p, k in prompts], "quality": table,
                         "throughput": tput, "targets": targets})
    plt = pyplot()
    if plt is None:
        return
    panels = (["agreement", "kl"] if table else []) + (["speed"] if tput else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), dpi=110, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "speed":
            labels = list(tput[str(news[0])])
            width = 0.8 / len(news)
            for i, new in enumerate(news):
                ax.bar([x + i * width for x in range(len(labels))], [tput[str(new)][k]["throughput_vs_none"] for k in labels],
                       width, label=f"throughput, {new} generated")
            ax.plot(range(len(labels)), [tput[str(news[0])][k]["concurrency_vs_none"] for k in labels], "ko", label="running at once")
            ax.axhline(1.5, color="gray", ls=":", lw=1)
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
            ax.set(ylabel="vs uncompressed", title=f"{args.requests} x 2k prompts in a {args.pool} pool")
            ax.legend(fontsize=7)
            continue
        for m in METHODS:
            for sysname, style in (("kvserve", "-o"), ("kvpress", "--x")):
                ax.plot(RATIOS, [table[f"{m}:{r}"][f"{sysname}_{panel}"] for r in RATIOS], style, label=f"{m} ({sysname})")
        ax.set(xlabel="compression ratio (fraction removed)",
               ylabel="answers equal to the uncompressed one" if panel == "agreement" else "KL at the 2nd answer token",
               title=panel, yscale="linear" if panel == "agreement" else "log")
        if panel == "agreement":
            ax.legend(fontsize=6)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    fig.suptitle(f"KV compression, SmolLM2-135M: kvserve vs kvpress {versions.get('kvpress_version', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
