"""/dashboard: the block pool, the prefix tree and the requests, live in a browser.

    GET /dashboard          the page (HTML, JS and CSS ship in kvserve/server/static: no build, no CDN)
    GET /dashboard/state    one snapshot as JSON
    GET /dashboard/events   Server-Sent Events: a snapshot whenever the engine's state changed, at most
                            ``PUSH_HZ`` a second per open page (one connection, no polling)

A snapshot is taken on the engine thread between two steps (``AsyncLLM.inspect``), so the grid, the
tree and the requests describe the same moment. The page follows ``--api-key``: the state and the
events need the key (as ``Authorization: Bearer`` or ``?key=``, since EventSource cannot send
headers); the page itself holds no data and asks for the key.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from kvserve.kv.block_pool import NULL_BLOCK

PUSH_HZ = 4
MAX_TREE_NODES = 200  # a busy tree is cut (the page says so); the grid always shows every block
PREVIEW_TOKENS = 24
STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


def snapshot(engine) -> dict:
    """The engine's KV state as plain JSON: every block's owner, the requests, the tree, counters.

    A block's owner is the request that holds it ("shared" when several do: a prefix hit), else
    "cached" (the prefix tree alone: evictable), else "free". So the grid's counts are exactly
    ``cache_stats()``'s blocks used / cached / free."""
    m, s = engine.kv_manager, engine.scheduler
    pool = m.pool
    holders: list[list[str]] = [[] for _ in range(pool.num_blocks)]
    for rid, kv in m.requests.items():
        for table in kv.tables:
            for b in table:
                if b != NULL_BLOCK and rid not in holders[b]:
                    holders[b].append(rid)
    owners = []
    for b in range(1, pool.num_blocks):
        h = holders[b]
        owners.append("free" if pool.ref_cnt[b] == 0 else h[0] if len(h) == 1 else "shared" if h else "cached")
    requests = []
    for status, queue in (("running", s.running), ("waiting", s.waiting), ("swapped", s.swapped)):
        for r in queue:
            tables = m.block_tables(r.request_id)
            requests.append({
                "id": r.request_id, "status": status, "prompt_tokens": r.num_prompt_tokens,
                "output_tokens": len(r.output_token_ids), "computed_tokens": r.num_computed_tokens,
                "preemptions": r.num_preemptions, "block_tables": [list(t) for t in tables],
            })
    stats = engine.cache_stats()
    return {
        "time": time.time(), "step": engine.stats["steps"], "block_size": engine.kv_cache.block_size,
        "kv_cache_dtype": stats["kv_cache_dtype"], "block_bytes": engine.kv_spec.block_bytes(engine.kv_cache.block_size),
        "blocks": owners, "requests": requests,
        # preempted requests' blocks copied out to the CPU swap pool: (request id, blocks)
        "swapped": [[rid, n] for rid, n in m.swapped_blocks().items()], "tree": _tree(m.prefix_cache, engine.tokenizer.decode),
        "counters": {k: stats[k] for k in ("blocks_total", "blocks_used", "blocks_cached", "blocks_free",
                                           "prefix_cache_hit_rate", "prefix_cache_hits", "preemptions",
                                           "swapped_blocks", "requests_running", "requests_waiting",
                                           "requests_swapped", "prefix_cache_evicted_blocks",
                                           "kv_bytes_touched", "kv_bytes_allocated")}
                    | {"generation_tokens": engine.stats["generation_tokens"], "steps": engine.stats["steps"]},
    }


def _tree(pc, decode) -> dict | None:
    """The radix tree, most recently used children first, cut at MAX_TREE_NODES nodes."""
    if pc is None:
        return None
    budget = [MAX_TREE_NODES]

    def node(n) -> dict:
        toks = [t for b in n.blocks for t in b]
        out = {"tokens": len(toks), "blocks": n.num_blocks, "lock": n.lock_ref, "last_access": n.last_access,
               "preview": decode(toks[:PREVIEW_TOKENS]) if toks else "", "children": []}
        for child in sorted(n.children.values(), key=lambda c: -c.last_access):
            if budget[0] <= 0:
                out["truncated"] = True
                break
            budget[0] -= 1
            out["children"].append(node(child))
        return out

    root = node(pc.root)
    root["cached_blocks"], root["evictable_blocks"] = pc.num_blocks, pc.evictable_blocks()
    return root


def dashboard_router(async_llm, api_key: str | None) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else request.query_params.get("key", "")
        return secrets.compare_digest(given.encode(), api_key.encode())

    def refused() -> JSONResponse:
        return JSONResponse({"error": {"message": "Incorrect or missing API key: send ?key=<key> or "
                                                  "'Authorization: Bearer <key>'.", "code": "invalid_api_key"}},
                            status_code=401)

    @router.get("/dashboard")
    async def page() -> HTMLResponse:
        return HTMLResponse(_static("dashboard.html"))

    @router.get("/dashboard/static/{name}")
    async def static(name: str) -> Response:
        if name not in STATIC:
            return JSONResponse({"error": {"message": f"no file {name!r}"}}, status_code=404)
        return Response(_static(name), media_type=STATIC[name])

    @router.get("/dashboard/state")
    async def state(request: Request) -> JSONResponse:
        if not authorized(request):
            return refused()
        return JSONResponse(await async_llm.inspect(snapshot))

    @router.get("/dashboard/events")
    async def events(request: Request) -> Response:
        if not authorized(request):
            return refused()
        return StreamingResponse(_push(request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _push(request: Request):
        """A snapshot whenever the published stats changed (a step ran, a request came or went, the
        idle engine touched more of the pool),
        checked PUSH_HZ times a second; a comment every 15 s keeps idle connections open."""
        last_sig, last_send = None, 0.0
        while not await request.is_disconnected():
            st = async_llm.stats()
            sig = tuple(st.get(k) for k in ("steps", "blocks_free", "blocks_cached", "requests_running",
                                             "requests_waiting", "requests_swapped", "num_unfinished",
                                             "kv_bytes_touched"))  # the idle prefault's progress
            now = time.monotonic()
            if sig != last_sig:
                try:
                    snap = await async_llm.inspect(snapshot)
                except Exception:  # noqa: BLE001 - the engine is shutting down: end the stream
                    return
                yield f"data: {json.dumps(snap)}\n\n"
                last_sig, last_send = sig, now
            elif now - last_send > 15:
                yield ": idle\n\n"
                last_send = now
            await asyncio.sleep(1 / PUSH_HZ)

    return router


def _static(name: str) -> str:
    return resources.files("kvserve.server").joinpath("static", name).read_text()
