"""The engine's settings, defined once: ``LLM(...)``'s keyword arguments, the CLI flags, the engine config.

    args = EngineArgs(model="smollm2-135m", kv_cache="contiguous", max_model_len=512)
    llm = LLM(**asdict(args))                   # or LLM.from_engine_args(args)
    EngineArgs.add_cli_args(parser)             # --model, --kv-cache, --max-model-len, ... (one per field)
    args = EngineArgs.from_cli_args(parser.parse_args(argv))
    config = args.create_engine_config()        # -> EngineConfig(CacheConfig, SchedulerConfig)

Every field is one flag named after it (``kv_cache_memory`` -> ``--kv-cache-memory``), except the
switches: ``--enable-prefix-caching`` / ``--no-prefix-caching`` and ``--no-chunked-prefill``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Iterable

from kvserve.config import KV_CACHE_DTYPES, KV_CACHE_MODES, PREEMPTION_MODES
from kvserve.models.layers import QUANTIZATIONS
from kvserve.models.loader import DEFAULT_MODEL, MODEL_ALIASES

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")


@dataclass
class EngineArgs:
    """What ``LLM(...)`` takes: the model, how it runs, how its KV cache is laid out, how it batches."""

    model: str = DEFAULT_MODEL  # an alias, a .gguf file or a HF folder
    dtype: str = "auto"  # weights and activations; auto: bf16 on CUDA or a CPU with fast bf16, else fp32
    device: str | None = None  # None: cpu
    quantization: str | None = "auto"  # "auto" | "none" | "int8" | "w8a8" | "w8a8-channel" | "int4": EngineConfig
    kv_cache: str = "paged"  # paged | contiguous | off
    block_size: int = 16  # tokens per paged block
    kv_cache_memory: str | int | None = None  # paged pool size ("256MiB"); None: 1 GiB
    num_kv_blocks: int | None = None  # pool size in blocks, the null block included; beats kv_cache_memory
    kv_cache_dtype: str = "auto"  # auto: the model's dtype
    enable_prefix_caching: bool | None = None  # None: on for paged, off otherwise
    preemption_mode: str = "recompute"  # recompute | swap
    swap_space: str | int = "2GiB"  # CPU pool for swapped-out blocks
    kv_cache_policy: str = "full"  # full | sink_window (StreamingLLM: sinks + the last sink_window tokens)
    num_sink_tokens: int = 4
    sink_window: int | None = None
    kv_offload_memory: str | int | None = None  # tier 2: a host pool for blocks the prefix tree evicts ("8GiB")
    kv_cache_dir: str | None = None  # tier 3: a directory of blocks (written through; survives restarts)
    kv_cache_dir_size: str | int = "20GiB"
    kv_compression: str | dict | None = None  # default per request: "snapkv:0.5" (kv.compress)
    max_model_len: int | None = None  # None: the model's context length
    max_num_seqs: int = 16  # sequences running at once
    max_num_batched_tokens: int = 512  # tokens in one forward
    enable_chunked_prefill: bool = True
    seed: int | None = None  # seed of the sampler's random stream
    tensor_parallel_size: int = 1  # processes the model and its KV cache are split over, by heads

    # ------------------------------------------------------------------ config
    def create_engine_config(self):
        """The one conversion of these arguments into ``EngineConfig`` (with its cache and scheduler configs)."""
        from kvserve.config import CacheConfig, SchedulerConfig
        from kvserve.engine.llm_engine import EngineConfig

        cache = CacheConfig(
            kv_cache=self.kv_cache, block_size=self.block_size, kv_cache_memory=self.kv_cache_memory,
            num_kv_blocks=self.num_kv_blocks,
            kv_cache_dtype=None if self.kv_cache_dtype == "auto" else self.kv_cache_dtype,
            enable_prefix_caching=self.enable_prefix_caching, preemption_mode=self.preemption_mode,
            swap_space=self.swap_space, kv_cache_policy=self.kv_cache_policy, num_sink_tokens=self.num_sink_tokens,
            sink_window=self.sink_window, kv_offload_memory=self.kv_offload_memory, kv_cache_dir=self.kv_cache_dir,
            kv_cache_dir_size=self.kv_cache_dir_size, kv_compression=self.kv_compression)
        # max_model_len None: the engine fills in the model's context length once it has read the model
        sched = SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                                max_model_len=self.max_model_len or 1,
                                enable_chunked_prefill=self.enable_chunked_prefill)
        return EngineConfig(model=self.model, dtype=self.dtype, device=self.device, quantization=self.quantization,
                            seed=self.seed, max_model_len=self.max_model_len, cache=cache, scheduler=sched,
                            tensor_parallel_size=self.tensor_parallel_size)

    # ------------------------------------------------------------------ command line
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, only: Iterable[str] | None = None,
                     **defaults) -> argparse.ArgumentParser:
        """Add the engine flags to ``parser`` in an "engine" group: all of them, or the fields named in
        ``only``. ``defaults`` overrides a field's default for this parser (``max_num_seqs=1``)."""
        names = {f.name for f in fields(EngineArgs)}
        unknown = (set(only or ()) | set(defaults)) - names
        if unknown:
            raise ValueError(f"not EngineArgs fields: {sorted(unknown)}")
        keep = names if only is None else set(only)
        base = EngineArgs(**defaults)
        g = parser.add_argument_group("engine")

        def add(name: str, *flags: str, **kw) -> None:
            if name in keep:
                kw.setdefault("default", getattr(base, name))
                g.add_argument(*(flags or ("--" + name.replace("_", "-"),)), dest=name, **kw)

        add("model", help=f"model alias ({', '.join(sorted(MODEL_ALIASES))}), a .gguf file or a HF folder "
                          "(default: %(default)s)")
        add("dtype", choices=DTYPES, help="weights and KV dtype; auto: bf16 on CUDA or a CPU with fast bf16, else "
                                          "fp32 (default: %(default)s)")
        add("device", choices=DEVICES, help="default: cpu")
        add("quantization", choices=["auto", "none"] + [q for q in QUANTIZATIONS if q],
            help="auto: the file's own (a 4-bit GGUF runs int4 on the CPU; `kvserve info` says what and why); "
                 "none: the model dtype (exact, as HF); int8: weight-only; w8a8: int8 weights and activations per "
                 "block of 32, rotated (llama.cpp's Q8_0 arithmetic; CPU); w8a8-channel: int8 weights per row x "
                 "int8 activations per token in fbgemm (fast batches; CPU); int4: 4-bit codes with a scale and "
                 "zero per 32 weights (a Q4_1 GGUF's own values; CPU) (default: %(default)s)")
        add("kv_cache", choices=KV_CACHE_MODES,
            help="paged block pool, the seeds' contiguous cache, or none (recompute) (default: %(default)s)")
        add("block_size", type=int, help="paged block size in tokens (default: %(default)s)")
        add("kv_cache_memory", help="paged pool size, e.g. 256MiB (default: 1GiB)")
        add("num_kv_blocks", type=int, help="paged pool size in blocks, the null block included "
                                            "(overrides --kv-cache-memory)")
        add("kv_cache_dtype", choices=KV_CACHE_DTYPES, help="KV cache dtype (default: %(default)s: the model's)")
        add("enable_prefix_caching", "--enable-prefix-caching", action="store_const", const=True,
            help="default: on with the paged cache, off otherwise")
        add("enable_prefix_caching", "--no-prefix-caching", action="store_const", const=False,
            help="turn the prefix cache off (paged)")
        add("preemption_mode", choices=PREEMPTION_MODES,
            help="when the cache is full: drop the newest request's KV and recompute it, or swap it to a CPU "
                 "pool (default: %(default)s)")
        add("swap_space", help="CPU pool for swapped blocks (default: %(default)s)")
        add("kv_cache_policy", choices=("full", "sink_window"),
            help="sink_window: keep the first --num-sink-tokens and the last --sink-window tokens, so generation "
                 "runs past max_model_len in bounded memory (StreamingLLM) (default: %(default)s)")
        add("num_sink_tokens", type=int, help="attention sinks kept by sink_window (default: %(default)s)")
        add("sink_window", type=int, help="recent tokens kept by sink_window")
        add("kv_offload_memory", help="KV tier 2: a host pool (e.g. 8GiB) for blocks the prefix tree evicts")
        add("kv_cache_dir", help="KV tier 3: a directory of blocks, written through as computed, so cached prefixes "
                                 "survive a restart")
        add("kv_cache_dir_size", help="most bytes --kv-cache-dir may hold (default: %(default)s)")
        add("kv_compression", help="compress each request's KV cache after its prefill, METHOD:RATIO with METHOD one "
                                   "of snapkv, streaming_llm, knorm, tova and RATIO the fraction removed (e.g. snapkv:0.5)")
        add("max_model_len", type=int, help="default: the model's context length")
        add("max_num_seqs", type=int, help="sequences running at once (default: %(default)s)")
        add("max_num_batched_tokens", type=int, help="tokens in one forward (default: %(default)s)")
        add("enable_chunked_prefill", "--no-chunked-prefill", action="store_false",
            help="run each prompt in one step instead of chunks that share the token budget")
        add("seed", type=int, help="seed of the sampler's random stream")
        add("tensor_parallel_size", type=int, help="split the model and its KV cache by heads over this many "
                                                   "processes (torch.distributed: gloo on CPU, NCCL on CUDA) (default: %(default)s)")
        return parser

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> "EngineArgs":
        """The fields a parser made with ``add_cli_args`` filled in; a field it left out keeps its default."""
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})

    def cli_args(self) -> list[str]:
        """The flags that parse back to these arguments (for a subprocess: ``kvserve serve *args.cli_args()``);
        fields at their default are left out."""
        out = []
        default = EngineArgs()
        for f in fields(self):
            value = getattr(self, f.name)
            if value == getattr(default, f.name):
                continue
            if f.name == "enable_prefix_caching":
                out.append("--enable-prefix-caching" if value else "--no-prefix-caching")
            elif f.name == "enable_chunked_prefill":
                out.append("--no-chunked-prefill")
            else:
                out += ["--" + f.name.replace("_", "-"), str(value)]
        return out
