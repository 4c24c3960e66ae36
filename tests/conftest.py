"""Shared fixtures. Model-backed fixtures are session-scoped: the weights are read once per run."""
from __future__ import annotations

import os
# Before torch loads: OpenMP threads that busy-wait make a 2-core machine crawl when test processes
# (the server, the client) share it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.manual_seed(0)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "To make a cup of tea, first",
]


@pytest.fixture(scope="session")
def model_src():
    from kvserve.models.loader import resolve_model

    return resolve_model("smollm2-135m")


def load_hf_model(src):
    """HF transformers' fp32 model for the same GGUF file: the reference every cache path is tested against."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(src.path.parent), gguf_file=src.path.name, dtype=torch.float32)
    m.eval()
    return m


@pytest.fixture(scope="session")
def hf_model(model_src):
    return load_hf_model(model_src)


@pytest.fixture(scope="session")
def tokenizer(model_src):
    from kvserve.models.loader import load_tokenizer

    return load_tokenizer(model_src)


def run_in_steps(llm, prompt, params, watch=None):
    """Run one request step by step: (its final output, the most blocks the pool held at once), with
    ``check_integrity()`` after every step and the pool empty at the end. ``watch(request_kv, request)``
    sees the request's KV state after each step."""
    e = llm.engine
    rid = e.add_request(prompt, params)
    most, out = 0, None
    while e.has_unfinished_requests():
        for o in e.step():
            out = o
        most = max(most, e.kv_manager.pool.num_used)
        e.kv_manager.check_integrity()
        if watch is not None and rid in e.kv_manager.requests:
            watch(e.kv_manager.requests[rid], e.requests[rid])
    assert out.request_id == rid and e.kv_manager.pool.num_used == 0
    return out, most


def make_llm(**kw):
    from kvserve import LLM

    kw.setdefault("dtype", "float32")
    kw.setdefault("quantization", "none")  # the exact weights: the cache paths are compared with HF and recompute
    kw.setdefault("max_model_len", 512)
    return LLM("smollm2-135m", **kw)


@pytest.fixture(scope="session")
def llm_contiguous():
    return make_llm(kv_cache="contiguous", max_num_seqs=8)


@pytest.fixture(scope="session")
def llm_off():
    return make_llm(kv_cache="off", max_num_seqs=8)


@pytest.fixture(scope="session")
def llm_paged():
    return make_llm(kv_cache="paged", num_kv_blocks=256)
