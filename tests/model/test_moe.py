"""Mixture-of-experts decoders (Mixtral, Qwen3-MoE, Qwen2-MoE with its shared expert, OLMoE) against HF
transformers on the same random weights.

No small real MoE checkpoint exists here, so each family is a tiny random-init HF model (2 layers,
hidden 64, 8 experts, top-2) saved with ``save_pretrained`` beside SmolLM2's tokenizer, and loaded by
kvserve from that folder. Router weights are scaled up so that routing is decisive (HF's init makes
every expert nearly equally likely, and a near-tie would let rounding pick the expert).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.models.layers import Linear, silu_and_mul
from kvserve.models.moe import MoE

TOP = 20
NEW = 8
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time there was a dragon who"]
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.1,
              num_experts_per_tok=2)


def _family(name: str):
    import transformers as T

    return {
        "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, dict(num_local_experts=8, intermediate_size=96)),
        "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM,
                      dict(num_experts=8, moe_intermediate_size=48, intermediate_size=96, norm_topk_prob=True,
                           head_dim=16, mlp_only_layers=[1])),  # layer 1 keeps a dense MLP
        "qwen2_moe": (T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM,
                      dict(num_experts=8, moe_intermediate_size=48, intermediate_size=96,
                           shared_expert_intermediate_size=80)),
        "olmoe": (T.OlmoeConfig, T.OlmoeForCausalLM, dict(num_experts=8, intermediate_size=48)),
    }[name]


FAMILIES = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe"]


def _build(name: str, vocab: int):
    cfg_cls, model_cls, kw = _family(name)
    torch.manual_seed(0)
    model = model_cls(cfg_cls(vocab_size=vocab, **COMMON, **kw)).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gate.weight") and p.shape[0] == 8:  # the router: decisive routing
                p.normal_(0.0, 1.0)
            elif n.endswith("bias"):  # Qwen2-MoE's q/k/v biases (zero at init would hide a missing one)
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory, tokenizer):
    """family -> (folder, HF model); built once per module."""
    out = {}
    for name in FAMILIES:
        model = _build(name, len(tokenizer))
        path = tmp_path_factory.mktemp(f"{name}-tiny")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[name] = (path, model)
    return out


def _hf_reference(hf, ids):
    with torch.no_grad():
        g = hf.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
        full = g[0].tolist()
        ref = torch.log_softmax(hf(torch.tensor([full])).logits[0].double(), dim=-1)
    return full, ref


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_match_hf(family, moe_dirs):
    """Greedy tokens equal HF's and every step's top logprobs are within 1e-4 (fp32), through a chunked
    prefill (8-token chunks), then again from the prefix cache."""
    path, hf = moe_dirs[family]
    llm = LLM(str(path), dtype="float32", max_model_len=256, num_kv_blocks=64, max_num_batched_tokens=8)
    cfg = llm.engine.model_config
    assert cfg.num_experts == 8 and cfg.num_experts_per_tok == 2
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, logprobs=TOP)
    first = llm.generate(PROMPTS, params, use_tqdm=False)
    again = llm.generate(PROMPTS, params, use_tqdm=False)  # prompts now come from the prefix tree
    assert sum(o.num_cached_tokens for o in again) > 0
    tok = llm.get_tokenizer()
    for p, out, hit in zip(PROMPTS, first, again):
        ids = tok(p).input_ids
        full, ref = _hf_reference(hf, ids)
        for o in (out, hit):
            ours = o.outputs[0]
            assert list(ours.token_ids) == full[len(ids):], (family, p)
            for step, lp in enumerate(ours.logprobs):
                row = ref[len(ids) - 1 + step]
                err = max(abs(v - row[t].item()) for t, v in lp.items())
                assert err < 1e-4, f"{family} {p!r} step {step}: logprob differs by {err:.2e}"


def test_stacked_expert_weights_load_the_same(moe_dirs, tmp_path):
    """A folder whose experts are stored stacked [E, 2 * width, hidden] (transformers' in-memory layout)
    gives the same logits as the per-expert folder."""
    import shutil

    from safetensors.torch import save_file

    path, hf = moe_dirs["qwen3_moe"]
    for f in path.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)  # really the stacked layout
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=5)
    kw = dict(dtype="float32", max_model_len=128, num_kv_blocks=32)
    a = LLM(str(path), **kw).generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0]
    b = LLM(str(tmp_path), **kw).generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0]
    assert a.token_ids == b.token_ids
    for la, lb in zip(a.logprobs, b.logprobs):
        assert la.keys() == lb.keys() and max(abs(la[t] - lb[t]) for t in la) < 1e-5


def test_experts_without_tokens_and_the_grouped_compute_equal_a_loop_over_tokens():
    """The grouped compute (sort by expert, one GEMM per expert) equals the per-token definition, for
    a batch where the router sends every token to experts 0-2 only, so five experts get no token."""
    g = torch.Generator().manual_seed(0)
    E, H, W, T = 8, 32, 24, 13
    router = torch.randn(E, H, generator=g)
    router[3:] = -router[:3].sum(0) * 10  # experts 3-7 score far below 0-2 for positive inputs
    gu = [torch.randn(2 * W, H, generator=g) * 0.2 for _ in range(E)]
    dn = [torch.randn(H, W, generator=g) * 0.2 for _ in range(E)]
    moe = MoE(router=router, gate_up=[Linear(w) for w in gu], down=[Linear(w) for w in dn], top_k=2,
              norm_topk_prob=True, router_act="softmax", act_and_mul=silu_and_mul)
    x = torch.rand(T, H, generator=g) + 0.1
    experts, weights = moe.route(x)
    assert set(experts.flatten().tolist()) <= {0, 1, 2}
    ref = torch.zeros(T, H)
    for t in range(T):  # the definition, one token at a time
        for e, w in zip(experts[t].tolist(), weights[t].tolist()):
            gate, up = (x[t] @ gu[e].T).chunk(2)
            ref[t] += w * ((torch.nn.functional.silu(gate) * up) @ dn[e].T)
    assert torch.allclose(moe(x), ref, atol=1e-5)
    assert torch.allclose(moe(x[5:6]), ref[5:6], atol=1e-5)  # a lone decode step takes its own path
    # sigmoid routing without renormalization (DeepSeek-style scores), and a gated shared expert
    sgu, sdn, sg = torch.randn(2 * W, H, generator=g) * 0.2, torch.randn(H, W, generator=g) * 0.2, torch.randn(H, generator=g)
    moe2 = dataclasses.replace(moe, router_act="sigmoid", norm_topk_prob=False, shared_gate_up=Linear(sgu),
                               shared_down=Linear(sdn), shared_gate=sg)
    experts, weights = moe2.route(x)
    assert torch.allclose(weights, (x @ router.T).sigmoid().gather(1, experts))
    ref2 = torch.zeros(T, H)
    for t in range(T):
        for e, w in zip(experts[t].tolist(), weights[t].tolist()):
            gate, up = (x[t] @ gu[e].T).chunk(2)
            ref2[t] += w * ((torch.nn.functional.silu(gate) * up) @ dn[e].T)
        gate, up = (x[t] @ sgu.T).chunk(2)
        ref2[t] += torch.sigmoid(x[t] @ sg) * ((torch.nn.functional.silu(gate) * up) @ sdn.T)
    assert torch.allclose(moe2(x), ref2, atol=1e-5)
    assert torch.allclose(moe2(x[5:6]), ref2[5:6], atol=1e-5)


def test_batch_preemption_and_quantized_kv_just_work(moe_dirs):
    """A batch of different lengths under a pool small enough to preempt (swap) gives the roomy pool's
    greedy tokens; an int8 KV cache, teacher-forced over a text in 16-token chunks (the later chunks
    read their keys from the quantized cache), picks the fp32 cache's top token at >= 90 % of the
    positions. The KV cache code is the dense model's: this checks that nothing in it assumed a dense MLP."""
    from kvserve.ppl import corpus_text, perplexity

    path, _ = moe_dirs["mixtral"]
    prompts = [p * k for p, k in zip(PROMPTS, (3, 5, 2))]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    roomy = LLM(str(path), dtype="float32", max_model_len=256, num_kv_blocks=128, max_num_batched_tokens=16)
    ref = roomy.generate(prompts, params, use_tqdm=False)
    small = LLM(str(path), dtype="float32", max_model_len=128, num_kv_blocks=10, preemption_mode="swap")
    out = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]
    ids = roomy.get_tokenizer().encode(corpus_text()[:4000])[:200]
    q = LLM(str(path), dtype="float32", max_model_len=256, num_kv_blocks=64, kv_cache_dtype="int8",
            max_num_batched_tokens=16)
    a, b = perplexity(roomy, ids, top1=True), perplexity(q, ids, top1=True)
    agree = sum(x == y for x, y in zip(a.top1, b.top1)) / len(a.top1)
    assert agree >= 0.9 and abs(b.perplexity / a.perplexity - 1) < 0.02, (agree, a.perplexity, b.perplexity)


