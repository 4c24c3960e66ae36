"""AsyncLLM: the asyncio front of LLMEngine.

The engine is not thread-safe, so one thread owns it. Everything else talks to that thread through
a command queue and gets results back on its own event loop::

      event loop(s)                         engine thread (owns LLMEngine)
      -------------                         ------------------------------
      generate() --("add", ack future)-->   | drain commands: add / abort / shutdown
      aclose()   --("abort", id)------->    | step()              (only while there is work)
                                            | deliver outputs --> loop.call_soon_threadsafe
                                            |   (1-2 outputs: wait, <= 1 ms, until the loop wrote them)
      stats()    <-- snapshot dict -------  | snapshot cache_stats + stats after each step
      inspect(fn) --("call", fn, future)-> | fn(engine) between two steps (the dashboard's view)
                                            | idle: touch the KV pool, a slice at a time, until
                                            |   all of it is; then sleep on a threading.Event

Outputs are cumulative (each RequestOutput holds all the text so far), so a consumer that falls
behind is handed only the newest one: nothing is lost, and no queue grows without bound.
A consumer that stops early (``aclose``, a cancelled task, a client that hung up) aborts its request;
the abort runs before the next engine step, so the request's KV blocks are free one step later.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import replace
from typing import Any, AsyncIterator

from kvserve.engine.llm_engine import LLMEngine
from kvserve.models.loader import DEFAULT_MODEL
from kvserve.request import CompletionOutput, RequestOutput
from kvserve.sampling_params import SamplingParams

log = logging.getLogger("kvserve")

PromptInput = str | list[int] | dict


# The hand-off at small batches. The engine's OpenMP threads are on both cores for the whole step, so
# the event loop's ~0.2-0.3 ms of work per streamed output (its GIL included) otherwise preempts one of
# them mid-step, and a parallel region waits for its preempted thread. At one or two outputs the engine
# thread instead waits, its GIL released and its core free, until the loop has written them (at most
# HANDOFF_WAIT_S). Session 16, 2 cores, one stream: ~8.0 against ~8.5 ms per token over 9 + 9 fresh
# servers; at 4 and 16 streams it made no difference or cost a little, as the loop's longer work then
# overlaps the step's GIL-free kernels, so it stops at 2 (docs/benchmarks.md, "The server's decode step").
HANDOFF_MAX_OUTPUTS = 2
HANDOFF_WAIT_S = 0.001

# Idle time prefaults the KV pool (``KVCache.prefault``), so that a fresh server's first requests do not pay
# the first touch of the pool's pages: on the VMs we measure on a fresh 2 MiB page costs ~13 ms, ~0.8 s for
# the 60 pages (30 layers, K and V) under the next 341 blocks of a bf16 SmolLM2 pool, and bursts of 16
# prompts of ~460 tokens ran 1.5x slower until every page had been touched once (bench_cold_start.py).
# vLLM and llama.cpp touch their whole pool before serving; here it costs no startup time. A slice of
# 8 MiB, after which the thread looks for commands again, keeps a request that arrives meanwhile waiting
# ~1 ms (~50 ms on those VMs). Under tensor parallelism this is rank 0's pool; the workers touch theirs
# as blocks are first used.
PREFAULT_SLICE_BYTES = 8 << 20


class QueueFullError(RuntimeError):
    """The number of unfinished requests is at ``max_queue``: try again later (HTTP 503)."""


class EngineShutdownError(RuntimeError):
    """The engine was shut down (or its thread died): it takes no more requests."""


class RequestStream:
    """The consumer side of one request: the newest output, or an error, handed over from the engine thread.

    Lives on the event loop that created it; the engine thread only reaches it through
    ``loop.call_soon_threadsafe``.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.loop = loop
        self.finished = False
        self.counted = True  # still counts against max_queue
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:  # on the loop, via call_soon_threadsafe
        if isinstance(item, BaseException):
            self._error = item
        else:
            self._latest = item  # cumulative: the newest output replaces one not yet read
        self._ready.set()

    async def get(self) -> RequestOutput:
        await self.wait()
        if self._latest is not None:  # an output that arrived before an error is still delivered
            out, self._latest = self._latest, None
            self.finished = out.finished
            return out
        self.finished = True
        raise self._error

    async def wait(self) -> None:
        """Until an output or an error is ready (without taking it)."""
        while self._latest is None and self._error is None:
            self._ready.clear()
            await self._ready.wait()

    @property
    def has_output(self) -> bool:
        return self._latest is not None

    @property
    def error(self) -> BaseException | None:
        return self._error


