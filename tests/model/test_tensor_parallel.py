"""Tensor parallelism (engine.tp, models.shard): N processes on this machine (gloo), each holding its
heads' slice of the model and of the KV cache, give the tokens of one process.

Each engine here is shut down at the end of its test: the process group is one per process, and the
next engine makes its own."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.config import ModelConfig
from kvserve.models.shard import check_tp, shard_config, shard_weights

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village by the sea,"]


def _run(path: str, n: int, prompts=PROMPTS, max_tokens: int = 10, prompt_logprobs: int | None = None,
         **kw) -> tuple[list, dict]:
    llm = LLM(path, dtype="float32", quantization="none", tensor_parallel_size=n, **kw)
    try:
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, prompt_logprobs=prompt_logprobs)
        out = llm.generate(prompts, sp, use_tqdm=False)
        llm.engine.kv_manager.check_integrity()
        return out, llm.cache_stats()
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tokenizer):
    """A random-init Llama whose heads (4 query, 2 KV) and MLP (128) divide by 2."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=False, initializer_range=0.1)
    path = tmp_path_factory.mktemp("tiny-llama")
    T.LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_tp2_equals_tp1_tokens_and_logits(tiny_llama, kv_cache_dtype):
    kw = dict(max_model_len=256, kv_cache_dtype=kv_cache_dtype, prompt_logprobs=1)
    one, s1 = _run(tiny_llama, 1, **kw)
    two, s2 = _run(tiny_llama, 2, **kw)
    for a, b in zip(one, two):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        diff = max(abs(x[t] - y[t]) for x, y, t in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], a.prompt_token_ids[1:]))
        assert diff < 1e-4
    # each rank's pool holds its own KV head: half the bytes per token, the same in all
    assert s2["kv_bytes_per_token"] * 2 == s1["kv_bytes_per_token"] == s2["kv_bytes_per_token_all_ranks"]
    assert s2["tensor_parallel_size"] == 2


def test_smollm2_tp3_equals_tp1_through_preemption_and_prefix_hits():
    """SmolLM2: 9 query heads and 3 KV heads, so 3 ranks of 3 + 1. A 9-block pool preempts; the
    prompts repeated hit the prefix cache."""
    kw = dict(max_model_len=96, num_kv_blocks=10, max_tokens=16)
    one, s1 = _run("smollm2-135m", 1, PROMPTS * 2, **kw)
    three, s3 = _run("smollm2-135m", 3, PROMPTS * 2, **kw)
    assert [o.outputs[0].token_ids for o in one] == [o.outputs[0].token_ids for o in three]
    assert s3["preemptions"] > 0 and s3["prefix_cache_hits"] > 0
    assert s3["kv_bytes_per_token"] * 3 == s1["kv_bytes_per_token"]


def test_gemma3_replicates_its_one_kv_head_and_mixtral_shards_its_experts(tmp_path, tokenizer):
    """Gemma 3 (1 KV head, sliding layers) over 2 ranks: each rank keeps the KV head, so bytes per token
    per rank stay whole; a tiny Mixtral splits every expert by its width."""
    import transformers as T

    prompts = PROMPTS[:2]
    one, s1 = _run("gemma3-270m", 1, prompts, max_model_len=256, num_kv_blocks=128)
    two, s2 = _run("gemma3-270m", 2, prompts, max_model_len=256, num_kv_blocks=128)
    assert [o.outputs[0].token_ids for o in one] == [o.outputs[0].token_ids for o in two]
    assert s2["kv_bytes_per_token"] == s1["kv_bytes_per_token"]

    torch.manual_seed(0)
    moe = T.MixtralForCausalLM(T.MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
        tie_word_embeddings=False, initializer_range=0.1))
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if name.endswith("gate.weight") and p.shape[0] == 8:
                p.normal_(0.0, 1.0)  # decisive routing: a near-tie would let rounding pick the expert
    moe.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    one, _ = _run(str(tmp_path), 1, max_model_len=256)
    two, _ = _run(str(tmp_path), 2, max_model_len=256)
    for a, b in zip(one, two):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_refusals_name_the_reason():
    with pytest.raises(ValueError, match="9 query heads do not divide by 2.*Sizes that work: 3"):
        LLM("smollm2-135m", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="preemption_mode='swap'"):
        LLM("smollm2-135m", tensor_parallel_size=3, preemption_mode="swap")
    with pytest.raises(ValueError, match="kv_compression"):
        LLM("smollm2-135m", tensor_parallel_size=3, kv_compression="snapkv:0.5")


