"""``kvserve bench serve``: load-test any OpenAI-compatible server through streaming /v1/completions.

Per request it records the time to the first token (TTFT), the gaps between streamed chunks (ITL),
the time per output token after the first (TPOT = (e2e - TTFT) / (tokens - 1)) and the end-to-end
latency; it reports their mean, p50, p90 and p99 and the request and output-token throughput.
Load is either a fixed number of clients (``--concurrency``) or Poisson arrivals at ``--request-rate``.

Output tokens are the server's ``usage.completion_tokens`` when it sends usage (we ask with
``stream_options.include_usage``), else the number of chunks that carried text.

The requests go out through the load generator's own minimal HTTP/1.1 client (``--client raw``, the
default: it takes the least CPU from a server on the same cores) or through httpx (``--client httpx``).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field

_WORDS = ("time river light stone garden music paper window market silver forest engine story winter "
          "mountain letter bridge ocean city morning signal number table voice circle").split()


@dataclass
class RequestResult:
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None


def add_bench_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    p.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY") or os.environ.get("KVSERVE_API_KEY"))
    p.add_argument("--num-prompts", type=int, default=32)
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=None, help="clients that each send one request at a time")
    load.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second (inf: all at once)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--input-len", type=int, default=32, help="words per synthetic prompt")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM/kvserve extra) for fixed lengths")
    p.add_argument("--min-tokens", type=int, default=None,
                   help="send min_tokens (vLLM, kvserve and llama-cpp-python extra): with --max-tokens, fixed lengths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="the HTTP client that streams: raw (the load generator's own, lightest on the CPU) or httpx")
    p.add_argument("--json-out", default=None, help="write the results as JSON here")
    return p


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to the subparsers of a ``bench`` command; it sets ``func=run_bench``."""
    p = subparsers.add_parser("serve", help="load-test an OpenAI-compatible server (streaming /v1/completions)",
                              description=__doc__.split("\n")[0])
    add_bench_args(p)
    p.set_defaults(func=run_bench)
    return p


