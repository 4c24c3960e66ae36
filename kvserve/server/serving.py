"""OpenAI requests -> engine requests -> OpenAI responses, for /v1/completions and /v1/chat/completions.

One HTTP request becomes one engine request per prompt (a completions ``prompt`` may be a list), each
with the request's ``n``. Choice ``i`` of prompt ``p`` is choice ``p * n + i`` in the response.

Streaming sends each choice's new text as it comes. The engine's texts only grow: it holds back an
incomplete UTF-8 character and what a stop string may still cut (``kvserve.prompts.stable_text``, the
same hold-back ``LLM`` and the CLI see), so a delta is simply the text past what was sent.
Prompts and chat messages become token ids through ``kvserve.prompts`` too, as offline.
"""
from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvserve.engine.async_llm import AsyncLLM, EngineShutdownError, QueueFullError, RequestStream
from kvserve.prompts import as_prompt_list, encode_chat, normalize_prompt, truncate_room
from kvserve.request import CompletionOutput, RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.server.metrics import Metrics, RequestTimer
from kvserve.server.protocol import (
    AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatLogprobs, ChatLogprobToken, ChatStreamChoice, CompletionChoice, CompletionLogprobs, CompletionRequest,
    CompletionResponse, DeltaMessage, ErrorInfo, ErrorResponse, PromptTokensDetails, SamplingFields, TopLogprob,
    Usage,
)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 2048  # chat: the rest of the context, but no more than this
GREEDY_EPS = 1e-5  # temperatures below this are greedy (as vLLM): 1/T would overflow the logits
# The sampler turns top_p < ~1e-38 (0 in fp32) and repetition_penalty < ~1e-37 (logits / p = inf) into
# NaN probabilities, which fail the whole engine step. These clamps keep the meaning (only the top
# token survives / the penalty is overwhelming) with finite numbers.
MIN_TOP_P = 1e-6
PENALTY_RANGE = (1e-6, 1e6)


