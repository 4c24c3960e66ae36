"""KV tiers on the real model: a working set larger than the pool comes back from the host pool and
the disk with the same greedy tokens as with the tiers off; the disk survives a restart; a bad file,
another layout's directory, an abort during a prefetch and preemption lose nothing."""
from __future__ import annotations

import pytest

from kvserve import SamplingParams
from tests.conftest import make_llm

PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
# six 150-token prompts (9 whole blocks each) in a pool of 24 usable blocks: the tree cannot keep them
PROMPTS = [{"prompt_token_ids": [1000 + 7 * i + j for j in range(150)]} for i in range(6)]
SMALL = dict(max_model_len=256, num_kv_blocks=25)


@pytest.fixture(scope="module")
def want():
    return [o.outputs[0].token_ids for o in make_llm(max_model_len=256).generate(PROMPTS, PARAMS, use_tqdm=False)]


def run(llm) -> list:
    return [llm.generate(p, PARAMS, use_tqdm=False)[0] for p in PROMPTS]


def tier_stats(llm) -> dict:
    return {k.removeprefix("kv_tier_"): v for k, v in llm.cache_stats().items() if k.startswith("kv_tier_")}


def test_a_working_set_larger_than_the_pool_comes_back_with_the_same_tokens(want, tmp_path):
    # both tiers: the host pool (64 MiB: every block) serves the loads; the disk, written through,
    # serves the restart test's
    kw = dict(kv_offload_memory="64MiB", kv_cache_dir=str(tmp_path))
    off = make_llm(**SMALL)
    run(off)
    assert [o.num_cached_tokens for o in run(off)] == [0] * 6  # tiers off: the pool forgot them all
    llm = make_llm(**SMALL, **kw)
    first = run(llm)
    second = run(llm)
    assert [o.outputs[0].token_ids for o in first + second] == want + want
    assert [o.num_cached_tokens for o in second] == [144] * 6  # 9 whole blocks each, from the tiers
    llm.engine.flush_kv_tiers()
    s = tier_stats(llm)
    assert s["host_hits"] >= 6 * 9 and s["disk_blocks"] >= 6 * 9
    llm.engine.kv_manager.check_integrity()


def test_the_disk_survives_a_restart_and_a_bad_file_is_recomputed(want, tmp_path):
    first = make_llm(**SMALL, kv_cache_dir=str(tmp_path))
    run(first)
    first.engine.flush_kv_tiers()
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 6 * 9 + 6 * 0  # whole blocks of the prompts, written through
    bad = files[0]
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    restarted = make_llm(**SMALL, kv_cache_dir=str(tmp_path))
    out = run(restarted)
    assert [o.outputs[0].token_ids for o in out] == want
    assert sum(o.num_cached_tokens for o in out) >= 6 * 144 - 144  # one chain is cut at the bad block
    s = tier_stats(restarted)
    assert s["disk_corrupt"] == 1 and s["disk_hits"] >= 6 * 9 - 9
    restarted.engine.kv_manager.check_integrity()


def test_a_directory_of_another_layout_is_never_read(tmp_path):
    """The same model and tokens under another KV dtype or block size key differently: nothing matches."""
    plain = make_llm(**SMALL, kv_cache_dir=str(tmp_path))
    plain.generate(PROMPTS[0], PARAMS, use_tqdm=False)
    plain.engine.flush_kv_tiers()
    assert len(list(tmp_path.glob("*.safetensors"))) == 9
    for other in (dict(kv_cache_dtype="int8"), dict(block_size=32)):
        q = make_llm(**SMALL, kv_cache_dir=str(tmp_path), **other)
        out = q.generate(PROMPTS[0], PARAMS, use_tqdm=False)[0]
        assert out.num_cached_tokens == 0
        assert tier_stats(q)["disk_hits"] == 0 and tier_stats(q)["disk_corrupt"] == 0


def test_abort_during_a_prefetch_and_preemption_lose_nothing(want, tmp_path):
    warm = make_llm(**SMALL, kv_cache_dir=str(tmp_path))
    run(warm)
    warm.engine.flush_kv_tiers()
    llm = make_llm(**SMALL, kv_offload_memory="16MiB", kv_cache_dir=str(tmp_path), max_num_seqs=6)
    e = llm.engine
    rid = e.add_request(PROMPTS[0], PARAMS)  # its blocks start coming up from disk
    e.abort_request(rid)
    e.kv_manager.check_integrity()
    # all six at once in 24 blocks: some are preempted, all come back with their own tokens
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True), use_tqdm=False)
    ref = make_llm(max_model_len=256).generate(PROMPTS, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True),
                                               use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    assert llm.cache_stats()["preemptions"] > 0
    e.kv_manager.check_integrity()
