"""/dashboard in a real browser: Debian's headless Chromium driven by Playwright, against a real server
process under load from the `openai` client. The grid's cell counts must match /metrics while requests
run and after they end, the tree must show the prompts' shared prefix, and the page must need the key.
A screenshot taken during the load run goes to docs/dashboard.png.

Skips (with the reason) where Chromium or Playwright is missing; `make test` installs both."""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, MODEL, start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: install Debian's chromium (make test does "
                                                          "this as root) to run the dashboard in a browser")
SHARED = ("You are a careful assistant who answers in plain words. Keep every answer short and say when you are "
          "unsure. Think about the question first. ")
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"


@pytest.fixture(scope="module")
def dash_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboard")
    # with both KV tiers on (docs/kv_tiers.md): the page must show the pool the same way, and /metrics
    # exports the tiers' series
    srv = start_server(tmp, "dashboard", "--kv-cache-memory", "48MiB", "--max-num-seqs", "8",
                       "--kv-offload-memory", "64MiB", "--kv-cache-dir", str(tmp / "kv"))
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def grid_counts(page) -> dict:
    return page.evaluate("""() => {
        const c = {used: 0, cached: 0, free: 0};
        for (const d of document.querySelectorAll('#grid .cell'))
            c[d.classList.contains('free') ? 'free' : d.classList.contains('cached') ? 'cached' : 'used'] += 1;
        return c;
    }""")


def metric_counts(srv) -> dict:
    return {k: int(srv.metric(f"kvserve_kv_cache_blocks_{k}")) for k in ("used", "cached", "free")}


@needs_chromium
def test_the_page_needs_the_key(dash_server, browser):
    assert httpx.get(f"{dash_server.url}/dashboard/state").status_code == 401
    assert httpx.get(f"{dash_server.url}/dashboard/events").status_code == 401
    assert httpx.get(f"{dash_server.url}/dashboard/state?key=wrong").status_code == 401
    page = browser.new_page()
    page.goto(f"{dash_server.url}/dashboard")
    page.wait_for_selector("#key-form", state="visible")
    assert page.locator("#main").is_hidden() and page.locator("#grid .cell").count() == 0
    page.fill("#key-input", "wrong")
    page.click("#key-form button")
    page.wait_for_selector("#key-error:has-text('refused')")
    page.fill("#key-input", API_KEY)
    page.click("#key-form button")
    page.wait_for_selector("#grid .cell")
    assert page.locator("#main").is_visible()
    page.close()


@needs_chromium
def test_grid_matches_metrics_during_and_after_load_and_the_tree_shows_the_shared_prefix(dash_server, browser):
    srv = dash_server
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    page.goto(f"{srv.url}/dashboard?key={API_KEY}")
    page.wait_for_selector("#grid .cell")
    # the idle server touches its whole pool, and the page says so as /metrics does
    alloc = srv.metric("kvserve_kv_cache_bytes_allocated")
    deadline = time.monotonic() + 60
    while srv.metric("kvserve_kv_cache_bytes_touched") < alloc and time.monotonic() < deadline:
        time.sleep(0.1)
    mib = f"{alloc / 2**20:.1f}"
    page.wait_for_function(f"() => document.querySelector('#counter-touched b').textContent === '{mib} / {mib} MiB'",
                           timeout=10_000)
    total = sum(metric_counts(srv).values())
    assert page.locator("#grid .cell").count() == total

    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)
    topics = ["caches", "queues", "rivers", "clocks", "bridges", "gardens"]
    threads = [threading.Thread(target=client.completions.create, kwargs=dict(
        model=MODEL, prompt=SHARED + f"Question: what do you know about {t}? Answer:", max_tokens=160,
        temperature=0, extra_body={"ignore_eos": True})) for t in topics]
    for t in threads:
        t.start()
    try:
        # while requests run, the page shows what /metrics says (it trails by one push, so retry until a
        # moment where both stand still): used blocks belong to running requests, coloured per request
        matched, deadline = None, time.monotonic() + 60
        while matched is None and time.monotonic() < deadline:
            before, shown, after = metric_counts(srv), grid_counts(page), metric_counts(srv)
            if before == after == shown and shown["used"] > 0:
                matched = shown
            time.sleep(0.1)
        assert matched is not None, (before, shown, after)
        owners = page.evaluate("() => new Set([...document.querySelectorAll('#grid .cell.req')]"
                               ".map(d => d.dataset.owner)).size")
        assert owners >= 2
        assert page.locator("#requests tbody tr").count() >= 2
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
    finally:
        for t in threads:
            t.join()
    srv.wait_blocks_free()
    deadline = time.monotonic() + 10
    while grid_counts(page) != metric_counts(srv) and time.monotonic() < deadline:
        time.sleep(0.1)
    after = metric_counts(srv)
    assert grid_counts(page) == after and after["used"] == 0 and after["cached"] > 0
    assert page.locator("#requests tbody tr").count() == 0

    # the prefix tree: the shared system prompt is one node whose children are the questions
    page.wait_for_function("() => document.querySelectorAll('#tree > details').length > 0")
    top = page.locator("#tree > details")
    shared = [i for i in range(top.count()) if "careful assistant" in top.nth(i).locator("summary").first.inner_text()]
    assert len(shared) == 1
    node = top.nth(shared[0])
    assert node.locator(":scope > details").count() >= len(topics) - 1  # one branch per question
    page.close()


def test_the_grafana_dashboard_queries_metrics_the_server_exports(dash_server):
    """examples/grafana/kvserve.json: valid JSON, and every kvserve_* series its queries name is in a
    live /metrics scrape (counters with _total, histograms with _bucket)."""
    import json
    import re

    dash = json.loads((Path(__file__).resolve().parents[2] / "examples" / "grafana" / "kvserve.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = set(re.findall(r"kvserve_[a-z_]+", " ".join(exprs)))
    assert len(dash["panels"]) >= 8 and len(names) >= 12
    text = httpx.get(f"{dash_server.url}/metrics").text
    exported = set(re.findall(r"^(kvserve_[a-z_]+)", text, re.M))
    assert names <= exported, names - exported
    for tier in ("host", "disk"):  # the KV tiers this server runs with, one series each
        assert re.search(rf'^kvserve_kv_tier_hits_total{{.*tier="{tier}".*}} ', text, re.M), text[-2000:]
        assert re.search(rf'^kvserve_kv_tier_bytes{{.*tier="{tier}".*}} ', text, re.M)


def test_serve_writes_its_trace_on_shutdown(tmp_path):
    """`kvserve serve --trace FILE`: the engine's steps and each request's spans, written at SIGTERM."""
    import json

    path = tmp_path / "serve-trace.json"
    srv = start_server(tmp_path, "traced", "--trace", str(path)).wait_ready()
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    finally:
        srv.stop()
    assert srv.proc.returncode == 0
    events = json.loads(path.read_text())["traceEvents"]
    steps = [ev for ev in events if ev["ph"] == "X" and ev["tid"] == 0]
    phases = {ev["name"] for ev in events if ev["ph"] == "X" and ev["tid"] == 1}
    assert len(steps) == 5 and {"queued", "prefill", "decode"} <= phases
