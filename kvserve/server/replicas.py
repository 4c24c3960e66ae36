"""Engine replicas on Ray Serve, behind the one OpenAI front end: ``kvserve serve --replicas N``.

Each replica is one process holding one engine (an ``AsyncLLM``, the same as a single ``kvserve serve``)
as a Ray Serve deployment replica. The front end (this process: FastAPI, tokenizer, chat template,
metrics) turns each HTTP request into token ids and calls the deployment through a Ray Serve handle;
the handle's **request router** picks the replica:

* ``prefix`` (the default): Ray Serve's ``PrefixCacheAffinityRouter``. It keeps an approximate prefix
  tree of what it sent to each replica and sends a request to the replica with the longest match,
  unless the replicas' queue lengths differ by more than ``IMBALANCED_THRESHOLD`` (then power-of-two
  choices); a request matching less than 10% goes to the replica whose tree holds least. Requests that
  share a system prompt land where its KV blocks already are, and that replica's radix tree skips
  their prefill.
* ``round-robin``: replicas in turn, blind to what they hold (the benchmark's baseline).

The router's tree compares characters. A request shows it ``prompt``: one character per token id, so
a character match is a token match, the unit the replica's own prefix tree counts in.

Each replica publishes its ``AsyncLLM.stats()`` to a small named actor, the board, twice a second; the
front end reads the board for ``/metrics`` (one series per replica, labelled ``replica``), ``/replicas``
and ``/health``. A replica that dies (killed, crashed) fails its streams with an actor error; the front
end retries each such request once, through the router, which has dropped the dead replica, and Ray
Serve starts a new replica in its place. A retried stream skips what the client already has: exact
for greedy and seeded requests, which regenerate the same tokens.

Ray's public ``ray.serve.llm.request_router`` imports Ray Serve LLM, which needs vLLM or SGLang
installed; the router class is imported from the module that defines it when those are absent.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kvserve.engine.async_llm import Admission, AsyncLLM, EngineShutdownError, RequestStream
from kvserve.request import RequestOutput
from kvserve.sampling_params import SamplingParams

log = logging.getLogger("kvserve.replicas")

APP_NAME = "kvserve"
NAMESPACE = "kvserve"
BOARD_NAME = "kvserve-replica-board"
PUBLISH_S = 0.5  # how often a replica publishes its stats
STALE_S = 5.0  # a replica silent this long is counted as gone
IMBALANCED_THRESHOLD = 8  # queue-length gap (requests) past which prefix affinity yields to load
MAX_ONGOING_REQUESTS = 256  # per replica: the engine batches and queues itself (Ray Serve's default is 5)
ROUTERS = {
    "prefix": ("ray.serve.llm.request_router.PrefixCacheAffinityRouter",
               "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router.PrefixCacheAffinityRouter"),
    "round-robin": ("kvserve.server.replicas.RoundRobinRouter",),
}


@dataclass
class ReplicaRequest:
    """What the front end sends a replica: the prompt already tokenized, its sampling parameters."""

    request_id: str
    token_ids: list[int]
    text: str | None
    params: SamplingParams

    @property
    def prompt(self) -> str:
        """The key the prefix router matches on (it reads ``.prompt``): one character per token id."""
        return "".join(map(chr, self.token_ids))


class RoundRobinRouter(RequestRouter):
    """Replicas in turn, in a fixed order: the baseline prefix-aware routing is measured against."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._turn = 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        if not ordered:
            return []
        pick = ordered[self._turn % len(ordered)]
        if pending_request is not None:
            self._turn += 1
        return [[pick]]


