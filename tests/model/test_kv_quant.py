"""Quantized KV cache (int8, int4, fp8) in the engine, and prompt_logprobs, the tool that measures it.

The reference is the same engine with an unquantized (fp32) cache and HF transformers for the logprobs.
Agreement is teacher-forced: both caches score the same token sequence, and we count the positions
where their most likely next token is the same."""
from __future__ import annotations

import pytest
import torch

from kvserve import SamplingParams
from kvserve.ppl import corpus_text, perplexity
from tests.conftest import PROMPTS, make_llm

QUANT = ["int8", "fp8_e4m3", "fp8_e5m2", "int4"]
# Teacher-forced top-1 agreement with the fp32 cache, and the perplexity ratio allowed. Measured on this
# text (one scale word per token and KV head; int4 and fp8 Hadamard-rotated): int8 0.983 / +0.27 %,
# fp8_e4m3 0.972 / -0.29 %, fp8_e5m2 0.942 / +2.6 %, int4 (q5 keys, q4 values) 0.934 / +1.9 % (decode
# 0.958). int8, fp8_e4m3 and int4 are held to the bars (97 %, 97 %, 90 %; perplexity +0.5 %,
# +1 %, +3 %); fp8_e5m2 has none, so its bounds only guard against getting worse.
MIN_AGREEMENT = {"int8": 0.97, "fp8_e4m3": 0.97, "fp8_e5m2": 0.92, "int4": 0.90}
MAX_PPL_RATIO = {"int8": 1.005, "fp8_e4m3": 1.01, "fp8_e5m2": 1.04, "int4": 1.03}
N_TOKENS = 640  # of pydoc_data.topics, scored in 64-token chunks: most reads come from the cache


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def corpus_ids(tokenizer):
    return tokenizer.encode(corpus_text()[:20000])[:N_TOKENS]


@pytest.fixture(scope="module")
def reference_llm():
    return make_llm(max_num_batched_tokens=64, max_model_len=1024, num_kv_blocks=128)


@pytest.fixture(scope="module")
def reference(corpus_ids, reference_llm):
    """The fp32 cache's perplexity and top-1 tokens over the corpus."""
    return perplexity(reference_llm, corpus_ids, window=N_TOKENS, top1=True)


