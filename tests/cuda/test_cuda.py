"""The same engine on a GPU: skipped where torch sees none."""
from __future__ import annotations

import pytest
import torch

from kvserve import SamplingParams
from tests.conftest import PROMPTS, make_llm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.mark.parametrize("kv_cache", ["paged", "contiguous"])
def test_cuda_greedy_equals_cpu(kv_cache, llm_contiguous):
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    gpu = make_llm(kv_cache=kv_cache, device="cuda", dtype="float32")
    assert gpu.engine.kv_cache.device.type == "cuda"
    cpu_out = [o.outputs[0].token_ids for o in llm_contiguous.generate(PROMPTS, sp)]
    gpu_out = [o.outputs[0].token_ids for o in gpu.generate(PROMPTS, sp)]
    # fp32 on different hardware: allow a late divergence, demand a long common prefix
    for a, b in zip(cpu_out, gpu_out):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        assert same >= 16


def test_cuda_bf16_runs_and_stops():
    llm = make_llm(device="cuda", dtype="bfloat16")
    out = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16))
    assert all(o.outputs[0].token_ids for o in out)
    assert llm.cache_stats()["blocks_used"] == 0


def test_cpu_tensor_into_cuda_cache_is_a_clear_error():
    llm = make_llm(device="cuda")
    e = llm.engine
    k = torch.zeros(1, e.model_config.num_kv_heads, e.model_config.head_dim)
    with pytest.raises(RuntimeError, match="cache is on cuda"):
        e.kv_cache.write(0, k, k, torch.zeros(1, dtype=torch.long, device="cuda"))


@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3", "int4"])
def test_cuda_quantized_kv_follows_the_cpu_engine(kind):
    """On CUDA a quantized cache is written (quantize) and read (dequantize, then SDPA) in PyTorch:
    greedy tokens follow the same quantized cache on the CPU for a long common prefix."""
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    gpu = make_llm(kv_cache_dtype=kind, device="cuda", dtype="float32", num_kv_blocks=128)
    assert gpu.engine.kv_cache.k.device.type == "cuda" and gpu.engine.kv_spec.quant == kind
    cpu = make_llm(kv_cache_dtype=kind, dtype="float32", num_kv_blocks=128)
    for a, b in zip(*[[o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp)] for llm in (cpu, gpu)]):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        assert same >= 8
    gpu.engine.kv_manager.check_integrity()
