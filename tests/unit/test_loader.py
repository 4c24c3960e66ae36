"""The loader's memory and disk behaviour: weights are not kept alive by a cache, a converted GGUF file
is reused from disk (and rebuilt when damaged), and importing kvserve changes no process-wide setting."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref

import pytest
import torch

from kvserve.models import loader


@pytest.fixture
def src():
    return loader.resolve_model("smollm2-135m")


def test_weights_are_freed_with_their_owner(src):
    """load_weights used to be lru_cached: every engine's weights stayed alive after the engine was gone."""
    _, w1 = loader.load_weights(src, torch.float32)
    _, w2 = loader.load_weights(src, torch.float32)
    assert w1["embed"] is not w2["embed"] and torch.equal(w1["embed"], w2["embed"])
    ref = weakref.ref(w1["embed"])
    del w1
    gc.collect()
    assert ref() is None


def test_disk_cache_is_reused_and_rebuilt_when_damaged(src, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(loader.CACHE_ENV, str(tmp_path))
    cfg, fresh = loader.load_weights(src, torch.bfloat16)  # converts, then writes the entry
    (entry,) = tmp_path.iterdir()
    (weights_file,) = entry.glob("weights-bfloat16-*.safetensors")
    cfg2, cached = loader.load_weights(src, torch.bfloat16)  # maps the file
    assert cfg2 == cfg and fresh.keys() == cached.keys()
    assert all(torch.equal(fresh[k], cached[k]) for k in fresh)
    assert loader.load_model_config(src) == cfg
    weights_file.write_bytes(weights_file.read_bytes()[:1000])  # a truncated file
    with caplog.at_level("WARNING", logger="kvserve"):
        _, rebuilt = loader.load_weights(src, torch.bfloat16)
    assert "unreadable" in caplog.text
    assert torch.equal(rebuilt["embed"], fresh["embed"])
    assert weights_file.stat().st_size > 1000  # replaced by a whole entry


def test_a_first_start_parses_the_gguf_header_once(src, tmp_path, monkeypatch):
    """With nothing converted yet, the engine reads the config (to choose the weight setting) and then the
    weights: one parse of the header serves both (each takes seconds: the vocabulary, item by item)."""
    monkeypatch.setenv(loader.CACHE_ENV, str(tmp_path))
    loader.load_model_config.cache_clear()
    loader._gguf_reader.cache_clear()
    cfg = loader.load_model_config(src)
    cfg2, _ = loader.load_weights(src, torch.bfloat16)
    assert cfg2 == cfg
    assert loader._gguf_reader.cache_info().misses == 1


def test_cache_can_be_turned_off(src, monkeypatch):
    monkeypatch.setenv(loader.CACHE_ENV, "off")
    assert loader.cache_dir() is None and loader._cache_entry(src) is None


def _env_after_import(first: str) -> list[str]:
    code = (f"import os; {first}; import kvserve; "
            "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), os.environ.get('HF_HUB_OFFLINE'))")
    env = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "HF_HUB_OFFLINE")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


def test_import_sets_only_what_torch_has_not_read_yet():
    """THP_MEM_ALLOC_ENABLE is read by torch once, when it loads: kvserve sets it only before that, and
    sets nothing else (HF_HUB_OFFLINE used to be set for the whole process at the first load)."""
    assert _env_after_import("pass") == ["1", "None"]
    assert _env_after_import("import torch") == ["None", "None"]