def test_info_shows_experts_and_kv_bytes_equal_the_dense_model(moe_dirs, tmp_path, tokenizer):
    """``kvserve info``: experts, top-k, active parameters; KV bytes per token equal a dense Llama's with
    the same attention (MoE changes the MLP only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvserve.cli import main, model_info

    path, hf = moe_dirs["mixtral"]
    i = model_info(str(path))
    assert (i["num_experts"], i["num_experts_per_tok"], i["moe_intermediate_size"]) == (8, 2, 96)
    assert i["num_params"] == sum(p.numel() for p in hf.parameters())
    # active: the same count with 2 of the 8 experts' weights per MoE layer
    expert = 3 * 64 * 96
    assert i["num_active_params"] == i["num_params"] - 2 * 6 * expert
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), intermediate_size=96,
                                         **{k: v for k, v in COMMON.items() if k != "num_experts_per_tok"}))
    dense.save_pretrained(tmp_path)
    d = model_info(str(tmp_path))
    assert d["num_experts"] == 0
    assert i["kv_bytes_per_token"] == d["kv_bytes_per_token"] and i["kv_bytes_per_token"]["float32"] == 2 * 2 * 2 * 16 * 4
    q = model_info(str(moe_dirs["qwen3_moe"][0]))
    assert q["moe_layers"] == [0]  # mlp_only_layers=[1]
    assert q["num_params"] == sum(p.numel() for p in moe_dirs["qwen3_moe"][1].parameters())
    s = model_info(str(moe_dirs["qwen2_moe"][0]))
    assert s["num_params"] == sum(p.numel() for p in moe_dirs["qwen2_moe"][1].parameters())
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["info", "--model", str(path)]) == 0
    text = buf.getvalue()
    assert "experts" in text and "top-2 per token" in text and "active parameters" in text


def test_gguf_moe_file_loads_the_same_weights(moe_dirs, tmp_path):
    """A Qwen3-MoE GGUF file (written here with the gguf package, experts stacked as llama.cpp's
    ``ffn_*_exps`` tensors) reads back as the same config switches and weights as the HF folder."""
    import gguf

    from kvserve.models.loader import ModelSource, load_weights

    path, hf = moe_dirs["qwen3_moe"]
    c = hf.config
    sd = {k: v.detach().float().contiguous() for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "qwen3moe")
    a = "qwen3moe"
    w.add_uint32(f"{a}.block_count", 2)
    w.add_uint32(f"{a}.embedding_length", 64)
    w.add_uint32(f"{a}.feed_forward_length", 96)
    w.add_uint32(f"{a}.attention.head_count", 4)
    w.add_uint32(f"{a}.attention.head_count_kv", 2)
    w.add_uint32(f"{a}.attention.key_length", 16)
    w.add_uint32(f"{a}.context_length", 512)
    w.add_float32(f"{a}.rope.freq_base", 10000.0)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32(f"{a}.expert_count", 8)
    w.add_uint32(f"{a}.expert_used_count", 2)
    w.add_uint32(f"{a}.expert_feed_forward_length", 48)
    w.add_uint32(f"{a}.vocab_size", c.vocab_size)
    names = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
             "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
             "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
             "self_attn.q_norm.weight": "attn_q_norm", "self_attn.k_norm.weight": "attn_k_norm",
             "mlp.gate.weight": "ffn_gate_inp", "mlp.experts.down_proj": "ffn_down_exps",
             "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}
    for k, v in sd.items():
        if k.startswith("model.layers."):
            i, rest = k.removeprefix("model.layers.").split(".", 1)
            if rest == "mlp.experts.gate_up_proj":  # llama.cpp keeps gate and up apart: [E, width, hidden] each
                gate, up = v.chunk(2, dim=1)
                w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", gate.contiguous().numpy())
                w.add_tensor(f"blk.{i}.ffn_up_exps.weight", up.contiguous().numpy())
                continue
            w.add_tensor(f"blk.{i}.{names[rest]}.weight", v.numpy())
        else:
            w.add_tensor({"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                          "lm_head.weight": "output.weight"}[k], v.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg_g, wg = load_weights(ModelSource(tmp_path / "tiny.gguf", "gguf", "tiny"), torch.float32)
    cfg_h, wh = load_weights(ModelSource(path, "hf", "tiny"), torch.float32)
    for f in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "qk_norm",
              "num_heads", "num_kv_heads", "head_dim"):
        assert getattr(cfg_g, f) == getattr(cfg_h, f), f
    assert cfg_g.dense_layers == cfg_h.dense_layers == (1,)  # GGUF: the layers without a router
    from kvserve.models.moe import experts_of

    for i in range(2):
        if cfg_h.is_moe(i):
            gu_g, dn_g = experts_of(wg, f"layers.{i}.", 8)
            gu_h, dn_h = experts_of(wh, f"layers.{i}.", 8)
            assert all(torch.equal(x, y) for x, y in zip(gu_g + dn_g, gu_h + dn_h))
            assert torch.equal(wg[f"layers.{i}.router"], wh[f"layers.{i}.router"])
    q, k, v = (wh[f"layers.0.{n}_proj"] for n in "qkv")
    assert torch.equal(wg["layers.0.qkv_proj"], torch.cat([q, k, v]))


def test_dense_qwen3_matches_hf(tmp_path, tokenizer):
    """Dense Qwen3 (per-head QK-norm, explicit head_dim) comes with Qwen3-MoE's attention: same tokens
    and logprobs as HF."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), intermediate_size=96, head_dim=24,
                                      **{k: v for k, v in COMMON.items() if k != "num_experts_per_tok"})).float().eval()
    with torch.no_grad():
        for layer in hf.model.layers:  # QK-norm weights are ones at init: make them matter
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", max_model_len=128, num_kv_blocks=32)
    assert llm.engine.model_config.qk_norm and llm.engine.model_config.num_experts == 0
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, logprobs=TOP)
    out = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0]
    ids = llm.get_tokenizer()(PROMPTS[0]).input_ids
    full, ref = _hf_reference(hf, ids)
    assert list(out.outputs[0].token_ids) == full[len(ids):]
    for step, lp in enumerate(out.outputs[0].logprobs):
        assert max(abs(v - ref[len(ids) - 1 + step][t].item()) for t, v in lp.items()) < 1e-4
