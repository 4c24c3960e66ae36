"""bf16 (the default dtype on AVX512_BF16 / AMX CPUs and CUDA) against HF transformers in bf16 on the same
weights. bf16 rounds differently in every implementation (GEMM blocking, fused kernels), so exact token
equality is not expected everywhere: near-ties flip. What must hold is that our logits are HF's up to bf16
noise, and that the decode path (KV cache, paged decode attention, C++ per-token ops) follows HF's
greedy continuation position by position."""
from __future__ import annotations

import pytest
import torch

from kvserve import SamplingParams
from tests.conftest import PROMPTS, make_llm

NEW = 24


@pytest.fixture(scope="module")
def hf_bf16(model_src):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_src.path.parent), gguf_file=model_src.path.name,
                                             dtype=torch.bfloat16)
    return m.eval()


@pytest.fixture(scope="module")
def llm_bf16():
    return make_llm(dtype="bfloat16", kv_cache="paged", num_kv_blocks=64)


def test_bf16_greedy_follows_hf_bf16(llm_bf16, hf_bf16, tokenizer):
    """For each prompt: HF's greedy continuation in bf16; our engine, teacher-forced on it (prompt + HF's
    tokens, decoded one at a time through the cache), must pick HF's next token at nearly every step (118 of 120 on the Zen 4 machine, with and
    without the C++ kernels)."""
    agree = total = 0
    for p in PROMPTS:
        ids = tokenizer(p).input_ids
        with torch.no_grad():
            g = hf_bf16.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW,
                                 pad_token_id=0)[0].tolist()
        hf_new = g[len(ids):]
        # our greedy next token after each prefix of HF's sequence: prompt_logprobs would recompute; instead
        # run the prefix through the engine with max_tokens=1 (prefix caching reuses the earlier KV blocks)
        for t in range(NEW):
            out = llm_bf16.generate([g[: len(ids) + t]], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
            agree += out[0].outputs[0].token_ids[0] == hf_new[t]
            total += 1
    assert agree >= 0.95 * total, f"{agree}/{total} teacher-forced bf16 tokens agree with HF bf16"


def test_bf16_prefill_logits_close_to_hf_bf16(llm_bf16, hf_bf16, tokenizer):
    """Whole-prompt logits: HF's up to bf16 rounding noise (values span about +-30)."""
    for p in PROMPTS:
        ids = tokenizer(p).input_ids
        out = llm_bf16.generate([ids], SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)[0]
        with torch.no_grad():
            ref = torch.log_softmax(hf_bf16(torch.tensor([ids])).logits[0, -1].float(), -1)
        ours = out.outputs[0].logprobs[0]
        for tok, lp in ours.items():
            assert abs(lp - ref[tok].item()) < 0.25, (p, tok, lp, ref[tok].item())
