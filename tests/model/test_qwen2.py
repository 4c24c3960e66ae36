"""Qwen2 from a HF folder: the q/k/v biases, against HF transformers on the same random weights.

A tiny random ``Qwen2ForCausalLM`` (2 layers, hidden 64, 4 query heads over 2 KV heads, fp32) is saved
with ``save_pretrained`` beside SmolLM2's tokenizer (so the vocabulary is SmolLM2's 49,152 tokens and
everything stays offline). Its biases are set to large random values (HF initializes them to zero, and
a zero bias would hide a decoder that ignores them), and its RoPE base is not the default.
"""
from __future__ import annotations

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.models.layers import Linear

TOP = 20  # logprobs compared per generated token
NEW = 8
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time"]


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.1)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                assert proj.bias is not None
                proj.bias.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("qwen2-tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def qwen2_llm(qwen2_dir):
    return LLM(str(qwen2_dir[0]), dtype="float32", max_model_len=256, num_kv_blocks=64)


def test_config_reads_biases_and_rope(qwen2_llm):
    cfg = qwen2_llm.engine.model_config
    assert cfg.attention_bias and cfg.rope_theta == 1e6  # transformers 5 keeps it in rope_parameters
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers) == (4, 2, 16, 2)
    assert qwen2_llm.engine.model.layers[0].qkv_proj.bias.shape == (cfg.q_size + 2 * cfg.kv_size,)


def test_logits_and_greedy_match_hf(qwen2_llm, qwen2_dir):
    """Greedy tokens equal HF's; the top logprobs of every step equal HF's within 1e-4 (fp32)."""
    hf = qwen2_dir[1]
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, logprobs=TOP)
    outs = qwen2_llm.generate(PROMPTS, params, use_tqdm=False)
    # The folder's own tokenizer: with a qwen2 config.json beside it, transformers may load SmolLM2's
    # vocabulary through Qwen2's tokenizer class, which splits whitespace differently.
    tok = qwen2_llm.get_tokenizer()
    for p, out in zip(PROMPTS, outs):
        ids = tok(p).input_ids
        assert list(out.prompt_token_ids) == ids
        with torch.no_grad():
            g = hf.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                            eos_token_id=None)
            full = g[0].tolist()
            ref = torch.log_softmax(hf(torch.tensor([full])).logits[0].double(), dim=-1)  # [L, V]
        ours = out.outputs[0]
        assert list(ours.token_ids) == full[len(ids):]
        for step, lp in enumerate(ours.logprobs):
            row = ref[len(ids) - 1 + step]
            top2 = torch.topk(row, 2).values
            assert top2[0] - top2[1] > 1e-3, "a near-tie: pick another seed"  # so greedy equality is meaningful
            assert len(lp) >= TOP
            err = max(abs(v - row[t].item()) for t, v in lp.items())
            assert err < 1e-4, f"{p!r} step {step}: logprob differs by {err:.2e}"


def test_missing_bias_is_refused(qwen2_dir, tmp_path):
    """A qwen2 config whose checkpoint lacks the biases fails at load with a message, not wrong outputs."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = qwen2_dir[0]
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    (st,) = tmp_path.glob("*.safetensors")
    tensors = {k: v for k, v in load_file(str(st)).items() if not k.endswith("k_proj.bias")}
    save_file(tensors, str(st), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="k_proj.bias"):
        LLM(str(tmp_path), dtype="float32", max_model_len=64, num_kv_blocks=16)


@pytest.mark.parametrize("quantization", [None, "int8", "w8a8", "w8a8-channel"])
@pytest.mark.parametrize("rows", [1, 40])  # 40: int8's dequantize path, above Linear.GEMV_MAX_ROWS
def test_linear_adds_bias_on_every_path(quantization, rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(48, 64, generator=g) * 0.05
    b = torch.randn(48, generator=g)
    x = torch.randn(rows, 64, generator=g)
    ref = x @ w.T + b
    y = Linear(w, quantization, bias=b)(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    tol = 1e-5 if quantization is None else 0.05
    assert ((y - ref).norm() / ref.norm()).item() < tol
    assert not torch.allclose(Linear(w, quantization)(x), y, atol=0.1)  # the bias is really there


def test_linear_bias_unpacked_path():
    """The F.linear path (no oneDNN prepacking: other devices, other dtypes) takes the bias too."""
    w, b, x = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    lin = Linear(w, bias=b)
    assert not lin.prepacked
    assert torch.allclose(lin(x), x @ w.T + b)
    with pytest.raises(ValueError, match="bias must have shape"):
        Linear(w, bias=torch.zeros(7, dtype=torch.float64))
