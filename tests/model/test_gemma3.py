"""Gemma 3 270M, the second model: sliding-window layers (window 512), MQA with head_dim 256, QK-norm,
sandwich norms, GeLU-tanh, scaled embeddings. Against HF transformers fp32 on the same GGUF file, on
prompts shorter and longer than the window (so that the window really cuts).

It is the base model: plain completions, no chat template."""
from __future__ import annotations

import pytest
import torch

from kvserve import SamplingParams
from kvserve.ppl import corpus_text
from tests.conftest import load_hf_model, run_in_steps

WINDOW = 512
SHORT = "The history of the city begins in the"


@pytest.fixture(scope="module")
def gemma_src():
    from kvserve.models.loader import resolve_model

    return resolve_model("gemma3-270m")


@pytest.fixture(scope="module")
def gemma_hf(gemma_src):
    return load_hf_model(gemma_src)


def gemma_llm(**kw):
    from kvserve import LLM

    kw.setdefault("dtype", "float32")
    kw.setdefault("quantization", "none")  # compared with HF on the float weights
    kw.setdefault("max_model_len", 1024)
    kw.setdefault("num_kv_blocks", 400)
    return LLM("gemma3-270m", **kw)


@pytest.fixture(scope="module")
def gemma(gemma_src):
    return gemma_llm()


@pytest.fixture(scope="module")
def long_ids(gemma):
    """~700 tokens of English: past the 512-token window."""
    ids = gemma.get_tokenizer().encode(corpus_text()[:6000])[:700]
    assert len(ids) == 700 and ids[0] == gemma.get_tokenizer().bos_token_id
    return ids


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)


def assert_prompt_logprobs_match(llm, model, ids: list[int], atol: float = 1e-3):
    """Every prompt token's log-probability, and the most likely next token, equal HF's."""
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1),
                       use_tqdm=False)[0]
    ref = hf_logprobs(model, ids)
    ours = torch.tensor([out.prompt_logprobs[i][ids[i]] for i in range(1, len(ids))], dtype=torch.float64)
    theirs = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert (ours - theirs).abs().max().item() < atol, (ours - theirs).abs().max().item()
    # greedy next token after the whole prompt
    assert out.outputs[0].token_ids[0] == int(ref[-1].argmax())
    return out


def test_config_from_gguf(gemma):
    cfg = gemma.engine.model_config
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (18, 4, 1, 256)
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full"] == [5, 11, 17]
    assert cfg.sliding_window == WINDOW and cfg.rope_theta == 1e6 and cfg.rope_local_theta == 1e4
    spec = gemma.engine.kv_spec
    assert [g.layers for g in spec.groups] == [(0, 1, 2), (3, 4, 6), (7, 8, 9), (10, 12, 13), (14, 15, 16), (5, 11, 17)]
    assert [g.spec.window for g in spec.groups] == [WINDOW] * 5 + [None]


def test_short_prompt_matches_hf(gemma, gemma_hf):
    ids = gemma.get_tokenizer().encode(SHORT)
    assert_prompt_logprobs_match(gemma, gemma_hf, ids)


def test_long_prompt_matches_hf_past_the_window(gemma, gemma_hf, long_ids):
    assert_prompt_logprobs_match(gemma, gemma_hf, long_ids)


def test_chunked_prefill_matches_hf_past_the_window(gemma_hf, long_ids):
    """64-token chunks: most chunks' keys come from the cache, and the window cuts inside the cache."""
    assert_prompt_logprobs_match(gemma_llm(max_num_batched_tokens=64), gemma_hf, long_ids)


@pytest.mark.parametrize("n_prompt", [30, 600])
def test_greedy_decode_matches_hf(gemma, gemma_hf, long_ids, n_prompt):
    """Greedy tokens equal HF's generate, decoding across the window edge (30 + 500 is past 512 too
    for the long prompt, every step's window drops a key)."""
    ids = long_ids[:n_prompt]
    n_new = 24
    with torch.no_grad():
        ref = gemma_hf.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False)[0, len(ids):].tolist()
    out = gemma.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True),
                         use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref
    gemma.engine.kv_manager.check_integrity()


