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

import torch


def main() -> None:
    from importlib.metadata import version

    import kvpress
    from kvpress.utils import compute_n_kept
    from transformers import AutoModelForCausalLM

    spec = json.loads(open(sys.argv[1]).read())
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