class JSONResp(JSONResponse):
    """JSON that survives any str a client sent: lone surrogates (valid in JSON, not in UTF-8) are escaped."""

    def render(self, content) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class APIError(Exception):
    """An error with its HTTP status, in OpenAI's shape."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()

    def response(self) -> JSONResponse:
        return JSONResp(self.body(), status_code=self.status)


def engine_error(e: Exception) -> APIError:
    """Map what AsyncLLM.add_request raises to an HTTP error."""
    if isinstance(e, QueueFullError):
        return APIError(503, str(e), code="queue_full")
    if isinstance(e, EngineShutdownError):
        return APIError(503, str(e), code="shutting_down")
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    return APIError(500, f"{type(e).__name__}: {e}")


def _finite(x: float) -> float:
    return max(float(x), -9999.0)  # -inf is not JSON


@dataclass
class _Prompt:
    text: str | None
    ids: list[int]


@dataclass
class _ChoiceState:
    """What was sent of one choice so far (streaming)."""

    text_len: int = 0
    tokens: int = 0
    finished: bool = False


@dataclass
class _Job:
    """One HTTP request in flight: its engine streams and what it needs to build responses."""

    id: str
    prompts: list[_Prompt]
    params: list[SamplingParams]
    streams: list[RequestStream] = field(default_factory=list)
    timers: list[RequestTimer] = field(default_factory=list)


class OpenAIServing:
    def __init__(self, llm: AsyncLLM, served_model_name: str, metrics: Metrics,
                 max_default_tokens: int = DEFAULT_CHAT_MAX_TOKENS):
        self.llm = llm
        self.model_name = served_model_name
        self.metrics = metrics
        self.max_default_tokens = max_default_tokens
        self.tokenizer = llm.tokenizer
        self._token_str: dict[int, str] = {}

    # ------------------------------------------------------------------ checks and conversions
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def _check_common(self, req: SamplingFields) -> None:
        self.check_model(req.model)
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")

    def _max_tokens(self, requested: int | None, prompt_len: int, default: int, overflow: str = "error") -> int:
        limit = self.llm.max_model_len
        if overflow == "shift":  # generation continues past the context
            return requested or default
        if overflow == "truncate":  # the engine keeps the prompt's last tokens (LLMEngine.check_prompt)
            prompt_len = min(prompt_len, limit - truncate_room(requested, limit))
        if prompt_len >= limit:
            return requested or 1  # the engine refuses the prompt, in vLLM's words
        room = limit - prompt_len
        if requested is None:
            return min(room, default)
        if requested > room:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the messages, {requested} in the completion). "
                "Please reduce the length of the messages or completion.",
                param="max_tokens")
        return requested

    def _params(self, req: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
        temperature = 1.0 if req.temperature is None else req.temperature
        if temperature < GREEDY_EPS:
            temperature = 0.0
        try:
            return SamplingParams(
                n=req.n, temperature=temperature,
                top_p=1.0 if req.top_p is None else max(req.top_p, MIN_TOP_P),
                top_k=-1 if req.top_k is None else req.top_k,
                min_p=0.0 if req.min_p is None else req.min_p,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=1.0 if req.repetition_penalty is None
                else min(max(req.repetition_penalty, PENALTY_RANGE[0]), PENALTY_RANGE[1]),
                seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens,
                stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
                logprobs=logprobs, skip_special_tokens=req.skip_special_tokens,
                context_overflow=req.context_overflow, kv_compression=req.kv_compression,
            )
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None

    def _completion_prompts(self, req: CompletionRequest) -> list[_Prompt]:
        items = as_prompt_list(req.prompt)
        if not items:
            raise APIError(400, "prompt must not be empty", param="prompt")
        try:
            return [_Prompt(*normalize_prompt(x, self.tokenizer)) for x in items]
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None

    def _chat_prompt(self, req: ChatCompletionRequest) -> _Prompt:
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.type != "text" or part.text is None:
                        raise APIError(400, f"messages[{i}]: only text content parts are supported, got "
                                            f"{part.type!r}", param="messages")
                    texts.append(part.text)
                content = "\n".join(texts)
            msg = {"role": m.role, "content": content or ""}
            if m.name is not None:
                msg["name"] = m.name
            messages.append(msg)
        try:
            return _Prompt(*encode_chat(self.tokenizer, messages, req.add_generation_prompt))
        except ValueError as e:  # the template refused the conversation, or its text cannot be tokenized
            raise APIError(400, str(e), param="messages") from None

    def _token(self, tid: int) -> str:
        s = self._token_str.get(tid)
        if s is None:
            s = self._token_str[tid] = self.tokenizer.decode([tid])
        return s

    # ------------------------------------------------------------------ admission
    async def _start(self, job: _Job) -> None:
        """Add every prompt's request to the engine; on any error undo the ones added and raise APIError."""
        try:
            for i, (prompt, params) in enumerate(zip(job.prompts, job.params)):
                rid = job.id if len(job.prompts) == 1 else f"{job.id}-{i}"
                job.timers.append(self.metrics.tracker())
                job.streams.append(await self.llm.add_request(
                    {"prompt": prompt.text, "prompt_token_ids": prompt.ids}, params, rid))
        except BaseException as e:
            self._close(job)
            if isinstance(e, Exception):
                raise engine_error(e) from None
            raise

    def _close(self, job: _Job) -> None:
        for s in job.streams:
            self.llm.close(s)  # aborts the unfinished ones

    async def _outputs(self, job: _Job) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) from all the job's streams as they come."""
        try:
            if len(job.streams) == 1:
                s = job.streams[0]
                while not s.finished:
                    out = await s.get()
                    job.timers[0].on_output(out)
                    yield 0, out
                return
            q: asyncio.Queue = asyncio.Queue()

            async def pump(i: int, s: RequestStream) -> None:
                try:
                    while not s.finished:
                        out = await s.get()
                        job.timers[i].on_output(out)
                        q.put_nowait((i, out))
                except Exception as e:  # noqa: BLE001
                    q.put_nowait((i, e))

            tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(job.streams)]
            try:
                remaining = len(tasks)
                while remaining:
                    i, item = await q.get()
                    if isinstance(item, Exception):
                        raise item
                    if item.finished:
                        remaining -= 1
                    yield i, item
            finally:
                for t in tasks:
                    t.cancel()
        finally:
            self._close(job)

    async def _final_outputs(self, job: _Job, raw: Request) -> list[RequestOutput] | None:
        """Run the job to the end; None if the client hung up first (then every request is aborted)."""
        finals: dict[int, RequestOutput] = {}

        async def collect() -> None:
            async for i, out in self._outputs(job):
                if out.finished:
                    finals[i] = out

        task = asyncio.create_task(collect())
        gone = asyncio.create_task(_wait_disconnect(raw))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                self._close(job)
                return None
        try:
            task.result()
        except Exception as e:  # noqa: BLE001 - a failed engine step, or shutdown
            raise engine_error(e) from e
        return [finals[i] for i in range(len(job.streams))]

    # ------------------------------------------------------------------ /v1/completions
    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        self._check_common(req)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is only supported equal to n", param="best_of")
        # echo + logprobs: the prompt's own token logprobs too (what evaluation harnesses ask for)
        score_prompt = req.echo and req.logprobs is not None
        if score_prompt and req.stream:
            raise APIError(400, "echo with logprobs is supported without stream only", param="echo")
        prompts = self._completion_prompts(req)
        params = [self._params(req, self._max_tokens(req.max_tokens, len(p.ids), DEFAULT_COMPLETION_MAX_TOKENS,
                                                     req.context_overflow),
                               req.logprobs) for p in prompts]
        if score_prompt:
            for sp in params:
                sp.prompt_logprobs = req.logprobs
        job = _Job(f"cmpl-{uuid.uuid4().hex}", prompts, params)
        await self._start(job)
        if req.stream:
            return SSEResponse(self._stream_completion(req, job))
        finals = await self._final_outputs(job, raw)
        if finals is None:
            return Response(status_code=499)
        choices = []
        for p, out in zip(prompts, finals):
            prefix = self._echo(p) if req.echo else ""
            for c in out.outputs:
                lp = None
                if req.logprobs is not None:
                    lp = self._completion_logprobs(c, 0, len(c.token_ids), len(prefix))
                    if score_prompt:
                        lp = self._prompt_logprobs(out, lp)
                choices.append(CompletionChoice(index=len(choices), text=prefix + c.text, logprobs=lp,
                                                finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        resp = CompletionResponse(id=job.id, model=self.model_name, choices=choices, usage=_usage(finals))
        return JSONResp(resp.model_dump())

    def _echo(self, p: _Prompt) -> str:
        return p.text if p.text is not None else self.tokenizer.decode(p.ids)

    def _prompt_logprobs(self, out: RequestOutput, then: CompletionLogprobs) -> CompletionLogprobs:
        """The prompt tokens' logprobs (None for the first, which nothing predicts), then ``then``'s."""
        lp, offset = CompletionLogprobs(), 0
        for tid, d in zip(out.prompt_token_ids, out.prompt_logprobs or []):
            tok = self._token(tid)
            lp.tokens.append(tok)
            lp.token_logprobs.append(None if d is None else _finite(d.get(tid, -9999.0)))
            lp.top_logprobs.append(None if d is None else {self._token(k): _finite(v) for k, v in d.items()})
            lp.text_offset.append(offset)
            offset += len(tok)
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(lp, name).extend(getattr(then, name))
        return lp

    def _completion_logprobs(self, c: CompletionOutput, start: int, end: int, offset: int) -> CompletionLogprobs:
        lp = CompletionLogprobs()
        for tid, d in zip(c.token_ids[start:end], (c.logprobs or [])[start:end]):
            tok = self._token(tid)
            lp.tokens.append(tok)
            lp.token_logprobs.append(_finite(d.get(tid, -9999.0)))
            lp.top_logprobs.append({self._token(k): _finite(v) for k, v in d.items()})
            lp.text_offset.append(offset)
            offset += len(tok)
        return lp

    async def _stream_completion(self, req: CompletionRequest, job: _Job) -> AsyncIterator[str]:
        n = req.n
        states = [_ChoiceState() for _ in range(n * len(job.prompts))]
        finals: dict[int, RequestOutput] = {}
        try:
            if req.echo:
                chunk = CompletionResponse(id=job.id, model=self.model_name, choices=[
                    CompletionChoice(index=p * n + i, text=self._echo(pr))
                    for p, pr in enumerate(job.prompts) for i in range(n)])
                yield _sse(chunk)
            async for p, out in self._outputs(job):
                if out.finished:
                    finals[p] = out
                choices = []
                for c in out.outputs:
                    st = states[p * n + c.index]
                    delta = _delta(c, st)
                    if delta is None:
                        continue
                    lp = None
                    if req.logprobs is not None:
                        lp = self._completion_logprobs(c, st.tokens, len(c.token_ids), st.text_len - len(delta))
                    st.tokens = len(c.token_ids)
                    choices.append(CompletionChoice(index=p * n + c.index, text=delta, logprobs=lp,
                                                    finish_reason=c.finish_reason, stop_reason=c.stop_reason))
                if choices:
                    yield _sse(CompletionResponse(id=job.id, model=self.model_name, choices=choices))
            if req.stream_options and req.stream_options.include_usage:
                yield _sse(CompletionResponse(id=job.id, model=self.model_name, choices=[],
                                              usage=_usage([finals[i] for i in sorted(finals)])))
        except Exception as e:  # noqa: BLE001 - the status line is gone: report in the stream
            yield _sse_error(e)
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ /v1/chat/completions
    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        self._check_common(req)
        if req.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        prompt = self._chat_prompt(req)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self._max_tokens(requested, len(prompt.ids), self.max_default_tokens, req.context_overflow)
        params = self._params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        job = _Job(f"chatcmpl-{uuid.uuid4().hex}", [prompt], [params])
        await self._start(job)
        if req.stream:
            return SSEResponse(self._stream_chat(req, job))
        finals = await self._final_outputs(job, raw)
        if finals is None:
            return Response(status_code=499)
        out = finals[0]
        choices = [ChatChoice(index=c.index, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                              stop_reason=c.stop_reason,
                              logprobs=self._chat_logprobs(c, 0, len(c.token_ids), req.top_logprobs or 0)
                              if req.logprobs else None)
                   for c in out.outputs]
        resp = ChatCompletionResponse(id=job.id, model=self.model_name, choices=choices, usage=_usage(finals))
        return JSONResp(resp.model_dump())

    def _chat_logprobs(self, c: CompletionOutput, start: int, end: int, k: int) -> ChatLogprobs:
        content = []
        for tid, d in zip(c.token_ids[start:end], (c.logprobs or [])[start:end]):
            top = sorted(d.items(), key=lambda kv: -kv[1])[:k]
            content.append(ChatLogprobToken(
                token=self._token(tid), logprob=_finite(d.get(tid, -9999.0)),
                bytes=list(self._token(tid).encode()),
                top_logprobs=[TopLogprob(token=self._token(t), logprob=_finite(v), bytes=list(self._token(t).encode()))
                              for t, v in top]))
        return ChatLogprobs(content=content)

    async def _stream_chat(self, req: ChatCompletionRequest, job: _Job) -> AsyncIterator[str]:
        states = [_ChoiceState() for _ in range(req.n)]
        final = None
        try:
            # the role comes first, on its own, as OpenAI sends it
            yield _sse(ChatCompletionChunk(id=job.id, model=self.model_name, choices=[
                ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(req.n)]))
            async for _, out in self._outputs(job):
                if out.finished:
                    final = out
                choices = []
                for c in out.outputs:
                    st = states[c.index]
                    delta = _delta(c, st)
                    if delta is None:
                        continue
                    lp = None
                    if req.logprobs:
                        lp = self._chat_logprobs(c, st.tokens, len(c.token_ids), req.top_logprobs or 0)
                    st.tokens = len(c.token_ids)
                    choices.append(ChatStreamChoice(index=c.index, delta=DeltaMessage(content=delta), logprobs=lp,
                                                    finish_reason=c.finish_reason, stop_reason=c.stop_reason))
                if choices:
                    yield _sse(ChatCompletionChunk(id=job.id, model=self.model_name, choices=choices))
            if req.stream_options and req.stream_options.include_usage and final is not None:
                yield _sse(ChatCompletionChunk(id=job.id, model=self.model_name, choices=[], usage=_usage([final])))
        except Exception as e:  # noqa: BLE001
            yield _sse_error(e)
        yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------- helpers
class SSEResponse(StreamingResponse):
    """Server-sent events whose generator is always closed when the response ends, however it ends.

    Starlette cancels the sending task when the client disconnects; if that happens while our
    generator is suspended at a ``yield`` (waiting for the send), nothing would close it until the
    garbage collector does. Closing it here aborts the engine request at once.
    """

    def __init__(self, content):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _wait_disconnect(raw: Request) -> None:
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


def _delta(c: CompletionOutput, st: _ChoiceState) -> str | None:
    """The text of choice ``c`` past what was sent; None: nothing to send. (The engine's text is already
    settled: see the module docstring.) A finished choice sends once more, with its finish_reason."""
    if st.finished:
        return None
    st.finished = c.finish_reason is not None
    delta = c.text[st.text_len:]
    if not delta and not st.finished:
        return None
    st.text_len = max(st.text_len, len(c.text))
    return delta


def _usage(finals: list[RequestOutput]) -> Usage:
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in finals)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def _sse(model) -> str:
    return f"data: {model.model_dump_json()}\n\n"


def _sse_error(e: Exception) -> str:
    err = e if isinstance(e, APIError) else engine_error(e)
    return f"data: {json.dumps(err.body())}\n\n"
