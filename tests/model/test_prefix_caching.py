"""Prefix caching must not change a single greedy token: shared system prompts, multi-turn chats,
and a pool small enough that the tree must evict."""
from __future__ import annotations

from kvserve import SamplingParams
from tests.conftest import make_llm

SYSTEM = ("You are a meticulous assistant for a small bakery. You answer questions about bread, pastry, "
          "opening hours and prices. Always answer in two sentences and be friendly. ") * 2
QUESTIONS = ["What time do you open?", "Do you sell croissants?", "How much is a baguette?",
             "Is the rye bread vegan?", "Can I order a birthday cake?", "Do you have gluten-free bread?"]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def convs():
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_shared_system_prompt_hits_and_matches_no_cache(llm_paged):
    off = make_llm(kv_cache="paged", num_kv_blocks=256, enable_prefix_caching=False)
    reference = tokens(off.chat(convs(), GREEDY))
    first = llm_paged.chat(convs()[:1], GREEDY)
    rest = llm_paged.chat(convs()[1:], GREEDY)
    assert tokens(first + rest) == reference
    assert all(o.num_cached_tokens >= 64 for o in rest)  # the system prompt came from the cache
    again = llm_paged.chat(convs(), GREEDY)  # everything seen before: near-full hits
    assert tokens(again) == reference
    assert all(o.num_cached_tokens >= len(o.prompt_token_ids) - 16 for o in again)
    stats = llm_paged.cache_stats()
    assert stats["prefix_cache_hits"] > 0 and stats["blocks_used"] == 0
    llm_paged.engine.kv_manager.check_integrity()


def run_chat(llm, turns=4):
    """Multi-turn: each turn appends the model's answer and a new question."""
    conv = [{"role": "system", "content": SYSTEM}]
    outs = []
    for q in QUESTIONS[:turns]:
        conv.append({"role": "user", "content": q})
        o = llm.chat(conv, GREEDY)[0]
        conv.append({"role": "assistant", "content": o.outputs[0].text})
        outs.append(o)
    return outs


def test_multi_turn_chat_reuses_earlier_turns():
    on = make_llm(kv_cache="paged", num_kv_blocks=256)
    off = make_llm(kv_cache="paged", num_kv_blocks=256, enable_prefix_caching=False)
    with_cache, without = run_chat(on), run_chat(off)
    assert tokens(with_cache) == tokens(without)
    for prev, cur in zip(with_cache, with_cache[1:]):
        # turn N+1 finds at least the whole previous prompt in the cache
        assert cur.num_cached_tokens >= len(prev.prompt_token_ids) // 16 * 16
    on.engine.kv_manager.check_integrity()


def test_eviction_under_a_small_pool_keeps_outputs_identical():
    small = make_llm(kv_cache="paged", num_kv_blocks=24, max_model_len=256)
    ref = make_llm(kv_cache="paged", num_kv_blocks=256, max_model_len=256, enable_prefix_caching=False)
    prompts = [[{"role": "user", "content": f"{q} Please answer briefly."}] for q in QUESTIONS * 2]
    assert tokens(small.chat(prompts, GREEDY)) == tokens(ref.chat(prompts, GREEDY))
    stats = small.cache_stats()
    assert stats["prefix_cache_evicted_blocks"] > 0
    small.engine.kv_manager.check_integrity()


def test_requests_arriving_together_reuse_blocks_computed_moments_before():
    """Blocks enter the tree as soon as they are computed: with a small token budget, requests
    admitted later in the same batch hit the system prompt the first one has just prefilled."""
    llm = make_llm(kv_cache="paged", num_kv_blocks=128, max_num_batched_tokens=64)
    off = make_llm(kv_cache="paged", num_kv_blocks=128, enable_prefix_caching=False)
    outs = llm.chat(convs()[:4], GREEDY)
    assert tokens(outs) == tokens(off.chat(convs()[:4], GREEDY))
    assert outs[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens >= 64 for o in outs[1:])
    llm.engine.kv_manager.check_integrity()