def make_prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"Request {i}: " + " ".join(rng.choice(_WORDS) for _ in range(words)) for i in range(n)]


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    s = sorted(xs)

    def q(p: float) -> float:  # linear interpolation, as numpy's default
        k = (len(s) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {"mean": sum(s) / len(s), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


class _HTTPStatus(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(f"HTTP {status}: {text[:300]}")


async def _raw_lines(url: str, body: dict, headers: dict) -> AsyncIterator[str]:
    """POST ``body`` as JSON; yield the response's lines as they arrive.

    The load generator's own HTTP/1.1 client, on asyncio streams: one connection per request
    (``Connection: close``), a chunked or sized body. It exists because the load generator shares the
    machine's cores with the server it measures: httpx spent ~0.35 ms of CPU per streamed token and this
    ~0.12 (2 cores, Sapphire Rapids), and every such millisecond is taken from the server's steps (see
    docs/benchmarks.md, session 16). ``--client httpx`` measures through httpx instead."""
    u = urllib.parse.urlsplit(url)
    tls = u.scheme == "https"
    reader, writer = await asyncio.open_connection(u.hostname, u.port or (443 if tls else 80), ssl=tls or None)
    try:
        payload = json.dumps(body).encode()
        head = [f"POST {u.path or '/'}{'?' + u.query if u.query else ''} HTTP/1.1", f"Host: {u.netloc}",
                "Content-Type: application/json", f"Content-Length: {len(payload)}", "Connection: close",
                *(f"{k}: {v}" for k, v in headers.items())]
        writer.write("\r\n".join(head).encode() + b"\r\n\r\n" + payload)
        status = int((await reader.readline()).split()[1])
        fields = {}
        while (line := await reader.readline()).strip():
            name, _, value = line.decode("latin-1").partition(":")
            fields[name.strip().lower()] = value.strip()
        chunked = "chunked" in fields.get("transfer-encoding", "").lower()
        size = int(fields["content-length"]) if "content-length" in fields else None

        async def pieces() -> AsyncIterator[bytes]:
            if chunked:
                while n := int((await reader.readline()).split(b";")[0], 16):
                    yield (await reader.readexactly(n + 2))[:-2]  # the data and its CRLF
            elif size is not None:
                yield await reader.readexactly(size)
            else:
                yield await reader.read()  # to the end: the server closes the connection

        if status != 200:
            raise _HTTPStatus(status, b"".join([p async for p in pieces()]).decode(errors="replace"))
        rest = b""
        async for piece in pieces():
            *lines, rest = (rest + piece).split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r").decode()
        if rest:
            yield rest.decode()
    finally:
        writer.close()


async def _httpx_lines(client, url: str, body: dict, headers: dict) -> AsyncIterator[str]:
    async with client.stream("POST", url, json=body, headers=headers) as resp:
        if resp.status_code != 200:
            raise _HTTPStatus(resp.status_code, (await resp.aread()).decode(errors="replace"))
        async for line in resp.aiter_lines():
            yield line


async def _one(client, url: str, body: dict, headers: dict, timeout: float) -> RequestResult:
    """One streaming request; ``client`` is an httpx.AsyncClient, or None for ``_raw_lines``."""
    import httpx

    r = RequestResult()
    t0 = time.perf_counter()
    last = None
    chunks = 0
    usage_tokens = None

    async def consume() -> None:
        nonlocal last, chunks, usage_tokens
        lines = _raw_lines(url, body, headers) if client is None else _httpx_lines(client, url, body, headers)
        try:
            async for line in lines:
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    r.error = str(obj["error"])[:300]
                    return
                if obj.get("usage"):
                    usage_tokens = obj["usage"].get("completion_tokens")
                    r.prompt_tokens = obj["usage"].get("prompt_tokens")
                if any(c.get("text") for c in obj.get("choices") or []):
                    now = time.perf_counter()
                    if last is None:
                        r.ttft = now - t0
                    else:
                        r.itl.append(now - last)
                    last = now
                    chunks += 1
        finally:
            await lines.aclose()  # the connection, at once (the loop may leave at [DONE])

    try:
        await asyncio.wait_for(consume(), timeout)
    except asyncio.TimeoutError:
        r.error = f"timeout: no end after {timeout:g} s"
    except (_HTTPStatus, httpx.HTTPError, json.JSONDecodeError, OSError, ValueError, IndexError,
            asyncio.IncompleteReadError) as e:
        r.error = str(e) if isinstance(e, _HTTPStatus) else f"{type(e).__name__}: {e}"
    if r.error is not None:
        return r
    r.e2e = time.perf_counter() - t0
    r.output_tokens = usage_tokens if usage_tokens is not None else chunks
    r.ok = r.ttft is not None or r.output_tokens == 0
    if not r.ok:
        r.error = "no tokens streamed"
    return r


async def _resolve_model(client, base: str, headers: dict) -> str:
    resp = await client.get(f"{base}/v1/models", headers=headers)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def bench(args: argparse.Namespace) -> dict:
    import httpx

    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    prompts = make_prompts(args.num_prompts, args.input_len, args.seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=args.timeout) as client:
        model = args.model or await _resolve_model(client, base, headers)

        def body(prompt: str) -> dict:
            b = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
                 "stream": True, "stream_options": {"include_usage": True}}
            if args.ignore_eos:
                b["ignore_eos"] = True
            if args.min_tokens:
                b["min_tokens"] = args.min_tokens
            return b

        url = f"{base}/v1/completions"
        streamer = client if args.client == "httpx" else None
        results: list[RequestResult | None] = [None] * len(prompts)
        t0 = time.perf_counter()
        if args.request_rate is not None:
            rng = random.Random(args.seed)

            async def at(i: int, delay: float) -> None:
                await asyncio.sleep(delay)
                results[i] = await _one(streamer, url, body(prompts[i]), headers, args.timeout)

            t, tasks = 0.0, []
            for i in range(len(prompts)):
                tasks.append(asyncio.create_task(at(i, t)))
                if math.isfinite(args.request_rate) and args.request_rate > 0:
                    t += rng.expovariate(args.request_rate)
            await asyncio.gather(*tasks)
        else:
            concurrency = args.concurrency or 1
            nxt = iter(range(len(prompts)))

            async def worker() -> None:
                for i in nxt:
                    results[i] = await _one(streamer, url, body(prompts[i]), headers, args.timeout)

            await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
        duration = time.perf_counter() - t0
    return summarize([r for r in results if r is not None], duration, args, model)


def summarize(results: list[RequestResult], duration: float, args: argparse.Namespace, model: str) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    return {
        "base_url": args.base_url, "model": model, "num_prompts": len(results),
        "concurrency": args.concurrency, "request_rate": args.request_rate, "max_tokens": args.max_tokens,
        "input_len_words": args.input_len,
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:10],
        "duration_s": duration,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else None,
        "output_throughput": out_tokens / duration if duration > 0 else None,
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": percentiles(tpot),
        "itl_s": percentiles([x for r in ok for x in r.itl]),
        "e2e_s": percentiles([r.e2e for r in ok if r.e2e is not None]),
        "requests": [asdict(r) for r in results],
    }


def format_report(res: dict) -> str:
    ms = lambda x: "-" if x is None else f"{x * 1000:.1f}"  # noqa: E731
    load = f"concurrency {res['concurrency']}" if res["request_rate"] is None else f"rate {res['request_rate']}/s"
    lines = [
        f"{'=' * 20} kvserve bench serve {'=' * 20}",
        f"server            {res['base_url']}  model {res['model']}  ({load})",
        f"completed/failed  {res['completed']} / {res['failed']}",
        f"duration          {res['duration_s']:.2f} s",
        f"output tokens     {res['total_output_tokens']}",
        f"request thpt      {res['request_throughput'] or 0:.2f} req/s",
        f"output thpt       {res['output_throughput'] or 0:.1f} tok/s",
        f"{'(ms)':<18}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E")):
        p = res[key]
        lines.append(f"{label:<18}{ms(p['mean']):>10}{ms(p['p50']):>10}{ms(p['p90']):>10}{ms(p['p99']):>10}")
    for e in res["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> int:
    if args.num_prompts < 1:
        raise SystemExit("--num-prompts must be >= 1")
    if args.concurrency is None and args.request_rate is None:
        args.concurrency = 1
    res = asyncio.run(bench(args))
    print(format_report(res))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if res["failed"] == 0 else 1


def main(argv: list[str] | None = None) -> None:
    p = add_bench_args(argparse.ArgumentParser(prog="python -m kvserve.server.bench",
                                               description=__doc__.split("\n")[0]))
    raise SystemExit(run_bench(p.parse_args(argv)))


if __name__ == "__main__":
    main()
