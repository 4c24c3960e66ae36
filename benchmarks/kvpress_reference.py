"""NVIDIA kvpress, the reference for KV compression, on HF transformers: which tokens each press keeps.

kvpress pins transformers < 5.3 and ours is newer, so it runs in its own venv, as llama.cpp does:

    make kvpress-venv                                   # .venv-kvpress: torch (CPU), transformers<5.3, kvpress
    .venv-kvpress/bin/python benchmarks/kvpress_reference.py IN.json OUT.json

IN.json: {"model_dir": ..., "gguf_file": ..., "prompts": [[ids], ...], "presses": [["snapkv", 0.5], ...],
"new_tokens": N}. OUT.json: per prompt and press, the kept positions of every layer and KV head
([layers][heads][n], in position order), from kvpress's own scores and its own top-k
(``ScorerPress.compress``), and the N greedy tokens generated after the compressed prefill (kvpress
compresses only the prefill; decoding continues at the text positions), with kvpress's version. The
model runs in fp32, one prompt at a time, under ``with press(model)``.
"""
from __future__ import annotations

import json
import sys
import time

import torch


def bench(spec: dict) -> dict:
    """``spec["mode"] == "bench"`` (benchmarks/bench_kv_compression.py): per prompt, the uncompressed
    greedy answer and the next-token distribution at the second generated token; per press, its
    greedy answer, the KL divergence of that distribution from the uncompressed one, the top-50 of
    its log-probabilities there (to compare with kvserve's), and the seconds it took."""
    import kvpress
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], gguf_file=spec["gguf_file"], dtype=torch.float32)
    model.eval()
    presses = {"snapkv": kvpress.SnapKVPress, "streaming_llm": kvpress.StreamingLLMPress,
               "knorm": kvpress.KnormPress, "tova": kvpress.TOVAPress}
    n = spec["new_tokens"]

    def run(ids, press):
        """Greedy answer, and log-probs at the second generated token (after the first one is fed)."""
        t0 = time.perf_counter()
        with torch.no_grad():
            ctx = press(model) if press is not None else _null()
            with ctx:
                out = model(torch.tensor([ids]), use_cache=True)  # the press compresses this prefill
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
            answer, lp2 = [tok], None
            pos = len(ids)
            for i in range(n - 1):
                out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True,
                            cache_position=torch.tensor([pos]), position_ids=torch.tensor([[pos]]))
                logits = out.logits[0, -1].double()
                if i == 0:
                    lp2 = torch.log_softmax(logits, -1)
                past, tok, pos = out.past_key_values, int(logits.argmax()), pos + 1
                answer.append(tok)
        return answer, lp2, time.perf_counter() - t0

    results = []
    for ids in spec["prompts"]:
        full, lp_full, t_full = run(ids, None)
        row = {"full": {"answer": full, "seconds": t_full}}
        for name, ratio in spec["presses"]:
            answer, lp, t = run(ids, presses[name](compression_ratio=ratio))
            top = lp.topk(50)
            row[f"{name}:{ratio}"] = {"answer": answer, "seconds": t,
                                      "kl": float((lp_full.exp() * (lp_full - lp)).sum()),
                                      "top50": [top.indices.tolist(), top.values.tolist()]}
        results.append(row)
    return {"results": results}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main() -> None:
    from importlib.metadata import version

    import kvpress
    from kvpress.utils import compute_n_kept
    from transformers import AutoModelForCausalLM

    spec = json.loads(open(sys.argv[1]).read())
    if spec.get("mode") == "bench":
        out = {"kvpress_version": version("kvpress"), "transformers_version": version("transformers"), **bench(spec)}
        open(sys.argv[2], "w").write(json.dumps(out))
        return
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], gguf_file=spec["gguf_file"], dtype=torch.float32)
    model.eval()
    presses = {"snapkv": kvpress.SnapKVPress, "streaming_llm": kvpress.StreamingLLMPress,
               "knorm": kvpress.KnormPress, "tova": kvpress.TOVAPress}
    out = {"kvpress_version": version("kvpress"), "transformers_version": version("transformers"), "results": []}
    for ids in spec["prompts"]:
        row = {}
        for name, ratio in spec["presses"]:
            press = presses[name](compression_ratio=ratio)
            kept: dict[int, list] = {}
            score = press.score

            def recording_score(module, hidden_states, keys, values, attentions, kwargs, score=score, ratio=ratio):
                s = score(module, hidden_states, keys, values, attentions, kwargs)
                n = compute_n_kept(keys.shape[2], ratio)  # what ScorerPress.compress keeps, by its own top-k
                kept[module.layer_idx] = s.topk(n, dim=-1).indices[0].sort(dim=-1).values.tolist()
                return s

            press.score = recording_score
            with torch.no_grad(), press(model):
                gen = model.generate(torch.tensor([ids]), max_new_tokens=spec.get("new_tokens", 1), do_sample=False,
                                     min_new_tokens=spec.get("new_tokens", 1), pad_token_id=0)
            row[f"{name}:{ratio}"] = {"kept": [kept[i] for i in sorted(kept)], "tokens": gen[0, len(ids):].tolist()}
        out["results"].append(row)
    open(sys.argv[2], "w").write(json.dumps(out))


if __name__ == "__main__":
    main()
