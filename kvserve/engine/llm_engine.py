"""The engine: add requests, step, read outputs. One step = schedule -> run -> postprocess."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvserve import prompts
from kvserve.attn import select_backend
from kvserve.config import KV_CACHE_QUANT_DTYPES, CacheConfig, KVCacheMode, ModelConfig, PreemptionMode, SchedulerConfig
from kvserve.engine.model_runner import ModelRunner
from kvserve.engine.sampler import Sampler
from kvserve.engine.scheduler import Scheduler
from kvserve.engine.tp import ParallelRunner, TensorParallel
from kvserve.engine.trace import KVCounters, StepRecord
from kvserve.kv.block_pool import BlockPool
from kvserve.kv.manager import KVCacheManager, cdiv
from kvserve.kv.spec import KVSpec, format_bytes
from kvserve.kv.storage import KVCache
from kvserve.kv.tiers import DiskTier, HostTier, TieredStore, model_identity
from kvserve.models.cpu_kernels import cpu_flags
from kvserve.models.loader import DEFAULT_MODEL, load_model_config, load_tokenizer, resolve_model
from kvserve.models.shard import load_model
from kvserve.request import CompletionOutput, Request, RequestOutput, RequestStatus
from kvserve.sampling_params import SamplingParams

log = logging.getLogger("kvserve")

DEFAULT_KV_CACHE_MEMORY = 1 << 30  # paged pool: 1 GiB unless told otherwise


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls are fast only with AVX512_BF16 / AMX; on AVX2 they are ~8x slower than fp32. Both the
    CPU and torch's kernels must have them: ``ATEN_CPU_CAPABILITY=avx2`` (how an AVX2 machine is
    emulated on an AVX-512 one, docs/benchmarks.md) runs torch's AVX2 code, and so counts as AVX2."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    flags = cpu_flags()
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_fast_bf16() else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def resolve_kv_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> str | None:
    """The KV cache's storage format: None (K/V stored in the model dtype) or a quantized format name.
    A 16/32-bit name must be the model's dtype: the cache stores K/V as the model computes them, and a
    cast on every write would only lose precision or memory."""
    if kv_cache_dtype == "auto":
        return None
    if kv_cache_dtype in KV_CACHE_QUANT_DTYPES:
        return kv_cache_dtype
    dtype = resolve_dtype(kv_cache_dtype, torch.device("cpu"))
    if dtype != model_dtype:
        raise ValueError(
            f"kv_cache_dtype={kv_cache_dtype!r} differs from the model dtype "
            f"{str(model_dtype).removeprefix('torch.')}: a 16/32-bit KV cache stores K/V in the model dtype "
            f"(use 'auto', set dtype to match, or pick a quantized format: {', '.join(KV_CACHE_QUANT_DTYPES)})")
    return None


# GGUF types of at most ~5 bits per weight, whose values int4 (4-bit codes, a scale and a zero per 32)
# holds as well as the file does (Q4_1: exactly); and the 8-bit ones int8 holds
_GGUF_4BIT = ("Q4_0", "Q4_1", "Q4_K", "IQ4_NL", "IQ4_XS", "Q3_K", "Q2_K", "IQ3_S", "IQ3_XXS", "IQ2_XS", "IQ2_S")
_GGUF_8BIT = ("Q8_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K")


def resolve_quantization(quantization: str | None, weight_format: str | None, device: torch.device) -> tuple[str | None, str]:
    """(the weight setting to run, why). ``"auto"`` keeps the file's own quantization on the CPU, as
    llama.cpp does: a 4-bit GGUF runs int4 (SmolLM2's Q4_1 layers: the same values, 0.625 instead of 2
    bytes per weight read each decode step, 1.96x the bf16 batch-1 decode speed on the Sapphire Rapids
    machine; teacher-forced agreement with the float model 100 %: docs/benchmarks.md), an 8-bit one
    int8 (Q8_0's blocks: 97.8 %). Float checkpoints, and CUDA, run in the model dtype. ``"none"``: the
    model dtype always (the exact, HF-identical setting)."""
    if quantization in (None, "none"):
        return None, "asked for: the model dtype"
    if quantization != "auto":
        return quantization, "asked for"
    what = f"the file stores its layers as {weight_format}" if weight_format else "the weights are floats"
    if device.type != "cpu":
        return None, f"{what}; on {device.type} the model dtype"
    if weight_format in _GGUF_4BIT:
        return "int4", f"{what}: int4 keeps 4-bit codes (read 0.625 bytes per weight per token, not 2-4)"
    if weight_format in _GGUF_8BIT:
        return "int8", f"{what}: int8 keeps 8-bit codes (read 1.06 bytes per weight per token, not 2-4)"
    return None, f"{what}: the model dtype"


def resolve_device(device: str | torch.device | None) -> torch.device:
    device = torch.device(device or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    return device


@dataclass
class EngineConfig:
    model: str = DEFAULT_MODEL
    dtype: str | torch.dtype = "auto"
    device: str | None = None
    # "auto" (the file's own: int4 for a 4-bit GGUF on the CPU) | "none" / None (the model dtype) | "int8"
    # (weight-only) | "w8a8" (int8 weights and activations per block, CPU) | "w8a8-channel" (per row and per
    # token, fbgemm, CPU) | "int4" (CPU)
    quantization: str | None = "auto"
    seed: int | None = None
    max_model_len: int | None = None  # default: the model's context length
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig | None = None  # max_model_len is filled in from the model when None
    tensor_parallel_size: int = 1  # ranks the model and its KV cache are split over, by heads (engine.tp)


def plan_kv_pool(spec: KVSpec, cache: CacheConfig, sched: SchedulerConfig) -> tuple[int, int]:
    """(num_blocks including the null block, block_size) for this configuration; raises when one
    max-length sequence cannot fit."""
    if cache.kv_cache == KVCacheMode.CONTIGUOUS:
        # one max_model_len block per sequence slot and KV cache group, plus the null block
        return sched.max_num_seqs * len(spec.groups) + 1, sched.max_model_len
    bs = cache.block_size
    if cache.kv_cache == KVCacheMode.OFF and cache.num_kv_blocks is None and cache.kv_cache_memory is None:
        # scratch space for one step's recompute of every running sequence, nothing more
        return sched.max_num_seqs * spec.blocks_for_tokens(sched.max_model_len, bs) + 1, bs
    if cache.num_kv_blocks is not None:
        num_blocks = cache.num_kv_blocks
    else:
        num_blocks = spec.blocks_for_budget(cache.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY, bs)
    # sliding-window groups hold only their window (plus one prompt chunk) of a long sequence
    chunk = sched.max_num_batched_tokens if sched.enable_chunked_prefill else None
    need = spec.blocks_for_tokens(sched.max_model_len, bs, chunk)
    if num_blocks - 1 < need:
        longest = 0  # the longest sequence that fits (blocks_for_tokens grows with the length)
        while spec.blocks_for_tokens((longest // bs + 1) * bs, bs, chunk) <= num_blocks - 1:
            longest += bs
        raise ValueError(
            f"the KV cache ({num_blocks - 1} blocks of {bs} tokens, "
            f"{format_bytes((num_blocks - 1) * spec.block_bytes(bs))}) cannot hold one sequence of max_model_len="
            f"{sched.max_model_len} tokens ({need} blocks). Raise kv_cache_memory / num_kv_blocks, or set "
            f"max_model_len <= {longest}."
        )
    return num_blocks, bs


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        t0 = time.perf_counter()
        src = resolve_model(config.model)
        world = config.tensor_parallel_size
        self._check_tensor_parallel(world)
        self.model_config: ModelConfig  # the whole model's; self.model.cfg is rank 0's slice under TP
        self.quantization, self.quantization_reason = resolve_quantization(
            config.quantization, load_model_config(src).weight_format, self.device)
        self.model_config, self.model = load_model(src, self.dtype, self.device, self.quantization,
                                                   config.max_model_len, rank=0, world=world)
        self.tokenizer = load_tokenizer(src)
        cfg = self.model_config
        max_len = config.max_model_len or cfg.max_position_embeddings
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len={max_len} is longer than the model's context ({cfg.max_position_embeddings})")
        sched = config.scheduler or SchedulerConfig()
        sched.max_model_len = max_len
        cache = config.cache
        if cache.kv_cache == KVCacheMode.OFF:
            sched.enable_chunked_prefill = False  # a chunk would be forgotten before its end is reached
        sched.__post_init__()
        self.scheduler_config = sched
        # per rank: under tensor parallelism each rank's pool holds its own heads' K/V (the same blocks)
        kv_quant = resolve_kv_dtype(cache.kv_cache_dtype, self.dtype)
        self.kv_spec = KVSpec.from_model(self.model.cfg, self.dtype, kv_quant)
        num_blocks, block_size = plan_kv_pool(self.kv_spec, cache, sched)
        self.kv_cache = KVCache(self.kv_spec, num_blocks, block_size, self.device)
        # the workers build their slices with rank 0's resolved weight setting, not "auto" again
        resolved = dataclasses.replace(config, quantization=self.quantization)
        self.tp = (TensorParallel(resolved, world, self.device, self.dtype, kv_quant, num_blocks, block_size, max_len)
                   if world > 1 else None)
        self.sink_policy = cache.kv_cache_policy == "sink_window"
        sink = None
        if self.sink_policy:
            sink = (cdiv(cache.num_sink_tokens, block_size), cache.sink_window)
            # positions count within the cache: at most the sinks, the window (from the start of its
            # block) and one step's tokens; they must stay inside the RoPE table of max_model_len
            longest = sink[0] * block_size + cache.sink_window + block_size + sched.max_num_batched_tokens
            if longest > max_len:
                raise ValueError(f"kv_cache_policy='sink_window': sinks ({sink[0]} blocks) + sink_window "
                                 f"({cache.sink_window}) + a block + max_num_batched_tokens "
                                 f"({sched.max_num_batched_tokens}) = {longest} cache positions must fit "
                                 f"max_model_len={max_len}")
        self.kv_manager = KVCacheManager(BlockPool(num_blocks), block_size, bool(cache.enable_prefix_caching),
                                         storage=self.tp.mirror(self.kv_cache) if self.tp else self.kv_cache,
                                         num_groups=len(self.kv_spec.groups),
                                         swap_space=cache.swap_space, sink_window=sink,
                                         max_model_len=max_len, num_keep_tokens=cache.num_sink_tokens,
                                         tiers=self._make_tiers(src, cache))
        self.scheduler = Scheduler(sched, cache, self.kv_manager)
        self.attn_backend = select_backend(self.kv_cache, self.model.cfg.num_heads)
        eos = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.runner = (ParallelRunner(self.model, self.attn_backend, self.tp) if self.tp
                       else ModelRunner(self.model, self.attn_backend))
        self.sampler = Sampler(self.eos_token_ids, config.seed)
        self.requests: dict[str, Request] = {}  # live requests (children for n > 1)
        self.parents: dict[str, list[Request]] = {}  # user-facing request id -> its n samples
        self._ids = itertools.count()
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0,
                      # KV compression (kv.compress): tokens before and after, blocks given back, requests
                      "kv_compression_tokens_before": 0, "kv_compression_tokens_after": 0,
                      "kv_compression_blocks_returned": 0, "kv_compressions": 0}
        # called with a trace.StepRecord after each step (kvserve --explain / --trace; see engine.trace)
        self.observers: list[Callable[[StepRecord], None]] = []
        self._last_counters, self._known = KVCounters.read(self), set()
        self.load_seconds = time.perf_counter() - t0
        log.info(
            "KV cache: %s, %d blocks x %d tokens = %d tokens, %s (%s), %s per token, attention: %s",
            cache.kv_cache.value, num_blocks - 1, block_size, (num_blocks - 1) * block_size,
            format_bytes(self.kv_cache.nbytes), self.kv_spec.storage_name,
            format_bytes(self.kv_spec.bytes_per_token), self.attn_backend.name,
        )

    def _check_tensor_parallel(self, world: int) -> None:
        """What tensor parallelism cannot run with yet (engine.tp), refused before any worker starts."""
        if world == 1:
            return
        cache, why = self.config.cache, []
        if cache.preemption_mode == PreemptionMode.SWAP:
            why.append("preemption_mode='swap' (use 'recompute')")
        if cache.kv_offload_memory or cache.kv_cache_dir:
            why.append("the KV tiers (kv_offload_memory, kv_cache_dir)")
        if cache.kv_compression is not None:
            why.append("kv_compression")
        if self.device.type == "cuda" and torch.cuda.device_count() < world:
            why.append(f"{world} ranks on {torch.cuda.device_count()} GPU(s)")
        if why:
            raise ValueError(f"tensor_parallel_size={world} does not run with " + ", ".join(why) + " yet")

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (also done at exit)."""
        if self.tp is not None:
            self.tp.shutdown()

    def _make_tiers(self, src, cache: CacheConfig) -> TieredStore | None:
        """The KV tiers below the pool, when asked for; blocks are keyed under this model's identity
        (its file's sha256, dtype, KV dtype, block size and KV layout)."""
        if not (cache.kv_offload_memory or cache.kv_cache_dir):
            return None
        layout = ";".join(f"{len(g.layers)}x{g.spec.num_kv_heads}x{g.spec.head_dim}:{g.spec.window}"
                          for g in self.kv_spec.groups)
        identity = model_identity(str(src.path), self.dtype, self.kv_spec.storage_name, self.kv_cache.block_size, layout)
        host = HostTier(cache.kv_offload_memory) if cache.kv_offload_memory else None
        disk = DiskTier(cache.kv_cache_dir, cache.kv_cache_dir_size, identity) if cache.kv_cache_dir else None
        return TieredStore(identity, host, disk)

    def flush_kv_tiers(self) -> None:
        """Wait until the blocks queued for the disk tier are written (clean shutdown, tests)."""
        tiers = self.kv_manager.tiers
        if tiers is not None and tiers.disk is not None:
            tiers.disk.flush()

    # ------------------------------------------------------------------ requests
    @property
    def max_model_len(self) -> int:
        return self.scheduler_config.max_model_len

    def tokenize(self, prompt: str) -> list[int]:
        return prompts.encode_text(self.tokenizer, prompt)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return prompts.apply_chat_template(self.tokenizer, messages, add_generation_prompt)

    def check_prompt(self, prompt_token_ids: list[int], params: SamplingParams | None = None) -> list[int]:
        """The prompt as a list of ints, or a ValueError: empty, ids outside the vocabulary, or no room
        left in the context (vLLM's wording, with both numbers). With ``context_overflow="truncate"``
        a prompt that does not fit keeps its last tokens, leaving room for ``max_tokens`` (at most half
        the context); with "shift" (or the sink_window policy) any length is taken."""
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise ValueError("the prompt is empty: it must hold at least one token")
        if any(not 0 <= t < self.model_config.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {self.model_config.vocab_size})")
        overflow = params.context_overflow if params is not None else "error"
        if overflow == "shift":
            if self.config.cache.key_moves_refused():
                raise ValueError(f"context_overflow='shift' {self.config.cache.key_moves_refused()}")
            return ids
        if overflow == "truncate" and len(ids) >= self.max_model_len:
            return ids[len(ids) - (self.max_model_len - prompts.truncate_room(params.max_tokens, self.max_model_len)):]
        if len(ids) >= self.max_model_len and not self.sink_policy:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your request has "
                f"{len(ids)} input tokens. Please reduce the length of the input messages."
            )
        return ids

    def add_request(
        self,
        prompt: str | list[int] | dict | None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> str:
        params = params or SamplingParams()
        prompt, ids = prompts.normalize_prompt(prompt, self.tokenizer, prompt_token_ids)
        ids = self.check_prompt(ids, params)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.parents:
            raise ValueError(f"request id {request_id!r} is already running")
        compression = self._compression(params)
        children = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            rid = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(rid, ids, params, prompt=prompt, generator=gen, parent_id=request_id, index=i,
                          compression=compression)
            children.append(req)
            self.requests[rid] = req
            self.scheduler.add_request(req)
        self.parents[request_id] = children
        self.stats["prompt_tokens"] += len(ids)
        return request_id

    def _compression(self, params: SamplingParams):
        """The request's KV compression: its own, else the engine's default; None for ratio 0 (the
        uncompressed path, bit for bit). Refused where packing cannot work."""
        c = params.kv_compression if params.kv_compression is not None else self.config.cache.kv_compression
        if c is None or c.ratio == 0:
            return None
        why = None
        if self.config.cache.kv_cache == KVCacheMode.OFF:
            why = "there is no KV cache (kv_cache='off')"
        elif self.model_config.layer_types and "sliding" in self.model_config.layer_types:
            why = "this model has sliding-window layers (not supported yet)"
        elif self.sink_policy or params.context_overflow == "shift":
            why = "the sink_window policy and context_overflow='shift' already move this request's keys"
        elif self.tp is not None:
            why = "tensor parallelism (each rank holds only its heads; scores need them all)"
        if why:
            raise ValueError(f"kv_compression {c.method}:{c.ratio} cannot run: {why}")
        return c

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks. Unknown or finished ids are ignored."""
        for req in self.parents.get(request_id, []):
            self.runner.drop_queries(req.request_id)
            if not req.is_finished:
                self.scheduler.finish(req, "abort")
            self.requests.pop(req.request_id, None)
        self.parents.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        """One forward over the scheduled batch; outputs of the requests that got a token (or finished)."""
        start = time.monotonic()
        out = self.scheduler.schedule()
        if not out:
            if self.scheduler.has_unfinished() and not self.scheduler.running:
                self._fail_unschedulable()
            return []
        if self.observers:  # before the step changes them: what each seq is, who is new
            kinds = [self._kind(s) for s in out.seqs]
            arrivals = {rid: r.arrival_time for rid, r in self.scheduler.requests.items() if rid not in self._known}
        for rid in out.preempted:  # dropped back to the queue: its compression state goes with its KV
            if self.scheduler.requests[rid].status == RequestStatus.WAITING:
                self.runner.drop_queries(rid)
        logits = self.runner.execute(out)
        for s in out.seqs:
            if s.compress is not None or s.observe is not None:
                self._compress(self.scheduler.requests[s.request_id], s)
        sampling, rows, r = [], [], 0  # the requests that sample, and their logits rows
        for s in out.seqs:
            req = self.scheduler.requests[s.request_id]
            if s.all_logits:
                self._score_prompt(req, s.start, logits[r : r + s.num_new_tokens])
                r += s.num_new_tokens
            elif s.sample:
                r += 1
            if s.sample:
                sampling.append(req)
                rows.append(r - 1)
        if sampling and r != len(rows):
            logits = logits[rows]
        results = self.sampler(logits, sampling) if sampling else []
        self.scheduler.after_step(out)
        self.stats["steps"] += 1
        touched: dict[str, None] = {}
        now = time.monotonic()
        for req, (token, logprobs) in zip(sampling, results):
            req.output_token_ids.append(token)
            if logprobs is not None:
                req.output_logprobs.append(logprobs)
            if req.first_token_time is None:
                req.first_token_time = now
            self.stats["generation_tokens"] += 1
            self._check_stop(req)
            if req.is_finished:
                self.runner.drop_queries(req.request_id)
            touched[req.parent_id] = None
        if self.observers:
            self._observe(out, kinds, arrivals, start)
        return [self._output(pid) for pid in touched]

    def _compress(self, req: Request, s) -> None:
        """KV compression after the step (kv.compress): squeeze the prompt the step finished, or (h2o
        while decoding) add the step's attention to the scores and evict a block when over budget.
        The runner moves the K/V; the manager gives the blocks past the kept tokens back."""
        length = s.start + s.num_new_tokens
        kept = self.runner.compress(s) if s.compress is not None else self.runner.observe(s)
        if kept is None:  # h2o, still within its budget
            return
        returned = self.kv_manager.compressed(req, length, kept)
        st = self.stats
        st["kv_compression_blocks_returned"] += returned
        if s.compress is None:
            before, _, total = req.kv_compression_stats
            req.kv_compression_stats = (before, kept, total + returned)
            return
        req.kv_compression_stats = (length, kept, returned)
        st["kv_compressions"] += 1
        st["kv_compression_tokens_before"] += length
        st["kv_compression_tokens_after"] += kept

    # ------------------------------------------------------------------ step records (--explain, --trace)
    def _kind(self, s) -> str:
        req = self.scheduler.requests[s.request_id]
        return "decode" if s.num_new_tokens == 1 and s.start == req.num_tokens - 1 else "prefill"

    def _observe(self, out, kinds: list[str], arrivals: dict[str, float], start: float) -> None:
        """Hand every observer what this step (and anything since the last step) did to KV memory."""
        counters = KVCounters.read(self)
        current = self.scheduler.requests
        m = self.kv_manager
        record = StepRecord(
            step=self.stats["steps"], start=start, seconds=time.monotonic() - start,
            seqs=[(s.request_id, k, s.num_new_tokens) for s, k in zip(out.seqs, kinds)],
            delta=counters - self._last_counters, preempted=list(out.preempted),
            finished=[rid for rid in [*self._known, *arrivals] if rid not in current], arrivals=arrivals,
            blocks_total=m.pool.num_usable, blocks_held=m.pool.num_used, blocks_cached=m.usage().blocks_cached,
            block_bytes=self.kv_spec.block_bytes(self.kv_cache.block_size), kv_bytes_allocated=self.kv_cache.nbytes,
            tokens_resident=sum(r.num_computed_tokens - m.position_shift(r.request_id) for r in self.scheduler.running),
        )
        self._last_counters, self._known = counters, set(current)
        for observe in self.observers:
            observe(record)

    def _score_prompt(self, req: Request, start: int, logits: torch.Tensor) -> None:
        """prompt_logprobs: row i of ``logits`` (position start + i) predicts prompt token start + i + 1."""
        prompt, k = req.prompt_token_ids, req.params.prompt_logprobs
        first = max(0, len(req.prompt_logprobs) - 1 - start)  # rows already scored (a recomputed request)
        last = min(logits.shape[0], len(prompt) - 1 - start)
        if last <= first:
            return
        lp = torch.log_softmax(logits[first:last].float(), dim=-1)
        targets = torch.tensor(prompt[start + first + 1 : start + last + 1], device=lp.device)
        chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
        top = torch.topk(lp, k) if k else None
        for i, (t, v) in enumerate(zip(targets.tolist(), chosen)):
            entry = {t: v}
            if top is not None:
                entry.update(zip(top.indices[i].tolist(), top.values[i].tolist()))
                entry[t] = v
            req.prompt_logprobs.append(entry)

    def _fail_unschedulable(self) -> None:
        # Only reachable when a single request can never fit the pool; fail it rather than spin.
        s = self.scheduler
        req = s.swapped[0] if s.swapped else s.waiting[0]
        self.scheduler.finish(req, "abort")
        raise RuntimeError(f"request {req.parent_id} cannot fit the KV cache ({self.cache_stats()})")

    def _check_stop(self, req: Request) -> None:
        p = req.params
        token = req.output_token_ids[-1]
        n_out = len(req.output_token_ids)
        prev_len = len(req.text)
        req.text = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=p.skip_special_tokens)
        reason = None
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                reason = "stop"
            elif token in p.stop_token_ids:
                reason, req.stop_reason = "stop", token
            elif hit := prompts.find_stop(req.text, p.stop, prev_len):
                i, s = hit
                req.text, reason, req.stop_reason = req.text[:i], "stop", s
        if reason is None and p.max_tokens is not None and n_out >= p.max_tokens:
            reason = "length"
        if (reason is None and req.num_tokens >= self.max_model_len and not self.sink_policy
                and p.context_overflow != "shift"):
            reason = "length"  # (sink_window: the cache never holds more than sinks + window + a chunk)
        if reason is not None:
            req.finished_time = time.monotonic()
            self.scheduler.finish(req, reason)

    def _output(self, parent_id: str) -> RequestOutput:
        children = self.parents[parent_id]
        first = children[0]
        outs = [
            CompletionOutput(c.index, self._stable_text(c), list(c.output_token_ids),
                             list(c.output_logprobs) if c.params.logprobs is not None else None,
                             c.finish_reason, c.stop_reason)
            for c in children
        ]
        finished = all(c.is_finished for c in children)
        metrics = {"arrival_time": first.arrival_time}
        if first.first_token_time is not None:
            metrics["first_token_time"] = first.first_token_time
        if finished:
            for c in children:
                self.requests.pop(c.request_id, None)
            self.parents.pop(parent_id, None)
        if first.kv_compression_stats is not None:
            metrics["kv_compression_tokens_before"], metrics["kv_compression_tokens_after"], \
                metrics["kv_compression_blocks_returned"] = first.kv_compression_stats
        return RequestOutput(parent_id, first.prompt, first.prompt_token_ids, outs, finished,
                             max(first.num_cached_tokens, 0), metrics,
                             list(first.prompt_logprobs) if first.params.prompt_logprobs is not None else None)

    @staticmethod
    def _stable_text(req: Request) -> str:
        """The text so far, minus what may still change (``prompts.stable_text``): every front end streams
        these texts as they are."""
        return prompts.stable_text(req.text, req.params.stop, req.is_finished)

    # ------------------------------------------------------------------ stats
    def kv_bytes_in_use(self) -> int:
        """Bytes of the blocks live requests hold (prefix-cached blocks held by the tree alone excluded)."""
        return self.kv_manager.usage().blocks_used * self.kv_spec.block_bytes(self.kv_cache.block_size)

    def cache_stats(self) -> dict:
        u = self.kv_manager.usage()
        s = self.scheduler
        return {
            "weights": self.quantization or str(self.dtype).removeprefix("torch."),  # what a decode step reads
            "kv_cache": self.config.cache.kv_cache.value,
            "block_size": self.kv_cache.block_size,
            "kv_cache_dtype": self.kv_spec.storage_name,  # "bfloat16", or a quantized format: "int8", ...
            "kv_bytes_per_token": self.kv_spec.bytes_per_token,  # scales included
            "blocks_total": u.blocks_total,
            "blocks_free": u.blocks_free,
            "blocks_used": u.blocks_used,
            "blocks_cached": u.blocks_cached,
            "usage": u.usage,
            "kv_bytes_allocated": self.kv_cache.nbytes,
            "kv_bytes_touched": self.kv_cache.touched_bytes,  # committed RAM: zeroed or written so far
            "kv_bytes_in_use": self.kv_bytes_in_use(),
            "preemptions": s.num_preemptions,
            "prefix_cache_queries": self.kv_manager.prefix_queries,
            "prefix_cache_hits": self.kv_manager.prefix_hits,
            "prefix_cache_hit_rate": self.kv_manager.prefix_hits / max(1, self.kv_manager.prefix_queries),
            "prefix_cache_evicted_blocks": pc.evicted_blocks if (pc := self.kv_manager.prefix_cache) else 0,
            "swapped_blocks": self.kv_manager.num_swapped_blocks,
            "requests_running": len(s.running),
            "requests_waiting": len(s.waiting),
            **(self.kv_manager.tiers.stats() if self.kv_manager.tiers is not None else {}),
            "requests_swapped": len(s.swapped),
            # tensor parallelism: each rank's pool holds its heads' K/V (the figures above are rank 0's)
            "tensor_parallel_size": self.config.tensor_parallel_size,
            "kv_bytes_per_token_all_ranks": self.kv_spec.bytes_per_token * self.config.tensor_parallel_size,
            "kv_bytes_allocated_all_ranks": self.kv_cache.nbytes * self.config.tensor_parallel_size,
            **{k: v for k, v in self.stats.items() if k.startswith("kv_compression")},
        }