def test_shards_put_back_together_are_the_weights():
    """Rank slices of q/k/v, o, gate/up and down, concatenated over the ranks, are the full matrices."""
    cfg = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=6, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=2, rope_theta=1e4, rms_norm_eps=1e-6, max_position_embeddings=16)
    g = torch.Generator().manual_seed(0)
    w = {f"layers.0.{n}": torch.randn(*s, generator=g) for n, s in [
        ("q_proj", (8, 8)), ("k_proj", (4, 8)), ("v_proj", (4, 8)), ("o_proj", (8, 8)), ("gate_proj", (6, 8)),
        ("up_proj", (6, 8)), ("down_proj", (8, 6)), ("input_norm", (8,)), ("post_attn_norm", (8,))]}
    w |= {"embed": torch.randn(10, 8), "norm": torch.ones(8)}
    check_tp(cfg, 2)
    parts = [shard_weights(w, cfg, r, 2) for r in range(2)]
    part_cfg = shard_config(cfg, 0, 2)
    assert (part_cfg.num_heads, part_cfg.num_kv_heads, part_cfg.intermediate_size) == (2, 1, 3)
    q, k, v = zip(*(p["layers.0.qkv_proj"].split([4, 2, 2]) for p in parts))
    assert torch.equal(torch.cat(q), w["layers.0.q_proj"]) and torch.equal(torch.cat(k), w["layers.0.k_proj"])
    assert torch.equal(torch.cat(v), w["layers.0.v_proj"])
    assert torch.equal(torch.cat([p["layers.0.o_proj"] for p in parts], 1), w["layers.0.o_proj"])
    gate, up = zip(*(p["layers.0.gate_up_proj"].chunk(2) for p in parts))
    assert torch.equal(torch.cat(gate), w["layers.0.gate_proj"]) and torch.equal(torch.cat(up), w["layers.0.up_proj"])
    assert torch.equal(torch.cat([p["layers.0.down_proj"] for p in parts], 1), w["layers.0.down_proj"])
    assert parts[1]["embed"] is w["embed"]  # replicated
    with pytest.raises(ValueError, match="do not know how to shard layers.0.mystery"):
        shard_weights(w | {"layers.0.mystery": torch.ones(1)}, cfg, 0, 2)


def test_a_dead_worker_fails_the_step_clearly_and_no_worker_outlives_rank0(tiny_llama):
    llm = LLM(tiny_llama, dtype="float32", max_model_len=256, tensor_parallel_size=2)
    try:
        sp = SamplingParams(temperature=0, max_tokens=4)
        llm.generate(["hello"], sp, use_tqdm=False)
        worker = llm.engine.tp.workers[0]
        worker.kill()
        worker.join()
        with pytest.raises(RuntimeError, match="tensor-parallel worker rank 1 exited"):
            llm.generate(["hello again"], sp, use_tqdm=False)
    finally:
        llm.shutdown()
    # rank 0 killed outright (SIGKILL: no atexit, no shutdown): its worker goes with it
    code = ("import os, sys\nfrom kvserve import LLM\nif __name__ == '__main__':\n"
            f"    llm = LLM({tiny_llama!r}, dtype='float32', max_model_len=256, tensor_parallel_size=2)\n"
            "    print(llm.engine.tp.workers[0].pid, flush=True)\n    sys.stdin.read()\n")
    rank0 = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    worker_pid = int(rank0.stdout.readline())
    rank0.kill()
    rank0.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(worker_pid):
        time.sleep(0.2)
    assert not _alive(worker_pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
