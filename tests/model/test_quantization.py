"""Quantized linears against the fp32 model on the same weights.

Teacher forcing: the fp32 model's greedy continuation of each prompt is fed back one prefix at a time,
and the quantized model must pick the same next token at nearly every position. (Free-running greedy
outputs are not compared token for token: one near-tie flipped early changes everything after it.)
"""
import pytest

from kvserve import SamplingParams
from tests.conftest import PROMPTS, make_llm

NEW = 16


@pytest.mark.parametrize("quantization", ["int8", "w8a8", "int4"])
def test_quantized_model_follows_fp32(llm_paged, quantization):
    # measured here (5 prompts x 16 = 80 positions): int8 weight-only 76, w8a8 70-74, int4 76 (its layers
    # are the GGUF's own Q4_1 values again; the 4 misses come from the int8 LM head); on 15 prompts x 24
    # (360): int8 347, w8a8 338. Rounding flips only near-ties. The bar: 90 % for 4-bit (issue 16).
    fp32 = llm_paged.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True), use_tqdm=False)
    seqs = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in fp32]
    starts = [len(o.prompt_token_ids) for o in fp32]
    prefixes = [s[:k] for s, n in zip(seqs, starts) for k in range(n, n + NEW)]
    targets = [s[k] for s, n in zip(seqs, starts) for k in range(n, n + NEW)]

    quant = make_llm(kv_cache="paged", quantization=quantization, enable_prefix_caching=False)
    outs = quant.generate(prefixes, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    agree = sum(o.outputs[0].token_ids[0] == t for o, t in zip(outs, targets))
    print(f"{quantization}: {agree} of {len(targets)} teacher-forced positions agree with fp32")
    assert agree >= (0.9 if quantization == "int4" else 0.85) * len(targets), f"{quantization} picked fp32's token at {agree} of {len(targets)} positions"
    assert quant.cache_stats()["blocks_used"] == 0
