"""The paged cache and the continuous-batching scheduler, against the contiguous cache and each
prompt run alone (greedy, so every path must give the same tokens)."""
from __future__ import annotations

import pytest

from kvserve import SamplingParams
from tests.conftest import PROMPTS, make_llm

SIXTEEN = [p + " and then" * i for i, p in enumerate(PROMPTS * 4)][:16]  # 5 to ~45 tokens


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def contiguous_16(llm_contiguous):
    return tokens(llm_contiguous.generate(SIXTEEN, greedy(20)))


def test_sixteen_uneven_prompts(llm_paged, contiguous_16):
    assert len({len(llm_paged.get_tokenizer().encode(p)) for p in SIXTEEN}) > 5
    assert tokens(llm_paged.generate(SIXTEEN, greedy(20))) == contiguous_16
    alone = [tokens(llm_paged.generate(p, greedy(20)))[0] for p in SIXTEEN[:4]]
    assert alone == contiguous_16[:4]
    assert llm_paged.cache_stats()["requests_running"] == 0


def test_decode_kernel_and_pytorch_path_agree(llm_paged, contiguous_16, monkeypatch):
    """Batched decodes read the pool through the C++ kernel on CPU; the gather + SDPA path (CUDA's,
    and the fallback) must give the same tokens."""
    from kvserve.attn import SDPABackend, select_backend
    from kvserve.models import cpu_kernels

    e = llm_paged.engine
    assert cpu_kernels.available() and e.runner.attn.name == "cpu-paged"
    monkeypatch.setitem(cpu_kernels._state, "module", None)  # as if the kernel had not built
    assert not cpu_kernels.available()
    backend = select_backend(e.kv_cache, e.model_config.num_heads)
    assert type(backend) is SDPABackend  # what an engine built now would choose
    monkeypatch.setattr(e.runner, "attn", backend)
    assert tokens(llm_paged.generate(SIXTEEN, greedy(20))) == contiguous_16


def test_chunked_prefill_equals_one_shot(contiguous_16):
    llm = make_llm(kv_cache="paged", num_kv_blocks=128, max_num_batched_tokens=32, enable_prefix_caching=False)
    long_prompts = [p * 6 for p in SIXTEEN[:4]]  # 40-90 tokens: every prompt spans several 32-token steps
    chunked = tokens(llm.generate(long_prompts, greedy(16)))
    one_shot = make_llm(kv_cache="contiguous", max_num_seqs=4)
    assert chunked == tokens(one_shot.generate(long_prompts, greedy(16)))
    assert tokens(llm.generate(SIXTEEN, greedy(20))) == contiguous_16


@pytest.mark.parametrize("prefix", [False, True], ids=["no-prefix-cache", "prefix-cache"])
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_gives_identical_outputs(mode, prefix, contiguous_16):
    # 20 blocks of 16 tokens cannot hold 16 requests of ~30 tokens at once. With the prefix cache on
    # (the paged default) the tree holds blocks too: a swapped-out request must evict them to come back.
    llm = make_llm(kv_cache="paged", num_kv_blocks=21, max_model_len=128, preemption_mode=mode,
                   enable_prefix_caching=prefix)
    out = tokens(llm.generate(SIXTEEN, greedy(20)))
    stats = llm.cache_stats()
    assert stats["preemptions"] > 0
    assert out == contiguous_16
    assert stats["blocks_used"] == 0 and stats["swapped_blocks"] == 0
    llm.engine.kv_manager.check_integrity()


def test_abort_mid_generation_frees_every_block(llm_paged):
    e = llm_paged.engine
    ids = [e.add_request(p, greedy(50)) for p in PROMPTS]
    for _ in range(5):
        e.step()
    assert e.cache_stats()["blocks_used"] > 0
    for rid in ids:
        e.abort_request(rid)
    assert not e.has_unfinished_requests()
    assert e.cache_stats()["blocks_used"] == 0
    e.kv_manager.check_integrity()


def test_pool_too_small_for_one_sequence_refuses_to_start():
    with pytest.raises(ValueError, match=r"cannot hold one sequence of max_model_len=512.*max_model_len <= 160"):
        make_llm(kv_cache="paged", num_kv_blocks=11)


def test_paged_waste_is_below_one_block_per_sequence(llm_paged):
    e = llm_paged.engine
    for p in PROMPTS:
        e.add_request(p, greedy(30))
    e.step()
    used_tokens = sum(r.num_computed_tokens for r in e.scheduler.running)
    reserved = e.cache_stats()["blocks_used"] * e.kv_cache.block_size
    assert used_tokens <= reserved < used_tokens + len(PROMPTS) * e.kv_cache.block_size
    while e.has_unfinished_requests():
        e.step()


def test_kv_cache_dtype_is_validated_at_start():
    """Until quantized KV lands the cache stores the model dtype: anything else is refused when the
    engine is built (it used to size the pool, then fail on the first write)."""
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of \['auto'"):
        make_llm(kv_cache_dtype="int3")
    with pytest.raises(ValueError, match="differs from the model dtype float32"):
        make_llm(dtype="float32", kv_cache_dtype="bfloat16")
    llm = make_llm(dtype="float32", kv_cache_dtype="float32", num_kv_blocks=64)
    assert len(llm.generate("Hello", greedy(4))[0].outputs[0].token_ids) == 4


def test_swapped_request_comes_back_when_the_tree_holds_the_pool(llm_contiguous):
    """Swap preemption with the prefix cache on: A and B cannot both reach 80 tokens in 8 blocks, so B
    is swapped out; when A finishes, its blocks (and B's own full blocks, cached at swap-out) sit in the
    radix tree and the free list is nearly empty. B's swap-in must evict from the tree like any
    allocation; it used to wait for free blocks forever, and ``step()`` then read ``waiting[0]`` of an
    empty queue (IndexError)."""
    prompts = ["The history of the printing press begins", "A recipe for bread needs flour, water and"]
    llm = make_llm(kv_cache="paged", num_kv_blocks=9, max_model_len=96, preemption_mode="swap",
                   enable_prefix_caching=True, max_num_seqs=2)
    out = tokens(llm.generate(prompts, greedy(60)))
    stats = llm.cache_stats()
    assert stats["preemptions"] > 0 and stats["swapped_blocks"] == 0
    assert out == tokens(llm_contiguous.generate(prompts, greedy(60)))
    llm.engine.kv_manager.check_integrity()
