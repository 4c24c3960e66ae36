"""The FastAPI app: OpenAI routes, auth, errors in OpenAI's JSON shape, health and Prometheus metrics.

=====================  ======  =====================================================
route                  auth    what
=====================  ======  =====================================================
POST /v1/completions   key     text completion, ``stream`` as server-sent events
POST /v1/chat/...      key     chat completion through the model's chat template
GET  /v1/models        key     the served model
GET  /health           open    200 while the engine thread is alive, else 503
GET  /metrics          open    Prometheus text
GET  /replicas         open    with ``--replicas``: each replica's id, pid, node and load
GET  /dashboard        key     the cache, live (one in-process engine; not with replicas)
=====================  ======  =====================================================

Every error is ``{"error": {"message", "type", "param", "code"}}``: 400 for bad bodies and parameters
(never FastAPI's bare 422), 401 for a missing or wrong Bearer key, 404 for an unknown model or route,
503 when the queue is full or the engine is shutting down.
"""
from __future__ import annotations

import logging
import secrets
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import kvserve
from kvserve.engine.async_llm import AsyncLLM
from kvserve.server.dashboard import dashboard_router
from kvserve.server.metrics import Metrics
from kvserve.server.protocol import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse, ErrorResponse, ModelCard,
    ModelList,
)
from kvserve.server.serving import APIError, JSONResp, OpenAIServing

if TYPE_CHECKING:
    from kvserve.server.replicas import ReplicaSet

log = logging.getLogger("kvserve.server")

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 503)}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors()[:5]:
        loc = [x for x in err.get("loc", ()) if x != "body"]
        where = ".".join(map(str, loc)) or "body"
        if param is None and loc and isinstance(loc[0], str):
            param = loc[0]
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", param


def build_app(async_llm: AsyncLLM | ReplicaSet, served_model_name: str, api_key: str | None = None,
              shutdown_engine: bool = True) -> FastAPI:
    """The app serving ``async_llm`` (one engine, or a ``ReplicaSet``) as model ``served_model_name``.
    With ``api_key``, /v1/* needs ``Authorization: Bearer <api_key>``. ``shutdown_engine``: shut the
    engine down when the app stops."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if shutdown_engine:
            # stop accepting, abort what is in flight, join the engine thread (off the loop: it blocks)
            await run_in_threadpool(async_llm.shutdown)

    app = FastAPI(title="kvserve", version=kvserve.__version__, lifespan=lifespan, default_response_class=JSONResp,
                  description="OpenAI-compatible completions and chat completions on kvserve.")
    replica_stats = getattr(async_llm, "replica_stats", None)  # a ReplicaSet: one series per replica
    metrics = Metrics(async_llm.stats, served_model_name, replica_stats)
    serving = OpenAIServing(async_llm, served_model_name, metrics)
    app.state.async_llm, app.state.serving, app.state.metrics = async_llm, serving, metrics

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()

    # ------------------------------------------------------------------ open routes
    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> Response:
        if not async_llm.is_alive():
            return APIError(503, "the engine is not running").response()
        return Response(status_code=200)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if replica_stats is None:
        app.include_router(dashboard_router(async_llm, api_key))  # /dashboard: the cache, live
    else:
        @app.get("/replicas")
        async def replicas() -> JSONResponse:
            keys = ("pid", "node", "threads", "requests_running", "requests_waiting", "usage", "prefix_cache_hits",
                    "prefix_cache_queries", "generation_tokens")
            return JSONResp({"router": async_llm.router, "configured": async_llm.num_replicas,
                             "failovers": async_llm.num_failovers,
                             "data": [{"id": rid} | {k: s.get(k) for k in keys}
                                      for rid, s in replica_stats().items()]})

    # ------------------------------------------------------------------ /v1
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)], responses=_ERRORS)

    @v1.get("/models", response_model=ModelList)
    async def models() -> ModelList:
        root = getattr(getattr(async_llm.engine, "config", None), "model", None)
        return ModelList(data=[ModelCard(id=served_model_name, root=str(root) if root else None,
                                         max_model_len=async_llm.max_model_len)])

    @v1.post("/completions", responses={200: {
        "model": CompletionResponse,
        "description": "the completion; with stream=true, text/event-stream of CompletionResponse chunks "
                       "ending with `data: [DONE]`"}})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completions(body, request)

    @v1.post("/chat/completions", responses={200: {
        "model": ChatCompletionResponse,
        "description": "the chat completion; with stream=true, text/event-stream of ChatCompletionChunk "
                       "chunks ending with `data: [DONE]`"}})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

    app.include_router(v1)
    _document_400_not_422(app)
    return app


def _document_400_not_422(app: FastAPI) -> None:
    """FastAPI documents a 422 on every route with a body; ours answers invalid bodies with 400."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = original()
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi
