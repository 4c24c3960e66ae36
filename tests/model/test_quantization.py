"""Quantized linears against the fp32 model on the same weights.

Teacher forcing: the fp32 model's greedy continuation of each prompt is fed back one prefix at a time,
and the quantized model must pick the same next token at nearly every position. (Free-running greedy
outputs are not compared token for token: one near-tie flipped early changes everything after it.)
"""
import pytest

from kvserve import SamplingParams
from kvserve.ppl import corpus_text, perplexity
from tests.conftest import PROMPTS, make_llm

NEW = 16


@pytest.mark.parametrize("quantization", ["int8", "w8a8-channel", "int4"])
def test_quantized_model_follows_fp32(llm_paged, quantization):
    # measured here (5 prompts x 16 = 80 positions): int8 weight-only 75, w8a8-channel 70-74, int4 80 (its
    # layers are the GGUF's own Q4_1 values again, its LM head the Q8_0 ones). Rounding flips only near-ties;
    # the bars (90 % for 4-bit, 97 % for 8-bit) are held on 2,046 positions of text below.
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


@pytest.fixture(scope="module")
def fp32_on_text():
    """(2,048 tokens of text, the fp32 model's perplexity result on them, with the top-1 token at each)."""
    exact = make_llm(quantization="none", max_model_len=1025, enable_prefix_caching=False)
    ids = exact.get_tokenizer().encode(corpus_text())[:2048]
    return ids, perplexity(exact, ids, window=1024, top1=True)


@pytest.mark.parametrize("quantization,bar", [("int8", 0.97), ("w8a8", 0.97), ("int4", 0.99)])
def test_quantized_model_agrees_on_text(fp32_on_text, quantization, bar):
    """Teacher-forced top-1 agreement with the fp32 model over 2,046 tokens of ``pydoc_data.topics``,
    and perplexity. Measured (issue 16): int8 97.9 % and +0.17 % (one scale per 32 weights; one per row
    gave 95.9 %), w8a8 97.85 % (8-bit activations per block of 32 after a Hadamard rotation; 95.9 %
    without the rotation), int4 100.0 % and +0.00 % (the file's own Q4_1 and Q8_0 values: lossless).
    w8a8-channel, 91.0 % and +2.0 %, is not held to the bar: one scale per weight row caps it."""
    ids, ref = fp32_on_text
    quant = make_llm(quantization=quantization, max_model_len=1025, enable_prefix_caching=False)
    got = perplexity(quant, ids, window=1024, top1=True)
    agree = sum(a == b for a, b in zip(got.top1, ref.top1)) / len(ref.top1)
    print(f"{quantization}: agreement {agree:.2%}, perplexity {got.perplexity:.4f} vs {ref.perplexity:.4f}")
    assert len(ref.top1) == 2046 and agree >= bar
    assert got.perplexity <= ref.perplexity * 1.005


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_decode_kernel_matches_its_prefill(quantization):
    """Decode steps of one request run through the C++ int8 / int4 kernel (1-2 rows), prefill through the
    dequantized copy: the log-probabilities each path gives the same tokens at the same positions agree
    (the kernel rounds activations to 15 bits per block of 32, nothing else). Not w8a8: its two paths
    multiply the same values for the same x (tests/unit/test_linear.py), but the decode and prefill
    attentions differ by ~1e-6, which flips an 8-bit rounding here and there; over 30 layers the
    log-probabilities then differ by ~0.07."""
    quant = make_llm(quantization=quantization, enable_prefix_caching=False)
    out = quant.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0),
                         use_tqdm=False)[0]
    gen = list(out.outputs[0].token_ids)
    decoded = [lp[t] for lp, t in zip(out.outputs[0].logprobs, gen)]
    ids = list(out.prompt_token_ids) + gen
    again = quant.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0),
                           use_tqdm=False)[0]
    prefilled = [again.prompt_logprobs[len(out.prompt_token_ids) + i][t] for i, t in enumerate(gen)]
    assert max(abs(a - b) for a, b in zip(decoded, prefilled)) < 2e-3, (decoded, prefilled)