class Admission:
    """The front door that AsyncLLM and the Ray front end (``server.replicas.ReplicaSet``) share: whether
    requests are taken, and how many are unfinished, against ``max_queue``. ``lock`` is reentrant:
    shutdown(wait=False) runs in a signal handler, which may interrupt this same thread inside ``admit``."""

    def __init__(self, max_queue: int | None):
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 or None, got {max_queue}")
        self.max_queue = max_queue
        self.lock = threading.RLock()
        self.open = True
        self.unfinished = 0

    def admit(self, closed: str) -> None:
        """Count one more request, or raise: EngineShutdownError(closed) once closed, QueueFullError at
        max_queue. Called with ``lock`` held, so that what goes with the admission happens under it too."""
        if not self.open:
            raise EngineShutdownError(closed)
        if self.max_queue is not None and self.unfinished >= self.max_queue:
            raise QueueFullError(f"the server is at its limit of {self.max_queue} unfinished requests; retry later")
        self.unfinished += 1

    def release(self, stream: RequestStream) -> None:
        """Take the stream's request off the count (once)."""
        if stream.counted:
            stream.counted = False
            with self.lock:
                self.unfinished -= 1

    def close(self) -> bool:
        """Take no more requests; True the first time."""
        with self.lock:
            was, self.open = self.open, False
            return was

    def stats(self) -> dict:
        return {"num_unfinished": self.unfinished, "max_queue": self.max_queue}


def release_openmp_threads() -> None:
    """Give back the OpenMP worker threads of the calling thread (OpenMP 5's ``omp_pause_resource_all``).

    Each thread that runs a parallel torch op gets its own OpenMP team. The model was loaded on this
    thread, so its team exists; once the engine thread has a team too, libgomp manages more threads
    than there are cores and stops spinning between parallel regions (its "throttled" wait). Every
    small matmul of a decode step then waits for a worker to wake up: a batch-1 step took 34 ms on the
    engine thread against 21 ms on the loading thread (2 cores, Sapphire Rapids), and each [1, 576] x
    [576, 3072] matmul 190 us against 120. Released, the engine thread's team is the only one. A later
    parallel op on this thread makes a new team: harmless, only slower while both exist."""
    import ctypes

    try:
        ctypes.CDLL(None).omp_pause_resource_all(1)  # omp_pause_soft; the symbol of the runtime torch loaded
    except (AttributeError, OSError):  # no OpenMP runtime in this process, or one without it
        pass


