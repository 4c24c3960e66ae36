"""Mixture of experts against a dense model with the same active parameters (issue 21), in one run.

Two random-init models built with HF transformers and saved as HF folders (beside SmolLM2's tokenizer,
so both share its 49,152-token vocabulary and LM head):

- MoE: Mixtral-style, 8 layers, hidden 512, 8 query / 4 KV heads, 8 experts of width W, top-2;
- dense: Llama with the same attention and one MLP of width 2W: the same parameters per token.

Routing decides how many experts a batched step must read, so the MoE runs twice:

- "router as built": the random router on this random model's hidden states. They share a large
  common direction, so most tokens pick the same few experts (~3 of 8 touched per layer at batch 16);
- "balanced": each token's k experts drawn at random (weights still from the router's softmax), the
  load a trained MoE's balancing loss aims for (~7.8 of 8 touched at batch 16), as vLLM's MoE kernel
  benchmarks do with random top-k ids. The target is judged on this one.

Measured, for all, in kvserve (dtype auto):

1. decode tok/s at batch 1 (a 64-token prompt, 64 new tokens; decode steps only);
2. decode tok/s at batch 16 (16 such requests; the steps where all 16 decode);
3. throughput: 32 prompts x 256 tokens, 64 new tokens each, through ``LLM.generate`` (tokens in + out / s).

Medians of --runs runs, MoE and dense alternating. Also HF transformers' batch-1 decode of both (its
MoE block loops over experts in Python, as ours does, but with a one-hot mask per layer), as the peer.
The MoE cost per active parameter is (seconds per token / active parameters) over the dense model's.

Beside it, the floor that memory traffic sets: weight bytes one decode step reads (attention, LM head and
every expert that got a token; the dense model reads all of its weights) over the dense model's. A batch-16
step of a model this size is bound by reading its weights, so a MoE whose batch touches nearly every
expert cannot cost less per active parameter than this ratio, whatever its expert kernel does.

    .venv/bin/python benchmarks/bench_moe.py            # ~4 min on 2 cores
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS_DIR, command_line, cpu_info, format_cpu_info, format_table, median, now_iso,  # noqa: E402
                    prompt_ids, save_json, save_line_plot, settings_of)

from kvserve import LLM, SamplingParams  # noqa: E402
from kvserve.models import moe as moe_mod  # noqa: E402
from kvserve.models.loader import load_tokenizer, resolve_model  # noqa: E402

ROUTE = moe_mod.MoE.route
TOUCHED: list[tuple[int, int]] = []  # (tokens, experts that got any) per MoE call


def routing(balanced: bool) -> None:
    """Install the routing for the next runs, counting the experts each call touches."""
    gen = torch.Generator().manual_seed(0)

    def route(self, x):
        if balanced:  # as many ops as the real routing: scores, softmax, top k (of random scores), normalize
            probs = (x.float() @ self.router.t()).softmax(dim=-1)
            experts = torch.rand(probs.shape, generator=gen).topk(self.top_k, dim=-1).indices
            weights = probs.gather(1, experts)
            weights = weights / weights.sum(dim=-1, keepdim=True)
        else:
            experts, weights = ROUTE(self, x)
        TOUCHED.append((x.shape[0], len(set(experts.flatten().tolist()))))
        return experts, weights

    moe_mod.MoE.route = route

ATTN = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
            max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.02)


def build(kind: str, width: int, vocab: int, folder: Path, tokenizer):
    """Save a random-init model folder; returns the HF model too."""
    import transformers as T

    torch.manual_seed(0)
    if kind == "moe":
        model = T.MixtralForCausalLM(T.MixtralConfig(vocab_size=vocab, intermediate_size=width, num_local_experts=8,
                                                     num_experts_per_tok=2, **ATTN))
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.gate.weight.normal_(0.0, 0.5)
    else:
        model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=vocab, intermediate_size=2 * width, **ATTN))
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def decode_rate(llm: LLM, prompts: list[list[int]], new: int) -> float:
    """Decode tok/s over the steps in which every request decodes (prefills and the tail excluded)."""
    e = llm.engine
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    rids = [e.add_request({"prompt_token_ids": p}, params) for p in prompts]
    reqs = [e.requests[r] for r in rids]
    while not all(len(r.output_token_ids) >= 1 for r in reqs):
        e.step()
    t0, n0 = time.perf_counter(), sum(len(r.output_token_ids) for r in reqs)
    while all(not r.is_finished for r in reqs):
        e.step()
    n1 = sum(len(r.output_token_ids) for r in reqs)
    dt = time.perf_counter() - t0
    while e.has_unfinished_requests():
        e.step()
    return (n1 - n0) / dt


def throughput(llm: LLM, prompts: list[list[int]], new: int) -> float:
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    dt = time.perf_counter() - t0
    return sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outs) / dt


def hf_decode_rate(model, prompt: list[int], new: int, dtype: torch.dtype) -> float:
    """HF generate, batch 1: (new - 1) tokens over (time for new tokens - time for 1 token)."""
    model = model.to(dtype)
    ids = torch.tensor([prompt])
    times = []
    with torch.no_grad():
        for n in (1, new):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            times.append(time.perf_counter() - t0)
    return (new - 1) / (times[1] - times[0])


def step_bytes(cfg, touched: float, elem: int) -> float:
    """Weight bytes one decode step reads when ``touched`` experts per MoE layer got a token."""
    per_expert = 3 * cfg.hidden_size * cfg.expert_size
    idle = (cfg.num_experts - touched) * per_expert * sum(cfg.is_moe(i) for i in range(cfg.num_layers))
    return (cfg.num_params() - idle) * elem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=768, help="each expert's width; the dense MLP is twice it")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default=str(RESULTS_DIR / "moe.json"))
    args = ap.parse_args()
    info = cpu_info()
    print(format_cpu_info(info))
    tok = load_tokenizer(resolve_model("smollm2-135m"))
    tmp = Path(tempfile.mkdtemp(prefix="kvserve-moe-"))
    hf, llms, active, cfgs = {}, {}, {}, {}
    for kind in ("moe", "dense"):
        hf[kind] = build(kind, args.width, len(tok), tmp / kind, tok)
        llms[kind] = LLM(str(tmp / kind), quantization=None, dtype=args.dtype, max_model_len=1024, kv_cache_memory="1GiB",
                         max_num_seqs=32, max_num_batched_tokens=512, enable_prefix_caching=False)
        cfg = llms[kind].engine.model_config
        active[kind] = cfg.num_params(active=True)
        cfgs[kind] = cfg
        print(f"{kind}: {cfg.num_params() / 1e6:.1f}M parameters, {active[kind] / 1e6:.1f}M active per token")
    llms = {"moe (balanced)": llms["moe"], "moe (router as built)": llms["moe"], "dense": llms["dense"]}
    active = {k: active[k.split()[0]] for k in llms}
    dtype = llms["dense"].engine.model.dtype
    p64 = [prompt_ids(tok, 64 + i) for i in range(16)]
    p256 = [prompt_ids(tok, 256 + i) for i in range(32)]
    res: dict[str, dict[str, list[float]]] = {k: {"b1": [], "b16": [], "throughput": []} for k in llms}
    touched: dict[str, dict[int, list[int]]] = {k: {} for k in llms}
    for run in range(args.runs):
        for kind, llm in llms.items():
            routing(balanced="balanced" in kind)
            TOUCHED.clear()
            res[kind]["b1"].append(decode_rate(llm, p64[:1], 64))
            res[kind]["b16"].append(decode_rate(llm, p64, 64))
            res[kind]["throughput"].append(throughput(llm, p256, 64))
            for t, n in TOUCHED:
                touched[kind].setdefault(t, []).append(n)
            print(f"run {run + 1} {kind}: b1 {res[kind]['b1'][-1]:.1f}, b16 {res[kind]['b16'][-1]:.1f} tok/s, "
                  f"throughput {res[kind]['throughput'][-1]:.0f} tok/s", flush=True)
    moe_mod.MoE.route = ROUTE
    hf_b1 = {kind: hf_decode_rate(hf[kind], p64[0], 32, dtype) for kind in hf}  # HF's own router
    med = {k: {m: median(v) for m, v in d.items()} for k, d in res.items()}
    # cost per active parameter: (1 / rate) / active, MoE over dense
    cost = {k: {m: (med["dense"][m] / med[k][m]) * (active["dense"] / active[k]) for m in ("b1", "b16", "throughput")}
            for k in llms if k != "dense"}
    mean_touched = {k: {t: sum(v) / len(v) for t, v in d.items() if t in (1, 16)} for k, d in touched.items() if d}
    elem = torch.empty((), dtype=dtype).element_size()
    # bytes per batch-16 step, and their ratio to the dense model's: the memory floor of the cost ratio
    floor = {k: step_bytes(cfgs["moe"], mean_touched[k][16], elem) / step_bytes(cfgs["dense"], 0, elem)
             for k in cost}
    rows = [[kind, f"{active[kind] / 1e6:.1f}M", f"{med[kind]['b1']:.1f}", f"{med[kind]['b16']:.1f}",
             f"{med[kind]['throughput']:.0f}", f"{mean_touched.get(kind, {}).get(16, 0):.1f}" if kind != "dense" else ""]
            for kind in llms]
    for k, c in cost.items():
        rows.append([f"{k}: cost / active param vs dense", "", f"{c['b1']:.2f}x", f"{c['b16']:.2f}x",
                     f"{c['throughput']:.2f}x", ""])
        rows.append([f"{k}: weight bytes / b16 step vs dense (floor)", "", "", f"{floor[k]:.2f}x", "", ""])
    print(format_table(["model", "active params", "decode b1 tok/s", "decode b16 tok/s", "throughput tok/s",
                        "experts touched / layer at b16"], rows))
    print(format_table(["HF transformers", "decode b1 tok/s"],
                       [[k, f"{v:.1f}"] for k, v in hf_b1.items()]
                       + [["MoE cost / active param vs dense", f"{(hf_b1['dense'] / hf_b1['moe']) * (active['dense'] / active['moe (balanced)']):.2f}x"]]))
    save_json(args.out, {"date": now_iso(), "command": command_line(), "settings": settings_of(args), "cpu": info,
                         "dtype": str(dtype), "active_params": active, "runs": res, "median": med, "hf_b1": hf_b1,
                         "experts_touched": mean_touched, "moe_cost_per_active_param": cost,
                         "b16_weight_bytes_ratio_floor": floor,
                         "target": "<= 1.5x at batch 16 (balanced routing)"})
    c = cost["moe (balanced)"]
    save_line_plot(Path(args.out).with_suffix(".png"),
                   {kind: ([1, 16], [med[kind]["b1"], med[kind]["b16"]]) for kind in llms},
                   title=f"MoE (8 experts, top-2) vs dense, same active parameters ({str(dtype).removeprefix('torch.')})",
                   xlabel="batch (decoding requests)", ylabel="decode tok/s", logx=True, logy=True,
                   note=f"{info['cpu_model']}; balanced MoE cost per active param vs dense: b1 {c['b1']:.2f}x, "
                        f"b16 {c['b16']:.2f}x (bytes floor {floor['moe (balanced)']:.2f}x), throughput {c['throughput']:.2f}x")


if __name__ == "__main__":
    main()