def test_batched_decode_of_different_lengths(gemma, long_ids):
    """Requests on both sides of the window, batched: each equals its lone run."""
    prompts = [{"prompt_token_ids": long_ids[:n]} for n in (12, 505, 530, 700)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in gemma.generate(prompts, params, use_tqdm=False)]
    alone = [gemma.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert together == alone
    gemma.engine.kv_manager.check_integrity()


def test_sliding_groups_hold_only_the_window(gemma, long_ids):
    """As one request decodes past the window, each sliding group keeps at most ceil(W / block_size) + 1
    blocks (the rest went back to the pool, their table entries null) while the full group grows."""
    e = gemma.engine
    bs = e.kv_cache.block_size
    cap = -(-WINDOW // bs) + 1
    rid = e.add_request({"prompt_token_ids": long_ids[:480]}, SamplingParams(max_tokens=120, temperature=0, ignore_eos=True))
    live_max, full_max = 0, 0
    while e.has_unfinished_requests():
        e.step()
        kv = e.kv_manager.requests.get(rid)
        if kv is None:
            break
        live = [sum(b != 0 for b in t) for t in kv.tables]
        live_max = max(live_max, *live[:5])
        full_max = max(full_max, live[5])
        e.kv_manager.check_integrity()
    assert live_max <= cap < full_max  # 600 tokens: the full group holds 38 blocks, a sliding one <= 33
    assert e.kv_manager.usage().blocks_used == 0  # what is left is the prefix tree's (evictable)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_past_the_window(mode, long_ids):
    """Two 480-token prompts fit the pool (6 groups x 30 blocks each) but not once both decode past the
    window (5 x 33 sliding + 34 full blocks each): one is preempted (recomputed, or swapped out with its
    null entries and back) and resumed; each request's tokens equal its lone run."""
    prompts = [{"prompt_token_ids": long_ids[i * 10 : i * 10 + 480]} for i in range(2)]
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    want = [gemma_llm().generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    small = gemma_llm(num_kv_blocks=380, max_model_len=600, preemption_mode=mode, enable_prefix_caching=False)
    got = [o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False)]
    assert small.cache_stats()["preemptions"] > 0
    assert got == want
    small.engine.kv_manager.check_integrity()
    assert small.engine.kv_manager.pool.num_used == 0


def test_estimate_counts_the_window(gemma):
    """`kvserve estimate` predicts the engine's pool for a hybrid model: a sliding group holds its window
    plus one prompt chunk (512 tokens), so a 4,096-token sequence needs 256 blocks in the full group
    and ceil((511 + 512) / 16) + 1 = 65 in each of the 5 sliding groups, not 6 x 256."""
    from kvserve.cli import estimate

    est = estimate("gemma3-270m", seq_len=4096, batch=2, dtype="float32", kv_cache="paged")
    assert est["num_blocks"] == 2 * (256 + 5 * 65) + 1
    llm = gemma_llm(num_kv_blocks=est["num_blocks"], max_num_seqs=2, max_model_len=4096)
    assert est["allocated_bytes"] == llm.engine.kv_cache.nbytes
    # the formula: 3 full layers keep 4096 tokens, 15 sliding ones 512; K and V, 1 head of 256, fp32
    assert est["formula_bytes"] == 2 * 2 * 256 * 4 * (3 * 4096 + 15 * 512)



def test_prefix_cache_hits_past_the_window(long_ids):
    """The prefix tree keeps every group's blocks of a cached prefix (a sliding group's too, after they
    left the request's window), so a repeated 700-token prompt, and a second turn that extends the first
    one's prompt and answer, reuse the cache and produce the tokens of a cold engine."""
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    warm = gemma_llm(enable_prefix_caching=True)
    cold = gemma_llm(enable_prefix_caching=False)
    first = warm.generate({"prompt_token_ids": long_ids}, params, use_tqdm=False)[0]
    again = warm.generate({"prompt_token_ids": long_ids}, params, use_tqdm=False)[0]
    assert again.num_cached_tokens == len(long_ids) - 1  # all but the last token, which must run
    turn2 = long_ids + list(first.outputs[0].token_ids) + long_ids[100:140]
    second = warm.generate({"prompt_token_ids": turn2}, params, use_tqdm=False)[0]
    assert second.num_cached_tokens >= len(long_ids) + 15 - 16  # the first turn's whole blocks at least
    want = [cold.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0].outputs[0].token_ids
            for p in (long_ids, turn2)]
    assert [first.outputs[0].token_ids, again.outputs[0].token_ids, second.outputs[0].token_ids] == [want[0], want[0], want[1]]
    warm.engine.kv_manager.check_integrity()
    assert warm.engine.kv_manager.usage().blocks_used == 0


# ---- sink_window and context shift on a hybrid model ----

def test_shift_keys_rotates_each_group_with_its_own_base(gemma):
    """A sliding group's keys re-rotate with RoPE base 10,000, the full group's with 1,000,000: shifted
    keys equal keys computed at the new positions, layer by layer (blocks hold one group's layers)."""
    m, kv = gemma.engine.model, gemma.engine.kv_cache
    cfg = m.cfg
    pos = torch.arange(80, 96)
    g = torch.Generator().manual_seed(0)
    for group in (kv.spec.groups[0], kv.spec.groups[-1]):
        assert (group.spec.window is None) == (group is kv.spec.groups[-1])
        raw = {i: torch.randn(16, cfg.num_kv_heads, cfg.head_dim, generator=g) for i in group.layers}
        for i in group.layers:
            kv.blocks(i)[0][3] = m.rotary[i].rotate_(raw[i].clone(), pos)
        m.shift_keys(kv, [3], 48, group.layers)
        for i in group.layers:
            torch.testing.assert_close(kv.blocks(i)[0][3], m.rotary[i].rotate_(raw[i].clone(), pos - 48),
                                       atol=1e-4, rtol=1e-4)
    kv.blocks(0)[0][3] = 0.0


def test_sink_window_on_gemma_runs_past_max_model_len_in_flat_memory_and_keeps_perplexity(gemma, long_ids):
    """The full layers keep 1 sink block + a 128-token window, and every group drops the same middle
    entries: 700 prompt tokens + 40 generated (~3x max_model_len 256) in <= 6 x 14 blocks. Teacher-forced
    over the 700 tokens, perplexity stays within 10 % of the full cache's."""
    from kvserve.ppl import perplexity

    sink = gemma_llm(kv_cache_policy="sink_window", num_sink_tokens=4, sink_window=128, max_model_len=256,
                     max_num_batched_tokens=64, enable_prefix_caching=False, num_kv_blocks=200)
    out, most = run_in_steps(sink, {"prompt_token_ids": long_ids}, SamplingParams(max_tokens=40, temperature=0,
                                                                                ignore_eos=True))
    tokens = out.outputs[0].token_ids
    # per group: the sink block, the window's 8, a 64-token prompt chunk's 4 and the block being filled
    assert len(tokens) == 40 and most <= 6 * (1 + 128 // 16 + 64 // 16 + 1)
    full = perplexity(gemma, long_ids, window=700).perplexity
    kept = perplexity(sink, long_ids, window=700).perplexity
    assert kept < 1.10 * full, (kept, full)


def test_context_shift_on_gemma_reaches_back_over_given_back_blocks(long_ids):
    """context_overflow="shift" at max_model_len 640: the sliding groups have given back the blocks
    before their 512-token window; after the shift (keep 1 block, drop the older half) their window
    reaches back over those null entries and reads from the first live block. 700 prompt tokens + 40
    generated stay within the pool that one 640-token sequence needs; the first tokens equal those of
    a request that never shifts (the same prompt's last 600 tokens at the same positions is not the
    same text, so only bounds and integrity are asserted past the shift)."""
    llm = gemma_llm(max_model_len=640, max_num_batched_tokens=64, num_kv_blocks=250, enable_prefix_caching=False)
    reached = []

    def watch(kv, request):  # a sliding window (cache positions) that starts before the first live block
        cache_len = request.num_computed_tokens - kv.position_shift
        reached.append(kv.position_shift > 0 and cache_len - WINDOW < kv.num_dropped[0] * 16)

    out, most = run_in_steps(llm, {"prompt_token_ids": long_ids}, SamplingParams(
        max_tokens=40, temperature=0, ignore_eos=True, context_overflow="shift"), watch)
    tokens = out.outputs[0].token_ids
    assert any(reached)
    # the full group's 640 tokens, and per sliding group its window and a 64-token chunk (+ 1 block)
    assert len(tokens) == 40 and most <= 640 // 16 + 5 * (-(-(WINDOW - 1 + 64) // 16) + 1)
    plain = llm.generate({"prompt_token_ids": long_ids[:600]}, SamplingParams(max_tokens=30, temperature=0),
                         use_tqdm=False)[0]
    shifted = llm.generate({"prompt_token_ids": long_ids[:600]}, SamplingParams(max_tokens=30, temperature=0,
                                                                                context_overflow="shift"),
                           use_tqdm=False)[0]
    assert shifted.outputs[0].token_ids == plain.outputs[0].token_ids  # no shift needed: the same tokens
