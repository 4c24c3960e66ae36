"""Every cache path against the references: HF transformers on the same weights, and our no-cache
recompute path."""
from __future__ import annotations

import pytest
import torch

from kvserve import SamplingParams
from tests.conftest import PROMPTS, make_llm

GREEDY_64 = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def hf_greedy(hf_model, tokenizer):
    """HF generate, greedy, 64 new tokens, one prompt at a time (no padding involved).
    EOS does not stop it (as ignore_eos=True for us), and is not banned either (min_new_tokens would)."""
    gc = hf_model.generation_config
    saved, gc.eos_token_id = gc.eos_token_id, None  # a generate() argument would be merged with the model's
    out = []
    for p in PROMPTS:
        ids = tokenizer(p, return_tensors="pt").input_ids
        with torch.no_grad():
            g = hf_model.generate(ids, max_new_tokens=64, do_sample=False, use_cache=True, pad_token_id=0)
        out.append(g[0, ids.shape[1]:].tolist())
    gc.eos_token_id = saved
    assert all(len(o) == 64 for o in out)
    return out


def test_prefill_logits_match_hf(llm_contiguous, hf_model, tokenizer):
    """Our decoder's logits for every prompt position equal HF's (fp32)."""
    from kvserve.engine.batch import ScheduledSeq, SchedulerOutput
    from kvserve.request import Request

    e = llm_contiguous.engine
    for p in PROMPTS + ["A much longer prompt " * 20]:
        ids = tokenizer(p).input_ids
        req = Request("logits", ids, SamplingParams())
        assert e.kv_manager.allocate_slots(req, len(ids)) is not None
        try:
            plan = SchedulerOutput([ScheduledSeq("logits", ids, 0, e.kv_manager.block_tables("logits"), True)])
            batch = e.runner.prepare(plan)
            batch.logits_idx = torch.arange(len(ids))
            ours = e.model.compute_logits(e.model.forward(batch, e.attn_backend))
        finally:
            e.kv_manager.free(req)
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0]
        assert (ours - ref).abs().max().item() < 1e-3


@pytest.mark.parametrize("mode", ["contiguous", "paged", "off"])
def test_greedy_matches_hf(mode, request, hf_greedy):
    """64 greedy tokens on 5 prompts, all run as one uneven batch, equal HF generate one by one."""
    llm = request.getfixturevalue(f"llm_{mode}")
    assert tokens(llm.generate(PROMPTS, GREEDY_64)) == hf_greedy


def test_batch_equals_each_alone(llm_paged):
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    together = tokens(llm_paged.generate(PROMPTS, sp))
    alone = [tokens(llm_paged.generate(p, sp))[0] for p in PROMPTS]
    assert together == alone


def test_no_cache_leak_between_requests(llm_contiguous, llm_paged):
    """The seeds' error 3: a finished request's KV must not leak into the next one."""
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    long_prompt = "Tell me everything about the history of the Roman empire. " * 12
    short = "The capital of France is"
    for llm in (llm_contiguous, llm_paged):
        fresh = tokens(llm.generate(short, sp))
        assert tokens(llm.generate(short, sp)) == fresh  # same prompt twice
        llm.generate(long_prompt, sp)
        assert tokens(llm.generate(short, sp)) == fresh  # a long prompt, then a short one
        assert llm.cache_stats()["blocks_used"] == 0


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm_paged):
    sp = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=24)
    alone = llm_paged.generate(PROMPTS[0], sp)[0].outputs[0].token_ids
    other = SamplingParams(temperature=1.0, max_tokens=30)
    batch = llm_paged.generate(PROMPTS, [sp] + [other] * 4)
    assert batch[0].outputs[0].token_ids == alone
    assert llm_paged.generate(PROMPTS[0], SamplingParams(temperature=0.9, seed=99, max_tokens=24))[0].outputs[0].token_ids != alone


def test_n_samples_and_logprobs(llm_paged):
    sp = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, logprobs=2)
    out = llm_paged.generate(PROMPTS[2], sp)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        assert len(c.logprobs) == len(c.token_ids)
        for tok, lp in zip(c.token_ids, c.logprobs):
            assert tok in lp and all(v <= 0 for v in lp.values()) and len(lp) >= 2