@ray.remote(num_cpus=0)
class ReplicaBoard:
    """Every replica's latest stats, keyed by replica id: the front end's window on the replicas."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[float, dict]] = {}

    def put(self, replica_id: str, stats: dict) -> None:
        self.entries[replica_id] = (time.time(), stats)

    def get(self) -> dict[str, tuple[float, dict]]:
        return self.entries


@serve.deployment(name="engine", max_ongoing_requests=MAX_ONGOING_REQUESTS)
class EngineReplica:
    """One engine in one Ray actor process. Its outputs stream back to the front end as they come."""

    def __init__(self, engine_kwargs: dict, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.llm = AsyncLLM(**engine_kwargs)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.info = {"replica": self.replica_id, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                     "threads": threads, "max_model_len": self.llm.max_model_len}
        self._board = ray.get_actor(BOARD_NAME, namespace=NAMESPACE)
        self._stop = threading.Event()
        threading.Thread(target=self._publish, name="kvserve-publish", daemon=True).start()

    def _publish(self) -> None:
        while not self._stop.wait(PUBLISH_S):
            self._board.put.remote(self.replica_id, {**self.llm.stats(), **self.info})

    def describe(self) -> dict:
        return self.info

    async def generate(self, req: ReplicaRequest) -> AsyncIterator[RequestOutput]:
        # leaving early (the front end cancelled: client gone) closes AsyncLLM.generate, which aborts
        async for out in self.llm.generate({"prompt": req.text, "prompt_token_ids": req.token_ids}, req.params,
                                           req.request_id):
            yield out

    def __del__(self) -> None:
        self._stop.set()
        self.llm.shutdown(wait=False)


def _router_class(name: str) -> str:
    """The first import path of router ``name`` that imports here."""
    import importlib

    for path in ROUTERS[name]:
        module, _, attr = path.rpartition(".")
        try:
            getattr(importlib.import_module(module), attr)
            return path
        except ImportError:
            continue
    raise ImportError(f"no importable request router for {name!r} (tried {', '.join(ROUTERS[name])})")


def _is_replica_death(e: BaseException) -> bool:
    return isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


def _cause(e: BaseException) -> BaseException:
    """The replica's own exception (a ValueError for a bad prompt), not Ray's wrapper around it."""
    return getattr(e, "cause", None) or e


class ReplicaSet:
    """N engine replicas on Ray, with the surface of ``AsyncLLM`` that the HTTP front end uses
    (``add_request``, ``close``, ``tokenizer``, ``max_model_len``, ``stats``, ``is_alive``, ``shutdown``),
    and ``replica_stats``: each replica's ``AsyncLLM.stats()``, for /metrics and /replicas.

    ``ray_address``: None starts a Ray instance in this process; ``"auto"`` or ``host:port`` joins a
    running cluster (``ray start --head``). ``cpus_per_replica``: each replica's CPU reservation and torch
    thread count (default: the cluster's CPUs shared out evenly)."""

    def __init__(self, engine_kwargs: dict, replicas: int = 2, *, ray_address: str | None = None,
                 router: str = "prefix", cpus_per_replica: int | None = None, max_queue: int | None = None):
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {router!r}")
        if engine_kwargs.get("tensor_parallel_size", 1) > 1:
            raise ValueError("--replicas with --tensor-parallel-size > 1 is not supported yet: each replica "
                             "would start its own tensor-parallel workers inside a Ray actor")
        from kvserve.models.loader import DEFAULT_MODEL, load_tokenizer, resolve_model

        self._door = Admission(max_queue)  # AsyncLLM's: the same admission and max_queue count
        self.tokenizer = load_tokenizer(resolve_model(engine_kwargs.get("model", DEFAULT_MODEL)))
        self._own_ray = not ray.is_initialized() and ray_address is None
        if not ray.is_initialized():
            ray.init(address=ray_address, namespace=NAMESPACE, include_dashboard=False,
                     **({"num_cpus": os.cpu_count()} if ray_address is None else {}))
        cpus = cpus_per_replica or max(1, int(ray.cluster_resources().get("CPU", 1)) // replicas)
        self._board = ReplicaBoard.options(name=BOARD_NAME, namespace=NAMESPACE, get_if_exists=True).remote()
        serve.start(http_options={"location": "NoServer"})  # the front end is ours, not Serve's proxy
        deployment = EngineReplica.options(
            num_replicas=replicas, ray_actor_options={"num_cpus": cpus},
            request_router_config=RequestRouterConfig(
                request_router_class=_router_class(router),
                request_router_kwargs={"imbalanced_threshold": IMBALANCED_THRESHOLD} if router == "prefix" else {}))
        log.info("starting %d replica(s) with %d CPU(s) each, router %s", replicas, cpus, router)
        handle = serve.run(deployment.bind(engine_kwargs, cpus), name=APP_NAME, route_prefix=None)
        self._handle = handle.options(stream=True)
        self.num_replicas, self.router, self.cpus_per_replica = replicas, router, cpus
        self.max_model_len = handle.describe.remote().result()["max_model_len"]
        self.engine = None  # no engine in this process (the dashboard and /v1/models root look for one)
        self.num_failovers = 0
        self._pumps: dict[int, asyncio.Task] = {}
        self._replicas: dict[str, dict] = {}
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="kvserve-board", daemon=True)
        self._poller.start()
        self._wait_for_board(replicas, timeout=30.0)

    # ------------------------------------------------------------------ replicas' stats
    def _poll(self) -> None:
        while not self._stop.wait(PUBLISH_S):
            try:
                entries = ray.get(self._board.get.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - Ray going down at shutdown; the next poll tries again
                continue
            now = time.time()
            self._replicas = {rid: s for rid, (t, s) in sorted(entries.items()) if now - t < STALE_S}

    def _wait_for_board(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self._replicas) < n and time.monotonic() < deadline:
            time.sleep(0.1)

    def replica_stats(self) -> dict[str, dict]:
        """Each live replica's latest stats (AsyncLLM.stats() plus pid, node, threads), by replica id."""
        return dict(self._replicas)

    def stats(self) -> dict:
        """The front end's own counts. The engines' figures are per replica (``replica_stats``): summed
        here, ratios such as KV usage would come out wrong; Prometheus sums the labelled series."""
        return {"num_replicas": len(self._replicas), "replicas_configured": self.num_replicas,
                "num_failovers": self.num_failovers, **self._door.stats(), "accepting": self._door.open}

    def is_alive(self) -> bool:
        return self._door.open and bool(self._replicas)

    # ------------------------------------------------------------------ requests
    async def add_request(self, prompt: dict, params: SamplingParams | None = None,
                          request_id: str | None = None) -> RequestStream:
        """Send one request to a replica; return once its first output (or its error) is back, so that
        a refused prompt becomes an HTTP error before any response starts."""
        request_id = request_id or uuid.uuid4().hex
        with self._door.lock:
            self._door.admit("the server is shutting down")
        stream = RequestStream(request_id, asyncio.get_running_loop())
        req = ReplicaRequest(request_id, list(prompt["prompt_token_ids"]), prompt.get("prompt"),
                             params or SamplingParams())
        task = asyncio.create_task(self._pump(req, stream))
        self._pumps[id(stream)] = task
        task.add_done_callback(lambda _: self._release(stream))
        await stream.wait()
        if stream.error is not None and not stream.has_output:
            self.close(stream)
            raise stream.error
        return stream

    async def _pump(self, req: ReplicaRequest, stream: RequestStream) -> None:
        """Replica outputs into the stream; on a replica's death, the request again, once, elsewhere."""
        sent = 0  # tokens the consumer has seen (of the furthest sample)
        for attempt in range(2):
            gen = self._handle.generate.remote(req)
            try:
                async for out in gen:
                    n = max((len(c.token_ids) for c in out.outputs), default=0)
                    if n <= sent and not out.finished and attempt:
                        continue  # the retry regenerating what was already delivered
                    sent = max(sent, n)
                    stream.put(out)
                return
            except asyncio.CancelledError:
                gen.cancel()  # the replica's generator is closed: its engine aborts the request
                raise
            except Exception as e:  # noqa: BLE001 - handed to the consumer, or retried
                if _is_replica_death(e) and attempt == 0 and self._door.open:
                    self.num_failovers += 1
                    log.warning("request %s: its replica died (%s); retrying on another", req.request_id,
                                type(e).__name__)
                    continue
                stream.put(_cause(e) if not _is_replica_death(e) else
                           EngineShutdownError(f"the replica serving request {req.request_id} died, twice"))
                return

    def _release(self, stream: RequestStream) -> None:
        self._pumps.pop(id(stream), None)
        self._door.release(stream)

    def close(self, stream: RequestStream) -> None:
        """Done with a stream: abort it on its replica if unfinished."""
        task = self._pumps.get(id(stream))
        if task is not None and not task.done():
            task.cancel()
        else:
            self._release(stream)

    # ------------------------------------------------------------------ shutdown
    def shutdown(self, timeout: float | None = 30.0, wait: bool = True) -> None:
        """Stop taking requests and cancel those in flight; with ``wait``, delete the Serve app (its
        replicas end) and leave Ray (a Ray instance this process started ends with it)."""
        self._door.close()
        for task in list(self._pumps.values()):
            task.get_loop().call_soon_threadsafe(task.cancel)
        if not wait or self._stop.is_set():
            return
        self._stop.set()
        try:
            serve.delete(APP_NAME)
            if self._own_ray:
                serve.shutdown()
            ray.kill(self._board)
        finally:
            ray.shutdown()
