"""Configuration dataclasses: what the model is, how its KV cache is laid out, how the scheduler batches.

Validation lives in ``__post_init__`` so a bad value fails where it is written, with a message that names it.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import torch


class _StrEnum(str, enum.Enum):
    """Members equal, print and serialize as their value: ``KVCacheMode.PAGED == "paged"``."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return self.value.__format__(spec)


class KVCacheMode(_StrEnum):
    """How KV memory is laid out (see ``CacheConfig``)."""

    PAGED = "paged"
    CONTIGUOUS = "contiguous"
    OFF = "off"


class PreemptionMode(_StrEnum):
    """What happens to a running request when the cache is full."""

    RECOMPUTE = "recompute"  # drop its KV; it runs its tokens again when readmitted
    SWAP = "swap"  # copy its blocks to a CPU pool and back


def _enum(cls: type[enum.Enum], name: str, value):
    """``value`` as a member of ``cls``, or a ValueError that lists the accepted values."""
    try:
        return cls(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {[m.value for m in cls]}, got {value!r}") from None


KV_CACHE_MODES = tuple(m.value for m in KVCacheMode)
PREEMPTION_MODES = tuple(m.value for m in PreemptionMode)
# What ``kv_cache_dtype`` accepts. "auto" is the model's dtype; a 16/32-bit name must equal the model's
# dtype (the cache stores K/V as the model computes them). The quantized formats (``kv/quant.py``) store
# codes plus one float16 scale per token and KV head; "fp8" is vLLM's name for fp8_e4m3.
KV_CACHE_QUANT_DTYPES = ("int8", "int4", "fp8_e4m3", "fp8_e5m2")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", *KV_CACHE_QUANT_DTYPES, "fp8")


@dataclass
class ModelConfig:
    """Architecture of a decoder, read from GGUF metadata or a HF config.json.

    The families differ in a few switches, all off for Llama (and SmolLM2, Qwen2):

    - Gemma 3: ``layer_types`` ("sliding" layers attend to the last ``sliding_window`` positions,
      themselves included, and rotate with ``rope_local_theta``; "full" layers see everything and use
      ``rope_theta``), ``qk_norm`` (RMSNorm over each head's q and k before RoPE), ``sandwich_norms``
      (the attention and MLP outputs are normalized again before the residual add), ``hidden_act``
      "gelu_tanh" and ``scale_embeddings`` (embeddings times sqrt(hidden_size)).
    - Mixture of experts (Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE; ``models/moe.py``): ``num_experts`` > 0
      replaces the MLP of every layer not in ``dense_layers`` by a router over ``num_experts`` SwiGLU
      experts of width ``moe_intermediate_size``, ``num_experts_per_tok`` of them per token, their
      weights ``router_act``-ed and (``norm_topk_prob``) renormalized over the top k; plus, when
      ``shared_expert_intermediate_size``, one expert every token goes through (Qwen2-MoE: scaled by a
      sigmoid gate). Attention, and so the KV cache, is the same as a dense model's.
      ``qk_norm_over`` "all" is OLMoE's QK-norm: over the whole q and k projections, not per head."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"
    attention_bias: bool = False  # q/k/v projections add a bias (Qwen2; Llama's config.json attention_bias)
    # per layer "full" | "sliding"; None: every layer full
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None  # positions a sliding layer's query sees, its own included
    rope_local_theta: float | None = None  # RoPE base of sliding layers (None: rope_theta)
    qk_norm: bool = False
    sandwich_norms: bool = False
    hidden_act: str = "silu"  # "silu" (SwiGLU) | "gelu_tanh" (GeGLU)
    scale_embeddings: bool = False
    qk_norm_over: str = "head"  # "head" (Qwen3, Gemma 3) | "all" (OLMoE)
    num_experts: int = 0  # 0: a dense model
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None  # each expert's width (None: intermediate_size)
    norm_topk_prob: bool = True
    router_act: str = "softmax"  # "softmax" | "sigmoid" (over all experts, before the top k)
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # the shared expert's output times sigmoid(x . w) (Qwen2-MoE)
    dense_layers: tuple[int, ...] = ()  # layers that keep the dense MLP in a MoE model (Qwen's mlp_only_layers)
    # how the file stores the layers' matrices: a GGUF type ("Q4_1", "Q8_0", "F16", ...), the most common
    # among them; None for float checkpoints (HF folders). quantization="auto" keeps it (llm_engine)
    weight_format: str | None = None

    def __post_init__(self) -> None:
        self.dense_layers = tuple(self.dense_layers)
        if self.num_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok must be 1..num_experts ({self.num_experts}), got {self.num_experts_per_tok}")
            if self.router_act not in ("softmax", "sigmoid"):
                raise ValueError(f"router_act must be 'softmax' or 'sigmoid', got {self.router_act!r}")
        if self.qk_norm_over not in ("head", "all"):
            raise ValueError(f"qk_norm_over must be 'head' or 'all', got {self.qk_norm_over!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)  # a list when read back from JSON
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= {"full", "sliding"}:
                raise ValueError(f"layer_types: one of 'full' / 'sliding' per layer, got {self.layer_types}")
            if "sliding" in self.layer_types and not self.sliding_window:
                raise ValueError("sliding layers need a sliding_window")
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ValueError(f"hidden_act must be 'silu' or 'gelu_tanh', got {self.hidden_act!r}")

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types is not None and self.layer_types[layer] == "sliding"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_moe(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    @property
    def expert_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    def num_params(self, active: bool = False) -> int:
        """All parameters, or (``active``) those one token runs through: of each MoE layer's experts only
        the top k (the router and the shared expert always)."""
        H = self.hidden_size
        attn = (H + self.attention_bias) * (self.q_size + 2 * self.kv_size) + self.q_size * H
        qk = (self.q_size + self.kv_size) if self.qk_norm_over == "all" else 2 * self.head_dim
        norms = (4 if self.sandwich_norms else 2) * H + (qk if self.qk_norm else 0)
        experts = self.num_experts_per_tok if active else self.num_experts
        moe = (experts * 3 * H * self.expert_size + self.num_experts * H
               + 3 * H * self.shared_expert_intermediate_size + H * self.shared_expert_gate)
        mlp = sum(moe if self.is_moe(i) else 3 * H * self.intermediate_size for i in range(self.num_layers))
        emb = self.vocab_size * H * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + norms) + mlp + emb + H


def parse_bytes(value: str | int | float) -> int:
    """'1GiB', '512MiB', '2GB', 1e9 -> bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", value, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse a memory size from {value!r} (try '1GiB' or '512MiB')")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary or not unit else 1000
    return int(number * base ** " KMGT".index(unit or " "))


