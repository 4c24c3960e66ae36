"""``kvserve serve``: load the model, start the engine thread, serve the app with uvicorn.

Wiring into a top-level argparse CLI whose subcommands dispatch through ``args.func(args)``::

    from kvserve.server.cli import add_serve_parser
    add_serve_parser(subparsers)

SIGTERM / SIGINT: the engine stops taking requests and aborts those in flight at once (their streams
end with finish_reason "abort"), so uvicorn's graceful shutdown does not wait on long generations;
then uvicorn closes the connections and the app's lifespan joins the engine thread.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
from dataclasses import asdict

from kvserve.args import EngineArgs


def add_serve_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The server's own flags, then the engine's (``EngineArgs.add_cli_args``: the same as ``kvserve generate``)."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("KVSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $KVSERVE_API_KEY, else open)")
    p.add_argument("--served-model-name", default=None, help="the name clients send as 'model' (default: --model)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="most unfinished requests (running + waiting); one more gets 503 (default: no limit)")
    p.add_argument("--no-kv-prefault", dest="kv_prefault", action="store_false",
                   help="leave the KV pool's pages untouched until requests reach them (default: touch them all while "
                        "idle, so that a fresh server's first requests do not pay the page faults)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--trace", metavar="FILE", default=None,
                   help="on shutdown, write every engine step, request phase and block count as a Chrome/Perfetto trace")
    r = p.add_argument_group("replicas on Ray (kvserve/server/replicas.py)")
    r.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="run N engine replicas as a Ray Serve deployment behind this front end")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join a running Ray cluster ('auto', or host:port of `ray start --head`); default: start a "
                        "local Ray instance. Implies --replicas 1 if --replicas is not given")
    r.add_argument("--router", default="prefix", choices=["prefix", "round-robin"],
                   help="how requests pick a replica: the one holding the longest cached prefix (Ray Serve's "
                        "PrefixCacheAffinityRouter), or in turn")
    r.add_argument("--cpus-per-replica", type=int, default=None, metavar="C",
                   help="CPUs each replica reserves and its torch threads (default: the cluster's CPUs / N)")
    return EngineArgs.add_cli_args(p)


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to an argparse subparsers object; it sets ``func=run_server``."""
    p = subparsers.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                              description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health "
                                          "and /metrics.")
    add_serve_args(p)
    p.set_defaults(func=run_server)
    return p


def run_server(args: argparse.Namespace) -> int:
    import uvicorn

    from kvserve.engine.async_llm import AsyncLLM
    from kvserve.server.app import build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("kvserve.server")
    # an AsyncLLM argument, not an engine one: each replica's AsyncLLM takes it from these too
    engine_kwargs = {**asdict(EngineArgs.from_cli_args(args)), "prefault": args.kv_prefault}
    if args.replicas is not None or args.ray_address is not None:
        if args.trace:
            raise SystemExit("--trace records one in-process engine; it does not combine with --replicas")
        try:
            from kvserve.server.replicas import ReplicaSet
        except ImportError as e:
            raise SystemExit(f"--replicas needs Ray Serve ({e}): pip install 'kvserve[ray]'") from None

        llm = ReplicaSet(engine_kwargs, args.replicas or 1, ray_address=args.ray_address, router=args.router,
                         cpus_per_replica=args.cpus_per_replica, max_queue=args.max_queue)
    else:
        llm = AsyncLLM(max_queue=args.max_queue, **engine_kwargs)
    name = args.served_model_name or args.model
    app = build_app(llm, name, api_key=args.api_key)
    if args.trace:
        from kvserve.cli import Observers

        observers = Observers(llm.engine, trace=args.trace)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            llm.shutdown(wait=False)  # abort in-flight requests now, so their responses end
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_keep_alive=5, timeout_graceful_shutdown=30)
    log.info("serving %s as %r on http://%s:%d (max_model_len=%d)", args.model, name, args.host, args.port,
             llm.max_model_len)
    # uvicorn restores the handlers it found and re-raises the signal once it has shut down; with
    # these in place that is a no-op, so a SIGTERM ends in a clean exit(0) rather than death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        Server(config).run()
    finally:
        llm.shutdown()
        if args.trace:
            observers.close()  # the engine thread has stopped: the trace is complete
    log.info("server stopped")
    return 0


def main(argv: list[str] | None = None) -> None:
    p = add_serve_args(argparse.ArgumentParser(prog="python -m kvserve.server", description=__doc__.split("\n")[0]))
    raise SystemExit(run_server(p.parse_args(argv)))
