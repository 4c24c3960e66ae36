"""The ``kvserve`` CLI's config-only subcommands: no weights are read."""
from __future__ import annotations

import json

import pytest
import torch

from kvserve.cli import main
from kvserve.config import CacheConfig, SchedulerConfig
from kvserve.engine.llm_engine import plan_kv_pool
from kvserve.kv.manager import cdiv
from kvserve.kv.spec import KVSpec
from kvserve.models.loader import MODEL_ALIASES, load_model_config, resolve_model

# SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64
FP32_FORMULA_1024x4 = 2 * 30 * 3 * 64 * 1024 * 4 * 4


@pytest.fixture(scope="module")
def cfg():
    return load_model_config(resolve_model("smollm2-135m"))


def run_json(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_load_model_config_reads_metadata(cfg):
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.hidden_size == 576 and cfg.vocab_size == 49152 and cfg.tie_word_embeddings


def test_estimate_paged_json(capsys, cfg):
    e = run_json(capsys, "estimate", "--model", "smollm2-135m", "--seq-len", "1024", "--batch", "4", "--json")
    assert e["formula_bytes"] == FP32_FORMULA_1024x4
    spec = KVSpec.from_model(cfg, torch.float32)
    assert e["bytes_per_token"] == spec.bytes_per_token == 2 * 30 * 3 * 64 * 4
    num_blocks, block_size = plan_kv_pool(
        spec, CacheConfig("paged", 16, num_kv_blocks=4 * cdiv(1024, 16) + 1),
        SchedulerConfig(max_num_seqs=4, max_model_len=1024))
    assert (e["num_blocks"], e["block_size"]) == (num_blocks, block_size) == (4 * 64 + 1, 16)
    assert e["allocated_bytes"] == num_blocks * block_size * spec.bytes_per_token
    # the formula plus exactly the null block (1024 is a whole number of blocks)
    assert e["allocated_bytes"] == FP32_FORMULA_1024x4 + 16 * spec.bytes_per_token
    budget = 4 << 30
    assert e["max_batch_at_seq"] == budget // (spec.bytes_per_token * 1024)
    assert e["max_seq_at_batch"] == budget // (spec.bytes_per_token * 4)
    assert e["max_batch_table"]["8192"] == budget // (spec.bytes_per_token * 8192)


def test_estimate_contiguous_bf16_and_rounding(capsys, cfg):
    e = run_json(capsys, "estimate", "--seq-len", "1000", "--batch", "3", "--dtype", "bfloat16",
                 "--kv-cache", "contiguous", "--json")
    bpt = 2 * 30 * 3 * 64 * 2
    assert e["formula_bytes"] == bpt * 1000 * 3
    assert (e["num_blocks"], e["block_size"]) == (3 + 1, 1000)  # (B + 1) slots of S tokens: +1 is the null block
    assert e["allocated_bytes"] == 4 * 1000 * bpt
    e = run_json(capsys, "estimate", "--seq-len", "1000", "--batch", "3", "--block-size", "16", "--json")
    assert e["num_blocks"] == 3 * 63 + 1  # 1000 tokens round up to 63 blocks of 16
    assert e["allocated_bytes"] == e["num_blocks"] * 16 * e["bytes_per_token"]


def test_estimate_text_writes_the_formula(capsys):
    assert main(["estimate", "--seq-len", "1024", "--batch", "4", "--memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert f"2 * 30 * 3 * 64 * 1024 * 4 * 4 = {FP32_FORMULA_1024x4:,} bytes = 180.00 MiB" in out
    assert "null block" in out
    for s in ("512", "1024", "2048", "4096", "8192"):
        assert s in out


def test_info(capsys):
    assert main(["info", "--model", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert "layers" in out and "30" in out
    assert "kv heads" in out
    assert "46,080 bytes" in out and "23,040 bytes" in out  # KV per token, fp32 and bf16


def test_info_json(capsys, cfg):
    i = run_json(capsys, "info", "--json")
    assert i["num_params"] == cfg.num_params()
    assert i["gqa_group_size"] == 3 and i["context_length"] == cfg.max_position_embeddings


def info_with_capability(capability: str | None) -> dict:
    """``kvserve info --json`` in a fresh process, with torch held to ``capability`` (ATEN_CPU_CAPABILITY)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    out = subprocess.run([sys.executable, "-m", "kvserve.cli", "info", "--json"], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return json.loads(out)


def test_info_default_follows_torchs_instruction_set():
    """The default dtype follows the instruction set torch runs: held to AVX2 (what an AVX2-only CPU
    runs), bf16 matmuls are slow, so fp32; the Q4_1 file keeps its 4 bits (int4) either way."""
    i = info_with_capability("avx2")
    assert i["cpu_capability"] == "AVX2"
    assert (i["default_dtype"], i["default_quantization"]) == ("float32", "int4")


@pytest.mark.parametrize("cmd", [["info"], ["estimate", "--seq-len", "8", "--batch", "1"]])
def test_unknown_model_exits_2_with_aliases(capsys, cmd):
    assert main([cmd[0], "--model", "no-such-model", *cmd[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'no-such-model'")
    assert "Traceback" not in err
    for alias in MODEL_ALIASES:
        assert alias in err


def test_usage_errors_return_2(capsys):
    assert main(["estimate", "--seq-len", "8"]) == 2  # --batch is required
    assert main(["estimate", "--seq-len", "0", "--batch", "1"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main([]) == 2  # a subcommand is required


def test_generate_unknown_model_exits_2(capsys):
    assert main(["generate", "hello", "--model", "no-such-model"]) == 2  # fails before any weight is read
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model") and "Traceback" not in err
