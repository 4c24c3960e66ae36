"""Served throughput and latency (issue 6): kvserve's OpenAI server against llama.cpp's, same GGUF file.

Each server runs alone on the machine (started, measured at every concurrency, stopped; then the next),
on 127.0.0.1 and a free port, and is driven by ``kvserve bench serve`` (``kvserve/server/bench.py``):
streaming ``/v1/completions``, ``--num-prompts`` synthetic prompts of ``--input-len`` words, greedy,
``--max-tokens`` tokens each, through the load generator's own light HTTP client (``--client httpx`` for
httpx, which takes ~3x its CPU per token from the cores the server runs on). Rounds repeat the whole
sweep ``--rounds`` times and alternate the order of the servers; figures are medians over rounds.

Servers:

  kvserve    ``kvserve serve --model M --max-num-seqs 64`` (paged cache, continuous batching; the
             defaults: ``--quantization auto``, int4 for this Q4_1 file at up to 4 rows, the model dtype's
             dense weights above; the dtype bf16, or fp32 on an AVX2 CPU)
  kvserve-w8a8-channel  the same with ``--quantization w8a8-channel``: int8 weights x per-token int8
             activations in fbgemm (int32 sums), the fast batched int8 setting (called ``kvserve-w8a8``
             before session 15, when ``w8a8`` meant this)
  offline    not a server: the same prompts through ``LLM`` in a process of its own, one request at a
             time (concurrency 1 only), timed at each engine step. The reference for the server's
             batch-1 time per output token (issue 16: within 10 % of it). The load generator shares the
             cores with a server, not with this.
  llama.cpp  ``python -m llama_cpp.server --model <the same .gguf> --n_ctx 4096 --n_threads <cores>
             --interrupt_requests False``
             from llama-cpp-python, in its own venv (``--llama-python``, default ``.venv-llama/bin/python``;
             build it with ``make bench-llama``). Weights stay Q4_1 and the KV cache is f16; it serves one
             request at a time. Where its extra buffer types (AMX) crash (a probe runs first), without them.

Every request sends ``min_tokens = max_tokens`` (both servers accept it), so each makes exactly
``--max-tokens`` tokens; output tokens are counted from the servers' ``usage``.

    .venv/bin/python benchmarks/bench_serve.py                  # concurrency 1, 4, 16, 64
    .venv/bin/python benchmarks/bench_serve.py --quick          # concurrency 1 and 4, few prompts
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# every system in the process (kvserve and its peer alike) allocates large tensors on 2 MiB pages
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when run as a script
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `kvserve` without an install

from common import (  # noqa: E402
    LLAMA_NO_EXTRA_BUFTS, RESULTS_DIR, cpu_info, finish_figure, fmt, format_cpu_info, format_table, llama_extra_bufts_work,
    median, now_iso, pyplot, save_json,
)

from kvserve.models.loader import DEFAULT_MODEL, resolve_model  # noqa: E402
from kvserve.server.bench import add_bench_args, bench  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready ({url})")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server not ready after {timeout:.0f} s: {url}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def server_command(name: str, args: argparse.Namespace, port: int) -> tuple[list[str], str]:
    """The command that starts one server, and the URL that answers 200 once it is ready."""
    base = f"http://127.0.0.1:{port}"
    if name.startswith("kvserve"):  # kvserve or kvserve-<quantization>
        cmd = [sys.executable, "-m", "kvserve.cli", "serve", "--model", args.model, "--port", str(port),
               "--max-num-seqs", str(args.max_num_seqs), "--log-level", "warning"]
        if "-" in name:
            cmd += ["--quantization", name.split("-", 1)[1]]
        return cmd, f"{base}/health"
    gguf = str(resolve_model(args.model).path)
    if args.llama_extra_bufts is None:
        args.llama_extra_bufts = llama_extra_bufts_work(args.llama_python, gguf)
        print(f"  llama.cpp extra buffer types (AMX, repacked weights): "
              f"{'on' if args.llama_extra_bufts else 'off: they crash on this machine'}", flush=True)
    launch = ["-m", "llama_cpp.server"] if args.llama_extra_bufts else \
        ["-c", LLAMA_NO_EXTRA_BUFTS + "from llama_cpp.server.__main__ import main\nmain()\n"]
    cmd = [args.llama_python, *launch, "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
           "--n_ctx", "4096", "--n_threads", str(os.cpu_count() or 1), "--n_threads_batch", str(os.cpu_count() or 1),
           # queue concurrent requests instead of cutting the streaming one short (its default)
           "--interrupt_requests", "False",
           "--model_alias", "smollm2"]
    return cmd, f"{base}/v1/models"


def offline_tpot(args: argparse.Namespace) -> dict:
    """(In the child process of ``run_offline``.) The server's workload at concurrency 1 through the
    offline engine: each prompt alone, TTFT from its arrival to its first token, TPOT = (last token -
    first token) / (tokens - 1), as the load generator computes them."""
    from kvserve import LLM, SamplingParams
    from kvserve.server.bench import make_prompts, percentiles

    b = args.bench
    engine = LLM(args.model, max_num_seqs=args.max_num_seqs).engine
    n = max(args.min_prompts, args.prompts_per_client)
    params = SamplingParams(max_tokens=b.max_tokens, min_tokens=b.max_tokens, temperature=b.temperature,
                            ignore_eos=b.ignore_eos)
    ttft, tpot = [], []
    for _ in range(2 if args.warmup else 1):  # with --warmup, as the servers get: the second pass counts
        ttft.clear()
        tpot.clear()
        for prompt in make_prompts(n, b.input_len, b.seed):
            t0 = time.perf_counter()
            engine.add_request(prompt, params)
            times, made = [], 0
            while engine.has_unfinished_requests():
                for out in engine.step():
                    k = len(out.outputs[0].token_ids)
                    if k > made:
                        times.append(time.perf_counter())
                        made = k
            ttft.append(times[0] - t0)
            tpot.append((times[-1] - times[0]) / max(made - 1, 1))
    return {"ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot), "completed": n, "failed": 0,
            "total_output_tokens": n * b.max_tokens, "output_throughput": None, "request_throughput": None,
            "itl_s": percentiles([]), "e2e_s": percentiles([])}


def run_offline(args: argparse.Namespace) -> dict[int, dict]:
    """``offline_tpot`` in a fresh process (no server, no load generator beside it), at concurrency 1."""
    import json

    cmd = [sys.executable, __file__, "--offline-child", *sys.argv[1:]]
    res = json.loads(subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    res["mean_output_tokens"] = res["total_output_tokens"] / res["completed"]
    print(f"  offline   c=1   TTFT p50 {res['ttft_s']['p50'] * 1000:.0f} ms  TPOT p50 {res['tpot_s']['p50'] * 1000:.1f} ms",
          flush=True)
    return {1: res}


def run_server_sweep(name: str, args: argparse.Namespace) -> dict[int, dict]:
    if name == "offline":
        return run_offline(args)
    port = free_port()
    cmd, ready = server_command(name, args, port)
    # Each server with the OpenMP wait policy it does best with. kvserve: OpenMP's default (threads spin a
    # while between parallel regions). Session 11, Sapphire Rapids, int4 default: PASSIVE (sleeping
    # threads) made the 1-stream time per token 21.9 ms against 11.8 ms (the offline step: 11.2) and 16
    # streams 273 against 382 tok/s: a decode step is ~250 small parallel regions, each paying a wake-up.
    # (Session 5, Zen 4, bf16: PASSIVE was within noise, 214 vs 203 tok/s at 16 streams.) llama.cpp: its
    # default; PASSIVE made its per-token time 2.4x longer (32.5 vs 13.3 ms at one stream, session 5).
    env = dict(os.environ)
    if name.startswith("kvserve") and args.kvserve_omp_wait:
        env["OMP_WAIT_POLICY"] = args.kvserve_omp_wait
    log = open(RESULTS_DIR / f"bench_serve_{name}.log", "a")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    out = {}
    try:
        wait_ready(ready, proc)
        for c in args.concurrency:
            b = argparse.Namespace(**vars(args.bench))
            b.base_url, b.concurrency = f"http://127.0.0.1:{port}", c
            b.num_prompts = max(args.min_prompts, args.prompts_per_client * c)
            b.min_tokens = b.max_tokens  # both servers take min_tokens: every request makes max_tokens
            if args.warmup:
                asyncio.run(bench(b))
            res = asyncio.run(bench(b))
            res.pop("requests", None)
            res["mean_output_tokens"] = res["total_output_tokens"] / max(res["completed"], 1)
            out[c] = res
            print(f"  {name:<9} c={c:<3} {res['output_throughput']:.1f} tok/s  TTFT p50 "
                  f"{res['ttft_s']['p50'] * 1000:.0f} ms  TPOT p50 {res['tpot_s']['p50'] * 1000:.1f} ms  "
                  f"failed {res['failed']}", flush=True)
    finally:
        stop(proc)
        log.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--prompts-per-client", type=int, default=2)
    p.add_argument("--min-prompts", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--warmup", action="store_true", help="an untimed pass at each concurrency first")
    p.add_argument("--llama-python", default=str(ROOT / ".venv-llama" / "bin" / "python"))
    p.add_argument("--servers", default="kvserve,kvserve-w8a8-channel,llama.cpp")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--kvserve-omp-wait", default="", help="OMP_WAIT_POLICY for kvserve (default: unset, OpenMP's own)")
    p.add_argument("--llama-extra-bufts", default=None, type=lambda v: v == "on", metavar="on|off",
                   help="llama.cpp's extra buffer types (AMX, repacked weights); default: on unless a probe crashes")
    p.add_argument("--tag", default="")
    p.add_argument("--offline-child", action="store_true", help=argparse.SUPPRESS)  # run_offline's process
    bench_args = add_bench_args(argparse.ArgumentParser(add_help=False))
    args, rest = p.parse_known_args()
    args.bench = bench_args.parse_args(rest)
    if args.quick:
        args.concurrency, args.rounds, args.min_prompts, args.prompts_per_client = "1,4", 1, 4, 1
    if args.offline_child:
        import json

        print(json.dumps(offline_tpot(args)))
        return
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    servers = args.servers.split(",")
    if "llama.cpp" in servers and not Path(args.llama_python).exists():
        print(f"llama-cpp-python not found at {args.llama_python} (make bench-llama): kvserve only", file=sys.stderr)
        servers.remove("llama.cpp")

    machine = cpu_info()
    print(format_cpu_info(machine))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    rounds: dict[str, list[dict[int, dict]]] = {s: [] for s in servers}
    for r in range(args.rounds):
        order = servers if r % 2 == 0 else servers[::-1]
        for s in order:
            print(f"round {r + 1}/{args.rounds}: {s}", flush=True)
            rounds[s].append(run_server_sweep(s, args))

    def med(s: str, c: int, get) -> float | None:
        return median(get(rd[c]) for rd in rounds[s] if c in rd)

    def ms(v: float | None) -> float | None:  # the offline reference has no throughput, ITL or E2E
        return None if v is None else v * 1000

    metrics = {
        "output_tok_s": lambda x: x["output_throughput"],
        "request_per_s": lambda x: x["request_throughput"],
        "ttft_p50_ms": lambda x: ms(x["ttft_s"]["p50"]),
        "ttft_p99_ms": lambda x: ms(x["ttft_s"]["p99"]),
        "tpot_p50_ms": lambda x: ms(x["tpot_s"]["p50"]),
        "itl_p99_ms": lambda x: ms(x["itl_s"]["p99"]),
        "e2e_p50_s": lambda x: x["e2e_s"]["p50"],
        "mean_output_tokens": lambda x: x["mean_output_tokens"],
        "failed": lambda x: x["failed"],
    }
    summary = {s: {c: {k: med(s, c, f) for k, f in metrics.items()} for c in args.concurrency} for s in servers}
    headers = ["concurrency", "server", "out tok/s", "req/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
               "ITL p99 ms", "E2E p50 s", "tokens/req", "failed"]
    rows = []
    for c in args.concurrency:
        for s in servers:
            m = summary[s][c]
            rows.append([c, s, fmt(m["output_tok_s"]), fmt(m["request_per_s"], 2), fmt(m["ttft_p50_ms"], 0),
                         fmt(m["ttft_p99_ms"], 0), fmt(m["tpot_p50_ms"]), fmt(m["itl_p99_ms"]), fmt(m["e2e_p50_s"], 2),
                         fmt(m["mean_output_tokens"]), fmt(m["failed"], 0)])
    print(format_table(headers, rows))
    ratios: dict[str, dict[int, float | None]] = {}
    tpot_vs_offline: dict[str, float | None] = {}  # issue 16: the server's batch-1 TPOT within 10 % of this
    for s in (s for s in servers if s.startswith("kvserve") and "offline" in servers):
        a, b = summary[s][1]["tpot_p50_ms"], summary["offline"][1]["tpot_p50_ms"]
        tpot_vs_offline[s] = a / b if a and b else None
        print(f"batch-1 TPOT p50 {s} / offline engine: {fmt(a)} / {fmt(b)} ms = {fmt(tpot_vs_offline[s], 3)}x")
    for s in servers if "llama.cpp" in servers else []:
        if s.startswith("kvserve"):
            ratios[s] = {}
            for c in args.concurrency:
                a, b = summary[s][c]["output_tok_s"], summary["llama.cpp"][c]["output_tok_s"]
                ratios[s][c] = a / b if a and b else None
                print(f"output tok/s {s} / llama.cpp at concurrency {c}: {fmt(ratios[s][c], 2)}x")

    tag = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    path = save_json(RESULTS_DIR / f"bench_serve{tag}.json", {
        "benchmark": "bench_serve", "date": now_iso(), "machine": machine, "settings": {
            k: v for k, v in vars(args).items() if k != "bench"} | {"bench": vars(args.bench)},
        "summary": summary, "ratio_output_tok_s_vs_llama_cpp": ratios,
        "ratio_tpot_vs_offline": tpot_vs_offline, "rounds": rounds})
    print(f"saved {path}")
    plot(summary, args.concurrency, RESULTS_DIR / f"bench_serve{tag}.png", machine)


def plot(summary: dict, concurrency: list[int], path: Path, machine: dict) -> None:
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), dpi=110)
    for s, per_c in summary.items():
        xs = concurrency
        axes[0].plot(xs, [per_c[c]["output_tok_s"] for c in xs], marker="o", label=s)
        axes[1].plot(xs, [per_c[c]["ttft_p50_ms"] for c in xs], marker="o", label=s)
        axes[2].plot(xs, [per_c[c]["tpot_p50_ms"] for c in xs], marker="o", label=s)
    for ax, label in zip(axes, ("output tok/s", "TTFT p50 (ms)", "TPOT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrency)
        ax.set_xticklabels([str(c) for c in concurrency])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    finish_figure(fig, f"Served /v1/completions (streaming), SmolLM2-135M; {machine['cpu_model']}, "
                       f"{machine['logical_cpus']} CPUs", path)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