class AsyncLLM:
    """Serve many concurrent asyncio consumers from one engine.

    >>> llm = AsyncLLM("smollm2-135m", max_model_len=512)
    >>> async for out in llm.generate("The capital of France is", SamplingParams(max_tokens=8)):
    ...     print(out.outputs[0].text)
    >>> llm.shutdown()

    Takes the same keyword arguments as ``LLM(...)``, or a ready ``engine=``. ``max_queue`` bounds the
    unfinished requests (running + waiting); one more raises QueueFullError. ``prefault``: touch the whole
    KV pool in idle time (PREFAULT_SLICE_BYTES), committing its memory, as vLLM and llama.cpp do at startup.
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, engine: LLMEngine | None = None,
                 max_queue: int | None = None, prefault: bool = True, **llm_kwargs: Any):
        if engine is None:
            from kvserve.llm import LLM

            engine = LLM(model, **llm_kwargs).engine
        elif llm_kwargs:
            raise ValueError(f"pass either engine= or LLM keyword arguments, not both (got {sorted(llm_kwargs)})")
        self.engine = engine
        self._door = Admission(max_queue)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._dead: BaseException | None = None
        # engine-thread state: never touched from an event loop
        self._streams: dict[str, RequestStream] = {}
        self._last_output: dict[str, RequestOutput] = {}
        self._num_aborted = 0
        self._num_errors = 0
        self._prefault = prefault  # until the pool is all touched
        self._stats: dict = {}
        self._publish_stats()
        release_openmp_threads()  # the engine thread's matmuls get the cores (see there)
        self._thread = threading.Thread(target=self._run, name="kvserve-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ what the engine holds
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Jinja only: reads the tokenizer's template, never the engine's state, so safe off its thread."""
        return self.engine.apply_chat_template(messages, add_generation_prompt)

    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    @property
    def accepting(self) -> bool:
        return self._door.open and self._dead is None

    async def inspect(self, fn):
        """``fn(engine)`` run on the engine thread between two steps, so it sees a consistent state
        (the dashboard's snapshot of blocks, tree and requests); its result, awaited on this loop."""
        fut = asyncio.get_running_loop().create_future()
        with self._door.lock:
            if not self.accepting:
                raise EngineShutdownError("the engine is shut down")
            self._commands.put(("call", fn, fut))
        self._wake.set()
        return await fut

    # ------------------------------------------------------------------ requests
    async def add_request(self, prompt: PromptInput, params: SamplingParams | None = None,
                          request_id: str | None = None) -> RequestStream:
        """Hand a request to the engine; return once it is queued (errors from the engine's
        ``add_request``, such as a prompt over the context length, are raised here)."""
        loop = asyncio.get_running_loop()
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        stream = RequestStream(request_id, loop)
        ack: asyncio.Future = loop.create_future()
        with self._door.lock:
            if self._dead is not None:
                raise EngineShutdownError(f"the engine thread died: {self._dead!r}")
            self._door.admit("the engine is shut down")
            # put under the lock: shutdown() closes the door under it too, so no add lands after its command
            self._commands.put(("add", stream, prompt, params or SamplingParams(), ack))
        self._wake.set()
        try:
            await ack
        except asyncio.CancelledError:
            self._door.release(stream)
            self.abort(request_id)  # runs after the add in the FIFO, whether or not that succeeded
            raise
        except BaseException:
            self._door.release(stream)
            raise
        return stream

    async def generate(self, prompt: PromptInput, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative RequestOutput after each step that changed it, ending with
        the finished one. Closing or cancelling the iterator early aborts the request."""
        stream = await self.add_request(prompt, params, request_id)
        # The loop is written out, not delegated to iterate(): an inner async generator is not closed
        # when the outer one is, and the abort must not wait for the garbage collector.
        try:
            while not stream.finished:
                yield await stream.get()
        finally:
            self.close(stream)

    async def iterate(self, stream: RequestStream) -> AsyncIterator[RequestOutput]:
        """The outputs of a stream from ``add_request``; aborts the request if left before the end."""
        try:
            while not stream.finished:
                yield await stream.get()
        finally:
            self.close(stream)

    def close(self, stream: RequestStream) -> None:
        """Done with a stream from add_request: take it off the max_queue count, abort it if unfinished."""
        self._door.release(stream)
        if not stream.finished:
            self.abort(stream.request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, returns at once). Its consumer, if any, gets a final output
        with finish_reason "abort"; its KV blocks are freed before the next engine step."""
        self._commands.put(("abort", request_id))
        self._wake.set()

    def shutdown(self, timeout: float | None = 30.0, wait: bool = True) -> None:
        """Stop accepting requests, abort those in flight (their consumers get "abort" outputs) and
        join the engine thread. Idempotent; ``wait=False`` only starts it (safe in a signal handler)."""
        if self._door.close():  # after every admitted add in the FIFO (see add_request)
            self._commands.put(("shutdown",))
        self._wake.set()
        if wait and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        if wait:
            self.engine.flush_kv_tiers()  # blocks queued for the disk tier: on disk before we exit
            if not self._thread.is_alive():
                self.engine.shutdown()  # tensor-parallel workers

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict:
        """A snapshot safe to read from any thread: the engine's cache_stats() and stats, gathered by
        the engine thread after each step, plus the front's queue counts."""
        snap = dict(self._stats)
        snap.update(**self._door.stats(), accepting=self.accepting, pending_commands=self._commands.qsize())
        return snap

    def _publish_stats(self) -> None:  # engine thread (and once from __init__, before it starts)
        eng = self.engine
        snap = {**eng.stats, **eng.cache_stats()}
        snap.update(num_streams=len(self._streams), num_aborted=self._num_aborted, num_errors=self._num_errors,
                    time=time.time())
        self._stats = snap  # one reference assignment: readers see the old dict or the new one

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        eng = self.engine
        try:
            while True:
                self._wake.clear()  # before draining: a command put after this sets it again
                if not self._drain_commands():
                    break
                if not eng.has_unfinished_requests():
                    self._publish_stats()
                    if self._prefault:  # nothing to run: touch the next slice of the pool, then look again
                        self._prefault = eng.kv_cache.prefault(PREFAULT_SLICE_BYTES)
                        if not self._prefault:
                            log.info("the KV pool is touched, all %d MiB of it", eng.kv_cache.nbytes >> 20)
                    else:
                        self._wake.wait()
                    continue
                try:
                    outputs = eng.step()
                except Exception as e:  # noqa: BLE001 - the thread must outlive one bad step
                    log.exception("engine step failed")
                    self._fail_after_step_error(e)
                    outputs = []
                self._publish_stats()  # before delivering: a consumer that reads stats() sees this step
                self._deliver(outputs)
        except BaseException as e:  # noqa: BLE001
            log.exception("the engine thread died")
            self._dead = e
        finally:
            self._door.close()
            err = self._dead or EngineShutdownError("the engine is shut down")
            self._drain_commands(final_error=err)
            for rid in list(self._streams):
                self._abort_one(rid, error=err if self._dead else None)
            self._publish_stats()

    def _drain_commands(self, final_error: BaseException | None = None) -> bool:
        """Run every queued command; False once a shutdown was seen."""
        keep_going = True
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return keep_going
            kind = cmd[0]
            if kind == "add":
                _, stream, prompt, params, ack = cmd
                if final_error is not None:
                    _resolve(ack, final_error)
                    continue
                try:
                    self._add(stream, prompt, params)
                except Exception as e:  # noqa: BLE001 - the caller gets it, the thread goes on
                    _resolve(ack, e)
                else:
                    _resolve(ack, None)
            elif kind == "abort":
                self._abort_one(cmd[1])
            elif kind == "call":
                _, fn, fut = cmd
                try:
                    result, error = (None, final_error) if final_error is not None else (fn(self.engine), None)
                except Exception as e:  # noqa: BLE001 - the caller gets it, the thread goes on
                    result, error = None, e
                _resolve(fut, error, result)
            elif kind == "shutdown":
                for rid in list(self._streams):
                    self._abort_one(rid)
                keep_going = False

    def _add(self, stream: RequestStream, prompt: PromptInput, params: SamplingParams) -> None:
        rid = stream.request_id
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already running")
        if isinstance(prompt, dict):
            text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
            if text is None and ids is None:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        elif isinstance(prompt, str):
            text, ids = prompt, None
        else:
            text, ids = None, list(prompt)
        self.engine.add_request(text, params, request_id=rid, prompt_token_ids=ids)
        self._streams[rid] = stream

    def _abort_one(self, rid: str, error: BaseException | None = None) -> None:
        stream = self._streams.pop(rid, None)
        last = self._last_output.pop(rid, None)
        children = self.engine.parents.get(rid)
        if stream is None and children is None:
            return  # finished or unknown
        self.engine.abort_request(rid)
        self._num_aborted += 1
        if stream is not None:
            _post(stream, error if error is not None else _aborted_output(rid, last, children))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
        for out in outputs:
            rid = out.request_id
            stream = self._streams.get(rid)
            if stream is None:
                continue
            if out.finished:
                del self._streams[rid]
                self._last_output.pop(rid, None)
            else:
                self._last_output[rid] = out
            by_loop.setdefault(stream.loop, []).append((stream, out))
        # One or two outputs: hand the CPU to the event loop until it has written them (see HANDOFF_*)
        handoff = None
        if len(by_loop) == 1 and sum(len(items) for items in by_loop.values()) <= HANDOFF_MAX_OUTPUTS:
            handoff = threading.Event()
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items, handoff)
            except RuntimeError:  # the consumer's loop is closed: nobody will read these
                handoff = None
                for stream, out in items:
                    if not out.finished:
                        self._abort_one(stream.request_id)
        if handoff is not None:
            handoff.wait(HANDOFF_WAIT_S)

    def _fail_after_step_error(self, error: Exception) -> None:
        """A step raised. Fail the requests the engine finished without an output (a request that can
        never fit the cache); if none, the failure is not one request's: fail them all."""
        self._num_errors += 1
        victims = [rid for rid in self._streams
                   if all(r.is_finished for r in self.engine.parents.get(rid, []))]
        for rid in victims or list(self._streams):
            self._abort_one(rid, error=error)