def test_prompt_logprobs_equal_hf(hf_model, tokenizer):
    """Every prompt token's log-probability (and the top 3) equals HF's, through a chunked prefill."""
    llm = make_llm(max_num_batched_tokens=16, num_kv_blocks=64)
    text = PROMPTS[2] + " " + PROMPTS[4]
    ids = tokenizer.encode(text)
    out = llm.generate(text, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3), use_tqdm=False)[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), dim=-1)
    lps = out.prompt_logprobs
    assert len(lps) == len(ids) > 16 and lps[0] is None
    for i in range(1, len(ids)):
        entry = lps[i]
        assert ids[i] in entry and len(entry) in (3, 4)
        for tok, lp in entry.items():
            assert abs(lp - ref[i - 1, tok].item()) < 1e-4
        assert set(torch.topk(ref[i - 1], 3).indices.tolist()) <= set(entry)
    # without prompt_logprobs the output carries none; with them, the prefix cache is bypassed
    assert llm.generate(text, greedy(1), use_tqdm=False)[0].prompt_logprobs is None
    again = llm.generate(text, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    assert again.num_cached_tokens == 0 and [list(e)[0] for e in again.prompt_logprobs[1:]] == ids[1:]


@pytest.mark.parametrize("kind", QUANT)
def test_quantized_cache_agrees_with_fp32(kind, corpus_ids, reference, reference_llm):
    llm = make_llm(kv_cache_dtype=kind, max_num_batched_tokens=64, max_model_len=1024, num_kv_blocks=128)
    assert llm.engine.kv_spec.quant == kind and llm.engine.attn_backend.name == "cpu-paged"
    r = perplexity(llm, corpus_ids, window=N_TOKENS, top1=True)
    agree = sum(a == b for a, b in zip(r.top1, reference.top1)) / len(r.top1)
    assert agree >= MIN_AGREEMENT[kind], (kind, agree)
    assert r.perplexity < reference.perplexity * MAX_PPL_RATIO[kind], (r.perplexity, reference.perplexity)

    # decode through the C++ kernel on quantized blocks: the fp32 cache, teacher-forced on the quantized
    # engine's own greedy tokens, picks the same token at nearly MIN_AGREEMENT of the steps (4 x 48 steps:
    # a sample 3x smaller than the one above, so 2 points looser; fp8_e4m3 measured 184 / 192 = 0.958)
    prompts = [corpus_ids[i : i + 100] for i in (0, 150, 300, 450)]
    gens = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(48),
                                                          use_tqdm=False)]
    scored = reference_llm.generate([{"prompt_token_ids": p + g} for p, g in zip(prompts, gens)],
                                    SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    same = total = 0
    for p, g, out in zip(prompts, gens, scored):
        best = [max(e, key=e.get) for e in out.prompt_logprobs[len(p):]]  # entry i: token i given those before
        assert len(best) == len(g)
        same += sum(a == b for a, b in zip(best, g))
        total += len(g)
    assert same / total >= MIN_AGREEMENT[kind] - 0.02, (kind, same / total)
    llm.engine.kv_manager.check_integrity()


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8_e4m3"])
def test_decode_kernel_equals_dequantize_then_sdpa_in_the_engine(kind, monkeypatch):
    """The same quantized cache read two ways during decode: in place by the C++ kernel, and
    dequantized then SDPA (CUDA's path). They differ by float rounding only, but a new token's K/V is
    quantized again (in the same step, for its own attention), and a rounding flip there grows. So: the
    first decode step's logprobs equal to 1e-3 (observed: <= 1e-5), each stream's first 8 tokens equal,
    and their logprobs within 0.05 (observed: up to 0.025; 0.11 by step 30). A stream may part earlier
    only at a near-tie, where rounding alone picks the token: on Sapphire Rapids one fp8 stream's two
    best tokens at step 4 are 0.001 apart in both runs."""
    from kvserve.attn import SDPABackend

    llm = make_llm(kv_cache_dtype=kind, num_kv_blocks=128, enable_prefix_caching=False)  # same prefill both runs
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=2)
    fast = [o.outputs[0] for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
    assert llm.engine.runner.attn.name == "cpu-paged"
    monkeypatch.setattr(llm.engine.runner, "attn", SDPABackend(llm.engine.kv_cache))
    slow = [o.outputs[0] for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
    for a, b in zip(fast, slow):
        same = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
        if same < 8:  # only at a near-tie: each run had the other's token within 0.01 of its own
            x, y = a.token_ids[same], b.token_ids[same]
            gaps = [abs(lp[x] - lp[y]) if x in lp and y in lp else float("inf") for lp in (a.logprobs[same], b.logprobs[same])]
            assert max(gaps) < 0.01, (kind, same, gaps)
        diffs = [abs(la[t] - lb[t]) for t, la, lb in zip(a.token_ids[:same], a.logprobs, b.logprobs)]
        # diffs[0]: the prefill's token, no decode yet
        assert diffs[1] < 1e-3 and max(diffs[:8]) < 0.05, diffs


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_scales_follow_blocks_through_preemption_and_prefix_hits(mode):
    """int8 codes and their scales move together: copy-on-write of a prefix hit, swap out and in,
    recompute. Each path gives the tokens of the same int8 engine with room to spare."""
    prompts = [p + " and then" * i for i, p in enumerate(PROMPTS * 2)]
    roomy = make_llm(kv_cache_dtype="int8", num_kv_blocks=256, max_model_len=128)
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, greedy(24), use_tqdm=False)]
    tight = make_llm(kv_cache_dtype="int8", num_kv_blocks=12, max_model_len=128, preemption_mode=mode)
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, greedy(24), use_tqdm=False)]
    assert tight.cache_stats()["preemptions"] > 0
    assert got == want
    # a repeated prompt: its cached blocks (and the copied partial last block) hold the same codes and scales
    again = tight.generate(prompts[3], greedy(24), use_tqdm=False)[0]
    assert again.num_cached_tokens == len(again.prompt_token_ids) - 1
    assert again.outputs[0].token_ids == want[3]
    tight.engine.kv_manager.check_integrity()


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_estimate_equals_the_bytes_allocated(kind):
    from kvserve.cli import estimate

    llm = make_llm(kv_cache_dtype=kind, num_kv_blocks=4 * 32 + 1, max_num_seqs=4)
    est = estimate("smollm2-135m", seq_len=512, batch=4, dtype="float32", kv_cache="paged", kv_cache_dtype=kind)
    assert est["allocated_bytes"] == llm.engine.kv_cache.nbytes
    # codes + one fp16 scale per token and KV head, for K and V, over 30 layers and 3 KV heads
    # (int4: K in q5, 40 bytes of codes, and V in q4, 32; each row with its 2-byte scale word)
    k_and_v = {"int8": 2 * (64 + 2), "int4": (40 + 2) + (32 + 2), "fp8": 2 * (64 + 2)}[kind]
    assert est["bytes_per_token"] == llm.engine.kv_spec.bytes_per_token == 30 * 3 * k_and_v
    assert llm.cache_stats()["kv_cache_dtype"] == ("fp8_e4m3" if kind == "fp8" else kind)


def test_same_memory_holds_more_blocks():
    blocks = {kind: make_llm(kv_cache_dtype=kind, kv_cache_memory="64MiB", dtype="bfloat16").engine.kv_cache.num_blocks
              for kind in ("auto", "int8", "int4")}
    assert blocks["int8"] / blocks["auto"] == pytest.approx(128 / 66, rel=0.01)
    assert blocks["int4"] / blocks["auto"] == pytest.approx(256 / 76, rel=0.01)


def test_unknown_kv_cache_dtype_lists_the_choices():
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of \['auto'.*'int8', 'int4', 'fp8_e4m3'"):
        make_llm(kv_cache_dtype="int2")
