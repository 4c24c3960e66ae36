"""The ``kvserve`` command line.

    kvserve generate "The capital of France is" --max-tokens 16     # stream one completion, then its timings
    kvserve generate "Tell me a joke" --chat                        # the same through the chat template
    kvserve chat --system "You are terse."                          # multi-turn REPL (or piped lines)
    kvserve estimate --model smollm2-135m --seq-len 4096 --batch 8  # KV memory arithmetic, config only
    kvserve info --model smollm2-135m                               # architecture, config only
    kvserve ppl --kv-cache-dtype int8                               # perplexity through the (quantized) KV cache
    kvserve serve                                                   # the OpenAI-compatible HTTP server

Every subcommand returns an exit code: 0 on success, 2 for a bad argument or a request the engine
refuses (unknown model, prompt longer than the context, a KV cache too small), 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

from kvserve.args import EngineArgs
from kvserve.models.loader import DEFAULT_MODEL
from kvserve.prompts import encode_chat

log = logging.getLogger("kvserve.cli")

TABLE_SEQ_LENS = (512, 1024, 2048, 4096, 8192)


class CLIError(Exception):
    """A user-facing error: printed as ``error: ...``, exit code 2."""


# ---------------------------------------------------------------- arguments


def _engine_parent() -> argparse.ArgumentParser:
    # one conversation at a time: one sequence slot is enough
    return EngineArgs.add_cli_args(argparse.ArgumentParser(add_help=False), max_num_seqs=1)


def _add_observe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--explain", action="store_true",
                   help="after each engine step, one line on stderr: what ran, blocks allocated/freed/evicted/"
                        "copied/swapped, prefix hits, KV in use; a summary at the end (the text prints once, after)")
    p.add_argument("--trace", metavar="FILE", default=None,
                   help="write the steps, each request's phases and the block counts as a Chrome/Perfetto trace")


class Observers:
    """--explain / --trace: attach to an engine, and finish (summary, trace file) at the end."""

    def __init__(self, engine, explain: bool = False, trace: str | None = None):
        from kvserve.engine.trace import ChromeTrace, Explainer

        self.explainer = Explainer(engine) if explain else None
        self.tracer = ChromeTrace(engine) if trace else None
        self.path = trace
        engine.observers += [o for o in (self.explainer, self.tracer) if o is not None]

    def close(self) -> None:
        if self.explainer is not None:
            self.explainer.close()
        if self.tracer is not None:
            self.tracer.save(self.path)
            print(f"trace: {self.path} ({len(self.tracer.events)} events; open in https://ui.perfetto.dev "
                  "or chrome://tracing)", file=sys.stderr, flush=True)


def _sampling_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="default: %(default)s")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1, help="-1: off")
    return p


def _verbose_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's -v must not reset one given before the subcommand
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at INFO level")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve",
                                     description="kvserve: KV-cache-centred LLM inference from the command line.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:9]))
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    engine, sampling, verbose = _engine_parent(), _sampling_parent(), _verbose_parent()

    p = sub.add_parser("generate", parents=[verbose, engine, sampling], help="stream one completion",
                       description="Generate from one prompt, streaming tokens to stdout; timings and KV memory "
                                   "go to stderr.")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user turn")
    _add_observe_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", parents=[verbose, engine, sampling], help="interactive multi-turn chat",
                       description="Chat with the model: one line of stdin is one user turn (EOF or /exit ends, "
                                   "/reset forgets the conversation). Per-turn stats go to stderr.")
    p.add_argument("--system", default=None, help="a system message")
    _add_observe_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("cache-tree", parents=[verbose, engine, sampling], help="run prompts, then print the prefix tree",
                       description="Run the prompts one after another through the paged cache with prefix caching, "
                                   "then print the radix tree of cached prefixes (tokens, blocks, locks, last access, "
                                   "a preview of the text) and the hit statistics.")
    p.add_argument("prompts", nargs="+", help="prompt texts, run in order")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template as a user turn")
    p.set_defaults(func=cmd_cache_tree)

    p = sub.add_parser("estimate", parents=[verbose], help="KV cache memory for a model, sequence length and batch",
                       description="The seeds' KV formula with the model's numbers, what the engine would allocate, "
                                   "and what fits a memory budget. Reads the model config only.")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (prompt + output) (default: --max-model-len, else the model's context)")
    p.add_argument("--batch", type=int, required=True, help="sequences held at once")
    p.add_argument("--memory", default="4GiB", help="memory budget for the fit table (default: %(default)s)")
    # the engine's own flags, where they change the arithmetic; fp32 unless told, whatever this CPU prefers
    EngineArgs.add_cli_args(p, only=("model", "dtype", "kv_cache", "block_size", "kv_cache_dtype", "max_model_len",
                                     "tensor_parallel_size"), dtype="float32")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("ppl", parents=[verbose], help="perplexity of a text through the engine's KV cache",
                       description="Perplexity of a text (default: Python's pydoc_data.topics, ~465 KB of English) "
                                   "computed by the engine: windows of --window tokens, each prefilled in chunks of "
                                   "--max-num-batched-tokens, so most attention reads come from the KV cache (and "
                                   "its --kv-cache-dtype).")
    p.add_argument("file", nargs="?", default=None, help="a UTF-8 text file (default: pydoc_data.topics)")
    p.add_argument("--window", type=int, default=4096, help="tokens per window (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="score only the first N tokens of the text (default: all of it)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    EngineArgs.add_cli_args(p, max_num_batched_tokens=64, max_num_seqs=4)
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("info", parents=[verbose], help="model architecture (config only)",
                       description="The model's architecture and KV cost per token, read from its metadata only.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model alias or path (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    try:  # the HTTP server's subcommand lives with the server (and needs its optional dependencies at run time)
        from kvserve.server.cli import add_serve_parser
    except ImportError:  # pragma: no cover - the server package is optional
        pass
    else:
        add_serve_parser(sub)
        from kvserve.server.bench import add_bench_parser

        bench = sub.add_parser("bench", help="benchmarks against a running server (bench serve)")
        add_bench_parser(bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True))
    return parser


# ---------------------------------------------------------------- generate / chat


def _build_llm(args: argparse.Namespace):
    from kvserve.llm import LLM

    t0 = time.perf_counter()
    llm = LLM.from_engine_args(EngineArgs.from_cli_args(args))
    log.info("loaded %s in %.2f s", args.model, time.perf_counter() - t0)
    return llm


def _sampling_params(args: argparse.Namespace):
    from kvserve.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k)


@dataclass
class StreamResult:
    text: str
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    finish_reason: str | None
    ttft_s: float | None  # add_request -> first token
    decode_s: float  # first token -> last token
    peak_kv_bytes: int  # most KV bytes live requests held after any step
    compression: tuple[int, int, int] | None = None  # KV compression: tokens before, kept, blocks given back

    @property
    def decode_tok_s(self) -> float | None:
        if self.output_tokens < 2 or self.decode_s <= 0:
            return None
        return (self.output_tokens - 1) / self.decode_s


class _Printer:
    """Writes the growing completion text as deltas. The engine's texts only grow (it holds back a
    half-decoded character and what a stop string may still cut: ``kvserve.prompts.stable_text``)."""

    def __init__(self, out):
        self.out, self.printed = out, 0

    def update(self, text: str) -> None:
        if len(text) > self.printed:
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)


def stream_request(engine, prompt: str | None, params, prompt_token_ids: list[int] | None = None,
                   out=None) -> StreamResult:
    """Run one request to completion through ``engine.step()``, writing its text to ``out`` as it grows."""
    out = out or sys.stdout
    printer = _Printer(out)
    t0 = time.perf_counter()
    rid = engine.add_request(prompt, params, prompt_token_ids=prompt_token_ids)
    t_first = t_last = None
    peak_kv = 0
    final = None
    try:
        while engine.has_unfinished_requests():
            outputs = engine.step()
            now = time.perf_counter()
            peak_kv = max(peak_kv, engine.kv_bytes_in_use())
            for o in outputs:
                if o.request_id != rid:
                    continue
                c = o.outputs[0]
                if c.token_ids:
                    if t_first is None:
                        t_first = now
                    t_last = now
                printer.update(c.text)
                if o.finished:
                    final = o
    except BaseException:
        engine.abort_request(rid)
        raise
    if final is None:  # cannot happen with a single request; guard against a silent empty answer
        raise RuntimeError(f"request {rid} ended without a final output")
    c = final.outputs[0]
    return StreamResult(
        text=c.text, prompt_tokens=len(final.prompt_token_ids), output_tokens=len(c.token_ids),
        cached_tokens=final.num_cached_tokens, finish_reason=c.finish_reason,
        ttft_s=None if t_first is None else t_first - t0,
        decode_s=0.0 if t_first is None else t_last - t_first, peak_kv_bytes=peak_kv,
        compression=tuple(final.metrics[k] for k in ("kv_compression_tokens_before", "kv_compression_tokens_after",
                                                       "kv_compression_blocks_returned"))
        if "kv_compression_tokens_before" in final.metrics else None,
    )


def _fmt_rate(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.1f} tok/s"


def cmd_generate(args: argparse.Namespace) -> int:
    from kvserve.kv.spec import format_bytes

    params = _sampling_params(args)
    llm = _build_llm(args)
    engine = llm.engine
    if args.chat:
        prompt, ids = encode_chat(engine.tokenizer, [{"role": "user", "content": args.prompt}])
    else:
        prompt, ids = args.prompt, None
    observers = Observers(engine, args.explain, args.trace)
    # with --explain the step lines go to stderr as they happen; the text prints once, after them
    r = stream_request(engine, prompt, params, prompt_token_ids=ids, out=io.StringIO() if args.explain else None)
    if args.explain:
        sys.stdout.write(r.text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    observers.close()
    engine.flush_kv_tiers()

    kv = engine.kv_cache
    mode = engine.config.cache.kv_cache
    unit = "slot" if mode == "contiguous" else "block"
    dtype = engine.kv_spec.storage_name
    ttft = "n/a" if r.ttft_s is None else f"{r.ttft_s * 1e3:.1f} ms"
    decode = _fmt_rate(r.decode_tok_s)
    if r.decode_tok_s is not None:
        decode += f" ({r.output_tokens - 1} tokens in {r.decode_s:.2f} s)"
    cached = f" ({r.cached_tokens} from prefix cache)" if r.cached_tokens else ""
    lines = [
        "---",
        f"model:          {args.model} ({engine.device}, {str(engine.dtype).removeprefix('torch.')}, "
        f"loaded in {engine.load_seconds:.2f} s)",
        f"weights:        {engine.quantization or 'the model dtype'} ({engine.quantization_reason})",
        f"TTFT:           {ttft}",
        f"decode:         {decode}",
        f"prompt tokens:  {r.prompt_tokens}{cached}",
        f"output tokens:  {r.output_tokens} (finish: {r.finish_reason})",
        f"KV in use:      {format_bytes(r.peak_kv_bytes)} (peak over the steps; "
        f"{format_bytes(engine.kv_spec.bytes_per_token)} per token, {dtype})",
        f"KV allocated:   {format_bytes(kv.nbytes)} ({mode}: {kv.num_blocks - 1} {unit}s x {kv.block_size} tokens "
        f"+ the null {unit})",
    ]
    if mode == "off":
        lines[-1] += " - reserved but never written: --kv-cache off recomputes every step"
    n = engine.config.tensor_parallel_size
    if n > 1:  # the figures above are rank 0's: each rank holds its own heads' share
        lines.append(f"tensor parallel: {n} ranks, each with the KV above for its {engine.kv_spec.num_kv_heads} of "
                     f"{engine.model_config.num_kv_heads} KV heads ({format_bytes(n * kv.nbytes)} allocated in all)")
    if r.compression is not None:
        before, after, returned = r.compression
        c = params.kv_compression or engine.config.cache.kv_compression
        lines.append(f"KV compressed:  {before} -> {after} tokens after the prefill ({c.method}, ratio {c.ratio:g}); "
                     f"{returned} blocks given back")
    print("\n".join(lines), file=sys.stderr, flush=True)
    return 0


def _read_turns(stdin):
    """User turns: lines typed at a ``> `` prompt on a terminal, else lines of piped stdin."""
    if stdin.isatty():
        while True:
            try:
                yield input("> ")
            except EOFError:
                print(file=sys.stderr)
                return
    else:
        for line in stdin:
            yield line.rstrip("\n")


def cmd_chat(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    llm = _build_llm(args)
    engine = llm.engine
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    observers = Observers(engine, args.explain, args.trace)
    try:
        _chat_loop(llm, args, params, system, messages, quiet=args.explain)
    finally:
        observers.close()
        engine.flush_kv_tiers()
    return 0


def _chat_loop(llm, args, params, system: list[dict], messages: list[dict], quiet: bool) -> None:
    engine = llm.engine
    if sys.stdin.isatty():
        print(f"kvserve chat: {args.model}, max_model_len {engine.max_model_len}. "
              "/exit (or Ctrl-D) ends, /reset forgets the conversation.", file=sys.stderr)
    turn = 0
    for line in _read_turns(sys.stdin):
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/tree":  # the prefix tree as it stands: this conversation's turns, block by block
            print(llm.dump_prefix_cache(), file=sys.stderr, flush=True)
            continue
        if line == "/reset":
            messages = list(system)
            print("[conversation reset]", file=sys.stderr, flush=True)
            continue
        messages.append({"role": "user", "content": line})
        prompt, ids = encode_chat(engine.tokenizer, messages)
        try:
            r = stream_request(engine, prompt, params, prompt_token_ids=ids, out=io.StringIO() if quiet else None)
            if quiet:
                sys.stdout.write(r.text)
        except ValueError as e:  # the conversation outgrew the context: drop this turn, keep the REPL
            messages.pop()
            print(f"error: {e} (use /reset to start over)", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:
            messages.pop()
            print("\n[interrupted]", file=sys.stderr, flush=True)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": r.text})
        turn += 1
        ttft = "" if r.ttft_s is None else f", TTFT {r.ttft_s * 1e3:.0f} ms"
        print(f"[turn {turn}: {r.prompt_tokens} prompt tokens, {r.cached_tokens} from cache, "
              f"{r.output_tokens} new tokens{ttft}, {_fmt_rate(r.decode_tok_s)}]", file=sys.stderr, flush=True)


def cmd_cache_tree(args: argparse.Namespace) -> int:
    if args.kv_cache != "paged" or args.enable_prefix_caching is False:
        raise CLIError("cache-tree needs the paged cache with prefix caching (the defaults)")
    from kvserve.kv.spec import format_bytes

    params = _sampling_params(args)
    llm = _build_llm(args)
    for text in args.prompts:
        out = (llm.chat([{"role": "user", "content": text}], params) if args.chat else llm.generate(text, params))[0]
        print(f"[{len(out.prompt_token_ids)} prompt tokens, {out.num_cached_tokens} from cache] "
              f"{text[:40]!r} -> {out.outputs[0].text[:60]!r}", file=sys.stderr)
    llm.engine.flush_kv_tiers()
    print(llm.dump_prefix_cache())
    st = llm.cache_stats()
    print(f"prefix cache: {st['prefix_cache_hits']} of {st['prefix_cache_queries']} prompt tokens hit "
          f"({st['prefix_cache_hit_rate']:.0%}), {st['blocks_cached']} blocks cached, "
          f"{st['prefix_cache_evicted_blocks']} evicted")
    for tier in ("host", "disk"):  # KV tiers below the pool, when configured
        if f"kv_tier_{tier}_blocks" in st:
            t = {k.removeprefix(f"kv_tier_{tier}_"): v for k, v in st.items() if k.startswith(f"kv_tier_{tier}_")}
            print(f"{tier} tier: {t['blocks']} blocks ({format_bytes(t['bytes'])}); {t['hits']} loaded up "
                  f"({format_bytes(t['bytes_loaded'])} in {t['load_seconds'] * 1e3:.1f} ms), {t['stored']} stored, "
                  f"{t['evicted']} evicted, {t['corrupt']} bad files skipped")
    return 0


# ---------------------------------------------------------------- estimate / info


def _load_config(model: str):
    from kvserve.models.loader import load_model_config, resolve_model

    return load_model_config(resolve_model(model))


def _longest_seq(spec, budget: int) -> int:
    """The longest sequence whose K/V fits ``budget`` bytes (by the formula): budget / bytes_per_token,
    or unbounded-looking large when every layer slides (then it is capped at 2**40)."""
    lo, hi = 0, 1 << 40
    while lo < hi:  # formula_bytes grows with the length (slower past a sliding window)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if spec.formula_bytes(mid) <= budget else (lo, mid - 1)
    return lo


def estimate(model: str, seq_len: int | None, batch: int, dtype: str = "float32", kv_cache: str = "paged",
             block_size: int = 16, memory: str | int = "4GiB", kv_cache_dtype: str = "auto",
             max_model_len: int | None = None, tensor_parallel_size: int = 1) -> dict:
    """Everything ``kvserve estimate`` prints, as a dict (bytes as ints). ``dtype`` / ``kv_cache_dtype`` as
    in ``LLM``: the KV dtype is ``kv_cache_dtype`` unless "auto", else the model's. ``seq_len`` None: the
    max_model_len, else the model's context. A contiguous slot holds ``max_model_len`` tokens (default
    ``seq_len``); a paged pool is sized to hold the whole batch at ``seq_len``. Under tensor parallelism
    each rank holds its KV heads (``models.shard``): the ``*_per_rank`` figures, and their sum over ranks."""
    import torch

    from kvserve.config import KV_CACHE_QUANT_DTYPES, CacheConfig, SchedulerConfig, parse_bytes
    from kvserve.engine.llm_engine import plan_kv_pool, resolve_dtype
    from kvserve.kv.quant import kv_quant
    from kvserve.kv.spec import KVSpec, dtype_bytes

    budget = parse_bytes(memory)
    cfg = _load_config(model)
    if seq_len is None:
        seq_len = max_model_len or cfg.max_position_embeddings
    if seq_len < 1 or batch < 1:
        raise CLIError(f"--seq-len and --batch must be >= 1, got {seq_len} and {batch}")
    cache_dtype = CacheConfig(kv_cache_dtype=kv_cache_dtype).kv_cache_dtype  # validated; "fp8" -> "fp8_e4m3"
    quant = cache_dtype if cache_dtype in KV_CACHE_QUANT_DTYPES else None
    kv_dtype = resolve_dtype(dtype if cache_dtype == "auto" or quant else cache_dtype, torch.device("cpu"))
    spec = KVSpec.from_model(cfg, kv_dtype, quant)
    bpt = spec.bytes_per_token
    if kv_cache == "contiguous":
        cache = CacheConfig(kv_cache="contiguous", block_size=block_size)
        sched = SchedulerConfig(max_num_seqs=batch, max_model_len=max_model_len or seq_len)
    else:  # paged, or off's scratch pool: one that holds the whole batch at full length (plus the null block)
        sched = SchedulerConfig(max_num_seqs=batch, max_model_len=seq_len)
        # sliding-window groups hold their window (plus one prompt chunk), not the whole sequence
        per_seq = spec.blocks_for_tokens(seq_len, block_size, sched.max_num_batched_tokens)
        cache = CacheConfig(kv_cache=kv_cache, block_size=block_size, num_kv_blocks=batch * per_seq + 1)
    num_blocks, bs = plan_kv_pool(spec, cache, sched)
    allocated = num_blocks * spec.block_bytes(bs)
    formula = spec.formula_bytes(seq_len, batch)
    kb, vb = ((dtype_bytes(kv_dtype),) * 2 if quant is None
              else (kv_quant(quant).key.bits / 8, kv_quant(quant).value.bits / 8))
    return {
        "model": cfg.name,
        "num_layers": spec.num_layers,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "dtype": spec.storage_name,  # of the KV cache
        # bytes per stored value of K and of V (int4: 0.625 for its 5-bit keys, 0.5 for its 4-bit values),
        # and per token and KV head of K (or V) for its scale word
        "key_bytes_per_value": kb,
        "value_bytes_per_value": vb,
        "dtype_bytes": kb if kb == vb else (kb + vb) / 2,
        "scale_bytes": 0 if quant is None else kv_quant(quant).scale_dtype.itemsize,
        "seq_len": seq_len,
        "batch": batch,
        "kv_cache": kv_cache,
        "bytes_per_token": bpt,
        "formula_bytes": formula,
        "num_blocks": num_blocks,
        "block_size": bs,
        "allocated_bytes": allocated,
        "null_block_bytes": spec.block_bytes(bs),
        # paged: the last block of each sequence, rounded up; contiguous: slots longer than seq_len
        "padding_bytes": allocated - formula - bs * bpt,
        "model_context_length": cfg.max_position_embeddings,
        "memory_bytes": budget,
        "max_batch_at_seq": budget // spec.formula_bytes(seq_len),
        "max_seq_at_batch": _longest_seq(spec, budget // batch),
        "max_batch_table": {str(s): budget // spec.formula_bytes(s) for s in TABLE_SEQ_LENS},
        "bytes_per_seq_table": {str(s): spec.formula_bytes(s) for s in TABLE_SEQ_LENS},
        "sliding_window": cfg.sliding_window if any(g.spec.window for g in spec.groups) else None,
        "num_sliding_layers": sum(len(g.layers) for g in spec.groups if g.spec.window),
        "num_groups": len(spec.groups),
        **_per_rank(cfg, kv_dtype, quant, tensor_parallel_size, seq_len, batch),
    }


def _per_rank(cfg, kv_dtype, quant, world: int, seq_len: int, batch: int) -> dict:
    """Tensor parallelism: each rank's KV heads and bytes, and the sum over ranks (replicated KV heads
    counted on every rank that holds one)."""
    from kvserve.kv.spec import KVSpec
    from kvserve.models.shard import check_tp, shard_config

    try:
        check_tp(cfg, world)
    except ValueError as e:
        raise CLIError(str(e)) from e
    spec = KVSpec.from_model(shard_config(cfg, 0, world), kv_dtype, quant)
    return {"tensor_parallel_size": world, "num_kv_heads_per_rank": spec.num_kv_heads,
            "bytes_per_token_per_rank": spec.bytes_per_token, "formula_bytes_per_rank": spec.formula_bytes(seq_len, batch),
            "formula_bytes_all_ranks": world * spec.formula_bytes(seq_len, batch)}


def cmd_estimate(args: argparse.Namespace) -> int:
    from kvserve.kv.spec import format_bytes

    e = estimate(args.model, args.seq_len, args.batch, args.dtype, args.kv_cache, args.block_size, args.memory,
                 args.kv_cache_dtype, args.max_model_len, args.tensor_parallel_size)
    if args.json:
        print(json.dumps(e, indent=2))
        return 0
    L, H, D, nb, sb = e["num_layers"], e["num_kv_heads"], e["head_dim"], e["dtype_bytes"], e["scale_bytes"]
    S, B, bpt = e["seq_len"], e["batch"], e["bytes_per_token"]
    mem = format_bytes(e["memory_bytes"])
    kb, vb = e["key_bytes_per_value"], e["value_bytes_per_value"]
    nb = f"{nb:g}"
    two = "2 * "
    if sb and kb != vb:  # K and V stored in different codecs (int4: 5-bit keys, 4-bit values)
        formula = ("layers * kv_heads * ((head_dim * K bytes + scale bytes) + (head_dim * V bytes + scale bytes))"
                   " * seq * batch")
        per = f"(({D} * {kb:g} + {sb}) + ({D} * {vb:g} + {sb}))"
        full, two = f"{per} * {S} * {B}", ""
    elif sb:  # quantized: each token's K (and V) row of each KV head carries one scale
        formula = "2 (K and V) * layers * kv_heads * (head_dim * bytes + scale bytes) * seq * batch"
        full, per = f"({D} * {nb} + {sb}) * {S} * {B}", f"({D} * {nb} + {sb})"
    else:
        formula = "2 (K and V) * layers * kv_heads * head_dim * seq * batch * bytes"
        full, per = f"{D} * {S} * {B} * {nb}", f"{D} * {nb}"
    W, Ls = e["sliding_window"], e["num_sliding_layers"]
    layers = f"{L}"
    if W:  # sliding layers keep min(seq, W) tokens: write the formula in two terms
        full = full.replace(f"* {S} *", "* ({} * {} + {} * {}) *".format(L - Ls, S, Ls, min(S, W)))
        layers = "1"
    out = [
        f"model {e['model']}: {L} layers, {H} KV heads, head_dim {D}, KV dtype {e['dtype']} ("
        + (f"{nb} bytes per value" if kb == vb else f"keys {kb:g}, values {vb:g} bytes per value")
        + (f", one {sb}-byte scale per token and KV head)" if sb else ")")
        + (f"; {Ls} of the layers attend to a sliding window of {W} tokens and keep only those" if W else ""),
        "",
        f"KV cache, the formula: {formula}",
        f"  {two}{layers} * {H} * {full} = {e['formula_bytes']:,} bytes = {format_bytes(e['formula_bytes'])}",
        f"  per token: {two}{L} * {H} * {per} = {bpt:,} bytes = {format_bytes(bpt)}"
        + (" (a sliding layer's token only while in its window)" if W else ""),
        "",
    ]
    if e["kv_cache"] != "contiguous":
        out += [
            f"the engine would allocate ({e['kv_cache']}, block_size {e['block_size']}): {e['num_blocks']} blocks x "
            f"{e['block_size']} tokens x {e['null_block_bytes'] // e['block_size']:,} bytes = {e['allocated_bytes']:,} "
            f"bytes = {format_bytes(e['allocated_bytes'])}"
            + (f" (a block holds one KV cache group of {L // e['num_groups']} layers)" if e["num_groups"] > 1 else ""),
            f"  = the formula + 1 null block ({format_bytes(e['null_block_bytes'])}, never handed out: it pads "
            "block tables)" + (f" + {format_bytes(e['padding_bytes'])} rounding each sequence up to whole blocks"
                               + (" (a sliding group also holds one prompt chunk past its window)" if W else "")
                               if e["padding_bytes"] else ""),
        ]
    else:
        out += [
            f"the engine would allocate (contiguous): {e['num_blocks']} slots x {e['block_size']} tokens x "
            f"{bpt:,} bytes = {e['allocated_bytes']:,} bytes = {format_bytes(e['allocated_bytes'])}",
            f"  = the formula + 1 null slot of {e['block_size']} tokens ({format_bytes(e['null_block_bytes'])})"
            + (f" + {format_bytes(e['padding_bytes'])} of slots longer than seq {S} (max_model_len "
               f"{e['block_size']})" if e["padding_bytes"] else "")
            + ": the +1 is the null block that pads reads, never handed to a sequence",
        ]
    if e["tensor_parallel_size"] > 1:
        n = e["tensor_parallel_size"]
        out += ["", f"tensor parallel over {n} ranks: each holds {e['num_kv_heads_per_rank']} of the {H} KV heads "
                    f"({e['bytes_per_token_per_rank']:,} bytes per token), {format_bytes(e['formula_bytes_per_rank'])} "
                    f"per rank, {format_bytes(e['formula_bytes_all_ranks'])} over all ranks"
                    + (" (KV heads replicated: fewer heads than ranks)" if n > H else "")]
    if S > e["model_context_length"]:
        out.append(f"note: seq {S} is longer than the model's context ({e['model_context_length']} tokens)")
    out += [
        "",
        f"in {mem} of KV memory (formula, no null block):",
        f"  largest batch at seq {S}: {e['max_batch_at_seq']}",
        f"  longest seq at batch {B}: {e['max_seq_at_batch']:,} tokens",
        "",
        f"  {'seq':>6}  {'KV per seq':>12}  {'max batch':>9}",
    ]
    for s in TABLE_SEQ_LENS:
        ctx = "" if s <= e["model_context_length"] else "  (beyond the model's context)"
        out.append(f"  {s:>6}  {format_bytes(e['bytes_per_seq_table'][str(s)]):>12}  {e['max_batch_table'][str(s)]:>9}{ctx}")
    print("\n".join(out))
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    from kvserve.ppl import corpus_text, perplexity

    if args.window < 2:
        raise CLIError(f"--window must be >= 2, got {args.window}")
    text = corpus_text() if args.file is None else open(args.file, encoding="utf-8").read()
    if args.max_model_len is None:
        args.max_model_len = args.window + 1  # the window and the one token each request generates
    llm = _build_llm(args)
    ids = llm.get_tokenizer().encode(text)
    t0 = time.perf_counter()
    r = perplexity(llm, ids, args.window, args.max_tokens)
    seconds = time.perf_counter() - t0
    spec = llm.engine.kv_spec
    out = {**r.as_dict(), "model": args.model, "kv_cache_dtype": spec.storage_name,
           "kv_bytes_per_token": spec.bytes_per_token, "window": args.window,
           "max_num_batched_tokens": args.max_num_batched_tokens, "seconds": seconds,
           "text": args.file or "pydoc_data.topics"}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"perplexity {r.perplexity:.4f} over {r.num_tokens:,} tokens ({r.num_windows} windows of up to "
              f"{args.window}; KV cache {spec.storage_name}, {spec.bytes_per_token:,} bytes per token; "
              f"{seconds:.1f} s)")
    return 0


def model_info(model: str) -> dict:
    import torch

    from kvserve.config import KV_CACHE_QUANT_DTYPES
    from kvserve.kv.spec import KVSpec

    from kvserve.engine.llm_engine import resolve_dtype, resolve_quantization

    cfg = _load_config(model)
    cpu = torch.device("cpu")
    quant, why = resolve_quantization("auto", cfg.weight_format, cpu)
    return {
        "name": cfg.name,
        "weight_format": cfg.weight_format,
        # what `kvserve generate/serve` choose on this machine's CPU by default, and why
        "default_dtype": str(resolve_dtype("auto", cpu)).removeprefix("torch."),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "default_quantization": quant,
        "default_quantization_reason": why,
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "gqa_group_size": cfg.num_heads // cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "rope_theta": cfg.rope_theta,
        "context_length": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "num_params": cfg.num_params(),
        "num_active_params": cfg.num_params(active=True),  # per token: a MoE layer runs only its top-k experts
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.expert_size if cfg.num_experts else None,
        "shared_expert_intermediate_size": cfg.shared_expert_intermediate_size,
        "moe_layers": [i for i in range(cfg.num_layers) if cfg.is_moe(i)],
        "kv_bytes_per_token_fp32": KVSpec.from_model(cfg, torch.float32).bytes_per_token,
        "kv_bytes_per_token_bf16": KVSpec.from_model(cfg, torch.bfloat16).bytes_per_token,
        # every --kv-cache-dtype: 16/32-bit values, or quantized codes + their scales
        "kv_bytes_per_token": {
            name: KVSpec.from_model(cfg, dt, q).bytes_per_token
            for name, dt, q in [("float32", torch.float32, None), ("bfloat16", torch.bfloat16, None)]
            + [(q, torch.bfloat16, q) for q in KV_CACHE_QUANT_DTYPES]},
        # one context-length sequence: sliding layers keep only their window
        "kv_bytes_per_context": {
            name: KVSpec.from_model(cfg, dt, q).formula_bytes(cfg.max_position_embeddings)
            for name, dt, q in [("float32", torch.float32, None), ("bfloat16", torch.bfloat16, None)]
            + [(q, torch.bfloat16, q) for q in KV_CACHE_QUANT_DTYPES]},
        "sliding_window": cfg.sliding_window if cfg.layer_types and "sliding" in cfg.layer_types else None,
        "full_attention_layers": [i for i in range(cfg.num_layers) if not cfg.is_sliding(i)],
        "rope_local_theta": cfg.rope_local_theta,
    }


def cmd_info(args: argparse.Namespace) -> int:
    from kvserve.kv.spec import format_bytes

    i = model_info(args.model)
    if args.json:
        print(json.dumps(i, indent=2))
        return 0
    n = i["num_params"]
    ctx = i["context_length"]
    rows = [
        ("layers", i["num_layers"]),
        ("hidden size", i["hidden_size"]),
        ("attention heads", i["num_heads"]),
        ("kv heads", i["num_kv_heads"]),
        ("head dim", i["head_dim"]),
        ("GQA group size", f"{i['gqa_group_size']} query heads per kv head"),
        ("intermediate size", i["intermediate_size"]),
        ("vocab size", i["vocab_size"]),
        ("rope theta", f"{i['rope_theta']:g}"),
        *([("sliding window", f"{i['sliding_window']} tokens on {i['num_layers'] - len(i['full_attention_layers'])} "
            f"layers (RoPE theta {i['rope_local_theta']:g}); full attention on layers "
            f"{', '.join(map(str, i['full_attention_layers']))}")] if i["sliding_window"] else []),
        ("context length", ctx),
        ("tied embeddings", "yes" if i["tie_word_embeddings"] else "no"),
        ("parameters", f"{n / 1e6:.1f}M ({n:,})"),
        ("weights in the file", i["weight_format"] or "floats"),
        ("default on this CPU", f"dtype {i['default_dtype']} (CPU capability {i['cpu_capability']}: bf16 only "
                                f"where the CPU has bf16 instructions), weights "
                                f"{i['default_quantization'] or i['default_dtype']}: {i['default_quantization_reason']}"),
    ]
    if i["num_experts"]:
        a = i["num_active_params"]
        rows[-1:-1] = [("experts", f"{i['num_experts']} of width {i['moe_intermediate_size']} on "
                                   f"{len(i['moe_layers'])} of {i['num_layers']} layers, top-{i['num_experts_per_tok']} per token"
                                   + (f", plus a shared expert of width {i['shared_expert_intermediate_size']}"
                                      if i["shared_expert_intermediate_size"] else ""))]
        rows.append(("active parameters", f"{a / 1e6:.1f}M per token ({a:,}; {a / n:.0%} of all)"))
    for label, b in i["kv_bytes_per_token"].items():
        rows.append((f"KV per token {label}", f"{b:,} bytes = {format_bytes(b)} "
                                              f"({format_bytes(i['kv_bytes_per_context'][label])} for one {ctx}-token sequence)"))
    width = max(len(r[0]) for r in rows)
    print(f"model {i['name']}")
    print("\n".join(f"  {label:<{width}}  {value}" for label, value in rows))
    return 0


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    verbose = getattr(args, "verbose", False)
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # stdout closed early (`kvserve ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (CLIError, ValueError, RuntimeError, OSError) as e:
        if verbose:
            log.exception("%s failed", args.command)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