def test_stop_strings_and_stop_token_ids(llm_paged, tokenizer):
    base = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = llm_paged.generate(PROMPTS[2], base)[0].outputs[0]
    # stop string: pick a word from the middle of the greedy text
    word = full.text.split()[4]
    cut = llm_paged.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=40, stop=[word]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == word
    assert cut.text == full.text[: full.text.index(word)]
    # stop token id: the 6th generated token
    tid = full.token_ids[5]
    first = full.token_ids.index(tid)
    st = llm_paged.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[tid]))[0].outputs[0]
    assert st.finish_reason == "stop" and st.stop_reason == tid and st.token_ids == full.token_ids[: first + 1]
    # max_tokens
    ln = llm_paged.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0].outputs[0]
    assert ln.finish_reason == "length" and len(ln.token_ids) == 5


def test_min_tokens_blocks_eos(llm_paged):
    chat = [{"role": "user", "content": "What is 2+2? Answer with just the number."}]
    free = llm_paged.chat(chat, SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert free.finish_reason == "stop"
    n = len(free.token_ids) + 5
    forced = llm_paged.chat(chat, SamplingParams(temperature=0, max_tokens=64, min_tokens=n))[0].outputs[0]
    assert len(forced.token_ids) >= n


def test_chat_template_equals_hf(llm_paged, tokenizer):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    ours = llm_paged.engine.apply_chat_template(msgs)
    assert ours == tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "You are a helpful AI assistant named SmolLM" in ours  # the template's default system prompt
    out = llm_paged.chat(msgs, SamplingParams(temperature=0, max_tokens=16))[0]
    assert out.prompt_token_ids == tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                                 return_dict=False)


def test_prompt_too_long(llm_paged):
    with pytest.raises(ValueError, match=r"maximum context length is 512 tokens\. However, your request has 600 input tokens"):
        llm_paged.generate([[100] * 600], SamplingParams(max_tokens=4))
    assert not llm_paged.engine.has_unfinished_requests()


def test_generation_stops_at_max_model_len(llm_paged):
    out = llm_paged.generate([[100] * 500], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 12


def test_bad_inputs(llm_paged):
    with pytest.raises(ValueError, match="empty"):
        llm_paged.generate([[]])
    with pytest.raises(ValueError, match="token ids"):
        llm_paged.generate([[10**7]])
    for kw, field in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                      ({"max_tokens": 0}, "max_tokens"), ({"top_k": -5}, "top_k"), ({"n": 0}, "n"),
                      ({"min_p": 2}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kw)


def test_unknown_model_lists_aliases():
    from kvserve import LLM

    with pytest.raises(ValueError, match="smollm2-135m"):
        LLM("no-such-model")


def test_wrong_device_is_a_clear_error(llm_paged):
    e = llm_paged.engine
    k = torch.zeros(1, e.model_config.num_kv_heads, e.model_config.head_dim, device="meta")
    with pytest.raises(RuntimeError, match="cache is on cpu"):
        e.kv_cache.write(0, k, k, torch.zeros(1, dtype=torch.long))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when no GPU is present")
def test_cuda_unavailable_is_a_clear_error():
    from kvserve import LLM

    with pytest.raises(ValueError, match="no CUDA GPU"):
        LLM("smollm2-135m", device="cuda")


def test_streamed_text_only_grows_and_never_shows_a_stop_string(llm_paged):
    """Cumulative outputs are prefixes of the final text: the engine holds back what a stop string
    could still cut, so a streaming client never has to take characters back."""
    e = llm_paged.engine
    full = llm_paged.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    stop = " " + " ".join(full.outputs[0].text.split()[5:7])  # two words, several tokens
    e.add_request(PROMPTS[2], SamplingParams(temperature=0, max_tokens=40, stop=[stop]))
    texts = []
    while e.has_unfinished_requests():
        texts += [o.outputs[0].text for o in e.step()]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert stop not in texts[-1] and all(stop not in t for t in texts)
    assert texts[-1] == full.outputs[0].text[: full.outputs[0].text.index(stop)]


def test_estimate_equals_the_bytes_the_engine_allocates(llm_contiguous):
    """`kvserve estimate` (config only) predicts exactly what a real engine allocates."""
    from kvserve.cli import estimate

    e = llm_contiguous.engine
    est = estimate("smollm2-135m", seq_len=512, batch=8, dtype="float32", kv_cache="contiguous")
    assert est["allocated_bytes"] == e.kv_cache.nbytes == e.kv_cache.k.nbytes * 2
    assert est["formula_bytes"] == 2 * 30 * 3 * 64 * 512 * 8 * 4  # the seeds' formula, fp32
    paged = make_llm(kv_cache="paged", num_kv_blocks=8 * 32 + 1, max_num_seqs=8)
    est = estimate("smollm2-135m", seq_len=512, batch=8, dtype="float32", kv_cache="paged")
    assert est["allocated_bytes"] == paged.engine.kv_cache.nbytes