@dataclass
class CacheConfig:
    """How KV memory is laid out.

    * ``paged``: a pool of ``block_size``-token blocks shared by all requests (vLLM's PagedAttention).
    * ``contiguous``: the seeds' preallocated cache: one block of ``max_model_len`` tokens per sequence slot,
      i.e. paged with one block per sequence, so the same write/read code serves both.
    * ``off``: no reuse at all: every step recomputes the whole sequence (the O(n^2) reference).
    """

    kv_cache: KVCacheMode | str = KVCacheMode.PAGED
    block_size: int = 16
    kv_cache_memory: int | str | None = None  # bytes for the pool (paged); default 1 GiB
    num_kv_blocks: int | None = None  # overrides kv_cache_memory
    kv_cache_dtype: str | torch.dtype | None = None  # None / "auto": the model dtype (see KV_CACHE_DTYPES)
    enable_prefix_caching: bool | None = None  # default: on for paged, off otherwise
    preemption_mode: PreemptionMode | str = PreemptionMode.RECOMPUTE
    swap_space: int | str = "2GiB"
    # "full": a request keeps every token's K/V. "sink_window" (StreamingLLM): keep the first
    # num_sink_tokens tokens (rounded up to whole blocks) and the last sink_window, drop the blocks in
    # between as they leave the window, and count positions within the cache (kv.manager)
    kv_cache_policy: str = "full"
    num_sink_tokens: int = 4
    sink_window: int | None = None
    # KV tiers below the pool (kv.tiers): blocks the prefix tree evicts go to a host pool of
    # kv_offload_memory bytes, then to kv_cache_dir (at most kv_cache_dir_size bytes; also written
    # through as computed, so prefixes survive a restart). Each is off unless set.
    kv_offload_memory: int | str | None = None
    kv_cache_dir: str | None = None
    kv_cache_dir_size: int | str = "20GiB"
    # importance-based KV compression (kv.compress) for every request that does not ask otherwise:
    # "snapkv:0.5", {"method": ..., "ratio": ...} or a KVCompression
    kv_compression: object = None

    def key_moves_refused(self) -> str | None:
        """Why cached keys cannot move to new positions here (the sink_window policy, a request's
        context_overflow="shift"), or None. Moving re-rotates them in the paged pool, in place."""
        if self.kv_cache != KVCacheMode.PAGED:
            return "re-rotates cached keys in the block pool: it needs kv_cache='paged'"
        if self.kv_cache_dtype != "auto":
            return "re-rotates cached keys: it needs an unquantized cache (kv_cache_dtype='auto')"
        return None

    def __post_init__(self) -> None:
        self.kv_cache = _enum(KVCacheMode, "kv_cache", self.kv_cache)
        self.preemption_mode = _enum(PreemptionMode, "preemption_mode", self.preemption_mode)
        if isinstance(self.kv_cache_dtype, torch.dtype):
            self.kv_cache_dtype = str(self.kv_cache_dtype).removeprefix("torch.")
        if self.kv_cache_dtype in (None, "auto"):
            self.kv_cache_dtype = "auto"
        elif self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        elif self.kv_cache_dtype == "fp8":
            self.kv_cache_dtype = "fp8_e4m3"
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be >= 2 (one is the null block), got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
        self.swap_space = parse_bytes(self.swap_space)
        if self.kv_cache_policy not in ("full", "sink_window"):
            raise ValueError(f"kv_cache_policy must be 'full' or 'sink_window', got {self.kv_cache_policy!r}")
        if self.kv_cache_policy == "sink_window":
            if self.sink_window is None or self.sink_window < self.block_size:
                raise ValueError(f"kv_cache_policy='sink_window' needs sink_window >= block_size ({self.block_size}), "
                                 f"got {self.sink_window}")
            if self.num_sink_tokens < 0:
                raise ValueError(f"num_sink_tokens must be >= 0, got {self.num_sink_tokens}")
            if self.key_moves_refused():
                raise ValueError(f"kv_cache_policy='sink_window' {self.key_moves_refused()}")
            if self.enable_prefix_caching:
                raise ValueError("kv_cache_policy='sink_window' moves cached keys to new positions: "
                                 "turn prefix caching off")
            self.enable_prefix_caching = False
        if self.enable_prefix_caching is None:
            self.enable_prefix_caching = self.kv_cache == KVCacheMode.PAGED
        if self.enable_prefix_caching and self.kv_cache != KVCacheMode.PAGED:
            raise ValueError("enable_prefix_caching needs kv_cache='paged'")
        from kvserve.kv.compress import KVCompression

        self.kv_compression = KVCompression.parse(self.kv_compression)
        if self.kv_offload_memory is not None:
            self.kv_offload_memory = parse_bytes(self.kv_offload_memory)
        self.kv_cache_dir_size = parse_bytes(self.kv_cache_dir_size)
        if (self.kv_offload_memory or self.kv_cache_dir) and not self.enable_prefix_caching:
            raise ValueError("KV tiers (kv_offload_memory, kv_cache_dir) hold prefix-cache blocks: they need "
                             "kv_cache='paged' with prefix caching on")


@dataclass
class SchedulerConfig:
    """Per-step limits: how many sequences run at once and how many tokens one forward may hold."""

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            # Without chunking a whole prompt must fit one step's budget.
            self.max_num_batched_tokens = self.max_model_len
