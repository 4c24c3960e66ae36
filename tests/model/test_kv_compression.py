"""Importance-based KV compression (kv.compress) in the engine, against NVIDIA kvpress on HF transformers.

The reference is a fixture (``tests/fixtures/kvpress_kept.json``, made by ``make_kvpress_fixture.py``
in kvpress's own venv): for two prompts and 12 presses (4 methods x ratios 0.25 / 0.5 / 0.75), the
positions kvpress keeps in every layer and KV head of SmolLM2 (fp32), and the 8 greedy tokens HF
generates after the compressed prefill."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvserve import SamplingParams
from kvserve.kv import compress as kvc
from tests.conftest import make_llm

FIXTURE = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "kvpress_kept.json").read_text())


def positions(mask: str) -> list[int]:
    m = int(mask, 16)
    return [p for p in range(m.bit_length()) if m >> p & 1]


@pytest.fixture(scope="module")
def llm():
    return make_llm(max_model_len=1024, num_kv_blocks=160, max_num_batched_tokens=128, enable_prefix_caching=False)


@pytest.fixture
def kept(monkeypatch):
    """What the engine's compression packs, per call: [layers, heads, n] positions."""
    calls = []
    pack = kvc.pack

    def recording(kv, layers, table, keep):
        calls.append(keep.clone())
        return pack(kv, layers, table, keep)

    monkeypatch.setattr(kvc, "pack", recording)
    return calls


def test_ratio_zero_is_bit_identical(llm):
    ids = FIXTURE["prompts"][0]
    p = lambda c: SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5, kv_compression=c)  # noqa: E731
    a = llm.generate([{"prompt_token_ids": ids}], p(None), use_tqdm=False)[0]
    b = llm.generate([{"prompt_token_ids": ids}], p({"method": "snapkv", "ratio": 0.0}), use_tqdm=False)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert a.outputs[0].logprobs == b.outputs[0].logprobs  # the same floats, not merely close
    assert "kv_compression_tokens_before" not in b.metrics


def test_kept_positions_and_tokens_equal_kvpress(llm, kept):
    """Every (layer, head) keeps kvpress's positions: exactly for snapkv, streaming_llm and tova; knorm
    ranks fp32 key norms, whose near-ties at the cut may fall either way (measured: at most 3 of 6,750
    positions differ). The greedy tokens after the compressed prefill equal HF + kvpress's."""
    for i, (ids, ref_kept, ref_tokens) in enumerate(zip(FIXTURE["prompts"], FIXTURE["kept"], FIXTURE["tokens"])):
        for press, layers in ref_kept.items():
            if i and not press.endswith(":0.5"):  # the second prompt: ratio 0.5 only (test time)
                continue
            params = SamplingParams(temperature=0, max_tokens=len(ref_tokens[press]), ignore_eos=True, kv_compression=press)
            out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
            ours = kept.pop()
            theirs = torch.tensor([[positions(m) for m in layer] for layer in layers])
            assert ours.shape == theirs.shape, press
            n = kvc.n_kept(len(ids), float(press.split(":")[1]))
            assert out.metrics["kv_compression_tokens_before"] == len(ids)
            assert out.metrics["kv_compression_tokens_after"] == n == ours.shape[-1]
            if press.startswith("knorm"):
                same = sum(len(set(a.tolist()) & set(b.tolist())) for la, lb in zip(ours, theirs) for a, b in zip(la, lb))
                assert same >= 0.999 * theirs.numel(), (press, same, theirs.numel())
            else:
                assert torch.equal(ours, theirs), press
                assert list(out.outputs[0].token_ids) == ref_tokens[press], press
    llm.engine.kv_manager.check_integrity()


def test_freed_blocks_are_reused_at_once_and_more_requests_fit():
    """At ratio 0.5 the same pool runs >= 1.5x as many 177-token requests at once (the peak of running
    requests): the blocks each one gives back after its prefill are free for the next one's the same
    step, and the ref counts add up throughout. (Not 2x: a prefill holds its whole prompt's blocks
    until it is compressed, and the 24 generated tokens are not compressed.)"""
    ids = FIXTURE["prompts"][1]
    prompts = [{"prompt_token_ids": ids[i:] + ids[:i]} for i in range(0, 100, 10)]  # 10 different 177-token prompts
    params = lambda c: SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, kv_compression=c)  # noqa: E731
    peaks = {}
    for comp in (None, "snapkv:0.5"):
        llm = make_llm(max_model_len=512, num_kv_blocks=64, max_num_batched_tokens=1024, enable_prefix_caching=False,
                       preemption_mode="swap")
        e = llm.engine
        for p in prompts:
            e.add_request(p, params(comp))
        peak = 0
        while e.has_unfinished_requests():
            e.step()
            e.kv_manager.check_integrity()
            peak = max(peak, len(e.scheduler.running))
        peaks[comp] = peak
        if comp:  # 177 tokens in 12 blocks -> 88 in 6
            st = llm.cache_stats()
            assert st["kv_compressions"] == 10 and st["kv_compression_blocks_returned"] == 10 * (12 - 6)
    assert peaks["snapkv:0.5"] >= 1.5 * peaks[None], peaks


