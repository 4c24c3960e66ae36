"""The sink_window policy (StreamingLLM): attention sinks + a window of recent tokens, positions counted
within the cache, kept keys re-rotated when blocks leave the middle. Generation runs past max_model_len
in bounded memory."""
from __future__ import annotations

import pytest
import torch

from kvserve import SamplingParams
from tests.conftest import make_llm, run_in_steps

SINK = dict(kv_cache_policy="sink_window", num_sink_tokens=4, sink_window=128, max_model_len=256,
            max_num_batched_tokens=64, enable_prefix_caching=False)


def test_rope_shift_equals_keys_computed_at_the_new_positions():
    """shift_keys(blocks, delta): keys written at positions p read as keys computed at p - delta, in
    every layer, and only in the blocks named."""
    llm = make_llm(num_kv_blocks=8, max_model_len=112)
    m, kv = llm.engine.model, llm.engine.kv_cache
    cfg = m.cfg
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim, generator=g)
    pos = torch.arange(80, 96)  # inside the RoPE table (max_model_len)
    for i in range(cfg.num_layers):
        kv.blocks(i)[0][3] = m.rotary[i].rotate_(raw[i].clone(), pos)
        kv.blocks(i)[0][4] = 7.0
    m.shift_keys(kv, [3], 48)
    for i in range(cfg.num_layers):
        want = m.rotary[i].rotate_(raw[i].clone(), pos - 48)
        torch.testing.assert_close(kv.blocks(i)[0][3], want, atol=1e-4, rtol=1e-4)  # two rotations: table rounding
        assert bool((kv.blocks(i)[0][4] == 7.0).all())


def test_short_generation_equals_the_full_policy():
    """Until the window first slides nothing is dropped or shifted: the tokens equal the full cache's."""
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    prompt = "The history of the lighthouse is"
    full = make_llm(max_model_len=256).generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    sink = make_llm(**SINK).generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert sink == full


def test_generation_runs_three_times_max_model_len_in_flat_memory():
    llm = make_llm(num_kv_blocks=40, **SINK)
    # 3 x max_model_len in all: a 500-token prompt (chunked prefill, past the context already) and
    # 268 generated tokens, so both phases slide the window
    n_new = 3 * 256 - 500
    prompt = llm.get_tokenizer().encode("Once upon a time, in a small village by the sea, " * 60)[:500]
    out, most = run_in_steps(llm, {"prompt_token_ids": prompt},
                             SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == n_new
    assert out.outputs[0].finish_reason == "length"
    # 1 sink block + the window's 8 blocks + a 64-token prompt chunk's 4 + the block being filled
    assert most <= 1 + 128 // 16 + 64 // 16 + 1
    assert out.outputs[0].text.isprintable() or "\n" in out.outputs[0].text


def test_sinks_keep_perplexity_near_the_full_cache_and_the_window_alone_does_not():
    """StreamingLLM's claim in miniature: teacher-forced over 700 tokens of English (positions past
    max_model_len 256), sinks + a 128-token window stay within 10 % of a full cache's perplexity; the
    same window without sinks does not."""
    import math

    from kvserve.ppl import corpus_text, perplexity

    tok = make_llm(max_model_len=64, num_kv_blocks=8).get_tokenizer()
    ids = tok.encode(corpus_text()[:6000])[:700]
    full = perplexity(make_llm(max_model_len=1024, max_num_batched_tokens=64), ids, window=700).perplexity
    sinks = perplexity(make_llm(**SINK), ids, window=700).perplexity
    alone = perplexity(make_llm(**{**SINK, "num_sink_tokens": 0}), ids, window=700).perplexity
    # measured: full 16.80, sinks + window 17.77 (+5.7 %), the window alone 32.60 (+94 %)
    assert math.isfinite(sinks) and sinks < 1.10 * full, (sinks, full)
    assert alone > 1.3 * full, (alone, full)


def test_a_prompt_longer_than_max_model_len_is_accepted_under_sink_window():
    llm = make_llm(**SINK)
    ids = list(range(1000, 1000 + 600))  # 600 tokens > max_model_len 256
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="maximum context length"):
        make_llm(max_model_len=256).generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=4), use_tqdm=False)


def test_sink_window_is_validated():
    with pytest.raises(ValueError, match="sink_window >= block_size"):
        make_llm(kv_cache_policy="sink_window", enable_prefix_caching=False)
    with pytest.raises(ValueError, match="prefix caching"):
        make_llm(kv_cache_policy="sink_window", sink_window=128, enable_prefix_caching=True)
    with pytest.raises(ValueError, match="must fit max_model_len"):
        make_llm(kv_cache_policy="sink_window", sink_window=480, max_model_len=512, enable_prefix_caching=False)


# ---- context_overflow (the full policy, per request) ----

def test_context_shift_generates_past_max_model_len_in_bounded_memory():
    """llama.cpp's context shift: at max_model_len (128) keep the first block, drop the older half of
    the rest, re-rotate, continue; 300 tokens in at most 8 blocks. Before the first shift the tokens
    equal the default policy's, and the prefix tree never sees a shifting request's blocks."""
    llm = make_llm(max_model_len=128, max_num_batched_tokens=64)
    prompt = "Once upon a time, in a small village by the sea,"
    shift = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True, context_overflow="shift")
    out, most = run_in_steps(llm, prompt, shift)
    assert len(out.outputs[0].token_ids) == 300
    assert most <= 128 // 16 and llm.engine.kv_manager.prefix_cache.num_blocks == 0
    plain = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=300, ignore_eos=True), use_tqdm=False)[0]
    assert plain.outputs[0].finish_reason == "length" and len(plain.outputs[0].token_ids) < 128
    n = len(plain.outputs[0].token_ids)
    assert out.outputs[0].token_ids[:n] == plain.outputs[0].token_ids


def test_context_truncate_keeps_the_prompts_last_tokens():
    llm = make_llm(max_model_len=128)
    ids = list(range(1000, 1200))  # 200 tokens > 128
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, context_overflow="truncate")
    out = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
    want = llm.generate({"prompt_token_ids": ids[-120:]}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)[0]
    assert out.prompt_token_ids == ids[-120:] and out.outputs[0].token_ids == want.outputs[0].token_ids
    with pytest.raises(ValueError, match="context_overflow"):
        SamplingParams(context_overflow="wrap")