def _aborted_output(rid: str, last: RequestOutput | None, children) -> RequestOutput:
    """The final output of an aborted request: what it had so far, every unfinished sample marked "abort"."""
    if last is None:
        first = children[0] if children else None
        n = len(children) if children else 1
        last = RequestOutput(rid, first.prompt if first else None, list(first.prompt_token_ids) if first else [],
                             [CompletionOutput(i, "", []) for i in range(n)])
    outs = [o if o.finish_reason is not None else replace(o, finish_reason="abort") for o in last.outputs]
    return replace(last, outputs=outs, finished=True)


def _put_all(items: list[tuple[RequestStream, RequestOutput]], handoff: threading.Event | None = None) -> None:
    for stream, out in items:
        stream.put(out)
    if handoff is not None:
        # The consumers woken above run next, each until it waits for its next output (the chunk
        # written to its socket); one more hop of the loop for a consumer behind a queue; then set.
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, handoff.set)


def _post(stream: RequestStream, item) -> None:
    try:
        stream.loop.call_soon_threadsafe(stream.put, item)
    except RuntimeError:
        pass  # loop closed


def _resolve(fut: asyncio.Future, error: BaseException | None, result: Any = None) -> None:
    def set_it() -> None:
        if fut.done():  # the caller was cancelled while waiting
            return
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)

    try:
        fut.get_loop().call_soon_threadsafe(set_it)
    except RuntimeError:
        pass