def test_preemption_and_abort_keep_integrity_and_tokens(mode="recompute"):
    """Under preemption (a pool too small for all) and an abort mid-run, the ref counts add up every
    step and each finished request's tokens equal the same request run alone with room to spare.
    (Recompute: each preempted request compresses again; swap is covered by the h2o test.)"""
    ids = FIXTURE["prompts"][1]
    prompts = [ids[i:] + ids[:i] for i in (0, 20, 40)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, kv_compression="tova:0.5")
    alone = make_llm(max_model_len=512, num_kv_blocks=64, enable_prefix_caching=False)
    ref = [alone.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    llm = make_llm(max_model_len=256, num_kv_blocks=17, preemption_mode=mode, max_num_batched_tokens=64)
    e = llm.engine
    rids = [e.add_request({"prompt_token_ids": p}, params) for p in prompts]
    victim = e.add_request({"prompt_token_ids": prompts[0]}, params)
    outs, steps = {}, 0
    while e.has_unfinished_requests():
        for o in e.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
        steps += 1
        if steps == 6:
            e.abort_request(victim)
        e.kv_manager.check_integrity()
    assert e.scheduler.num_preemptions > 0
    assert not e.runner.window_queries  # nothing left behind by the aborted or preempted ones
    assert [outs[r] for r in rids] == ref


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="method must be one of"):
        SamplingParams(kv_compression="zip:0.5")
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        SamplingParams(kv_compression={"method": "snapkv", "ratio": 1.0})
    llm = make_llm(max_model_len=256, num_kv_blocks=32, kv_cache="off")
    with pytest.raises(ValueError, match="no KV cache"):
        llm.generate("Hello", SamplingParams(kv_compression="knorm:0.5"), use_tqdm=False)


def test_a_short_prompt_is_not_compressed_while_it_decodes(llm, kept):
    """A prompt shorter than snapkv's 64-token window is left as it is, and stays so when prompt and
    output together outgrow the window: compression runs at the end of a prefill only."""
    ids = FIXTURE["prompts"][1][:40]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    params.kv_compression = kvc.KVCompression("snapkv", 0.5)
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    assert not kept and "kv_compression_tokens_before" not in out.metrics
    assert out.outputs[0].token_ids == plain.outputs[0].token_ids


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_h2o_keeps_evicting_while_decoding_within_its_budget(mode):
    """h2o at 0.5 on a 300-token prompt: 150 tokens kept after the prefill, then a block evicted each
    time the cache holds a block more, so it never holds more than 150 + 15 tokens however long it
    decodes; the evicted blocks go back to the pool; preempted (another request outgrows the pool)
    and resumed, it goes on the same way."""
    ids = FIXTURE["prompts"][0]
    llm = make_llm(max_model_len=368, num_kv_blocks=24, enable_prefix_caching=False, preemption_mode=mode)
    e = llm.engine
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, kv_compression="h2o:0.5")
    rid = e.add_request({"prompt_token_ids": ids}, params)
    other = e.add_request({"prompt_token_ids": FIXTURE["prompts"][1]}, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    most, fin = 0, None
    while e.has_unfinished_requests():
        for o in e.step():
            if o.request_id == rid and o.finished:
                fin = o
        e.kv_manager.check_integrity()
        r = e.scheduler.requests.get(rid)
        if r is not None and r.compression_decided and e.kv_manager.rope_at_text(rid):
            most = max(most, r.num_computed_tokens - e.kv_manager.position_shift(rid))
    assert e.scheduler.num_preemptions > 0
    assert 150 < most <= 165
    m = fin.metrics
    assert m["kv_compression_tokens_before"] >= 300 and m["kv_compression_tokens_after"] == kvc.n_kept(m["kv_compression_tokens_before"], 0.5)
    assert m["kv_compression_blocks_returned"] >= (19 - 10) + 3  # after the prefill, then ~64 / 16 while decoding
    assert not e.runner.h2o and not e.runner.window_queries