def test_full_hit_copies_the_last_block_and_computes_one_token(llm_paged):
    """A block-aligned prompt seen before hits every block; the last token still runs (it gives the
    logits), in a private copy of the shared last block: 1 token computed, not 16, same greedy output,
    and the tree's block is left as it was."""
    off = make_llm(kv_cache="paged", num_kv_blocks=256, enable_prefix_caching=False)
    e = llm_paged.engine
    bs = e.kv_cache.block_size
    ids = [(i * 37 + 11) % 5000 + 100 for i in range(3 * bs)]  # exactly 3 blocks
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    reference = tokens(off.generate([ids], params, use_tqdm=False))
    first = llm_paged.generate([ids], params, use_tqdm=False)
    tree_block = e.kv_manager.prefix_cache.match_prefix(ids).block_ids[-1]
    before = [t[:, tree_block * bs : (tree_block + 1) * bs].clone() for t in (e.kv_cache.k, e.kv_cache.v)]
    again = llm_paged.generate([ids], params, use_tqdm=False)
    assert again[0].num_cached_tokens == len(ids) - 1
    assert tokens(first) == tokens(again) == reference
    after = [t[:, tree_block * bs : (tree_block + 1) * bs] for t in (e.kv_cache.k, e.kv_cache.v)]
    assert all(bool((a == b).all()) for a, b in zip(after, before))  # the shared block was not written
    e.kv_manager.check_integrity()


def test_repeated_prompt_of_any_length_computes_one_token(llm_paged):
    """The tree keeps a finished request's partial last block too, so a repeated prompt whose length
    is not a multiple of the block size hits all but its last token (copied on write), like a
    block-aligned one, and gives the same greedy tokens."""
    off = make_llm(kv_cache="paged", num_kv_blocks=256, enable_prefix_caching=False)
    bs = llm_paged.engine.kv_cache.block_size
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for extra in (1, 5, bs - 1):
        ids = [(i * 53 + extra) % 5000 + 100 for i in range(2 * bs + extra)]
        reference = tokens(off.generate([ids], params, use_tqdm=False))
        first = llm_paged.generate([ids], params, use_tqdm=False)
        again = llm_paged.generate([ids], params, use_tqdm=False)
        assert again[0].num_cached_tokens == len(ids) - 1
        assert tokens(first) == tokens(again) == reference
        # a longer prompt through the cached partial block uses its tokens too
        longer = llm_paged.generate([ids + [777, 778]], params, use_tqdm=False)
        assert longer[0].num_cached_tokens == len(ids)
        assert tokens(longer) == tokens(off.generate([ids + [777, 778]], params, use_tqdm=False))
    llm_paged.engine.kv_manager.check_integrity()


def test_prompt_logprobs_neither_hits_nor_pins_the_tree():
    """A prompt_logprobs request computes its whole prompt (every position is scored), so it bypasses
    the tree both ways. Fed back, its copy of a cached prefix would branch off the tree's blocks and pin
    them: here the tree's 13 blocks must be evicted for the 250-token request to fit 20 blocks."""
    llm = make_llm(num_kv_blocks=21, max_model_len=256, max_num_batched_tokens=64)
    ids = list(range(1000, 1200))
    llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                 use_tqdm=False)
    assert llm.cache_stats()["blocks_cached"] == 13
    out = llm.generate({"prompt_token_ids": ids + list(range(2000, 2050))},
                       SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), use_tqdm=False)[0]
    assert len(out.prompt_logprobs) == 250 and out.num_cached_tokens == 0
    assert llm.cache_stats()["prefix_cache_evicted_blocks"] > 0 and llm.cache_stats()["blocks_cached"] == 13 - \
        llm.cache_stats()["prefix_cache_evicted_blocks"]
    llm.engine.kv_manager.check_integrity()
