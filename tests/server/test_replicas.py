"""``kvserve serve --replicas 2`` on a local Ray cluster, started with the commands docs/distributed.md gives:

    ray start --head --port P --num-cpus 2
    kvserve serve --ray-address 127.0.0.1:P --replicas 2 ...

driven by the ``openai`` client. Greedy outputs equal the offline engine's (``llm_paged``: float32,
max_model_len 512, the server's settings); requests sharing a system prompt find it cached; /metrics
has one series per replica; a replica killed with SIGKILL mid-run loses no request. The kill test runs
last: Ray Serve replaces the dead replica, and the test waits for that too.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from kvserve.sampling_params import SamplingParams
from tests.server.conftest import API_KEY, MODEL, free_port, start_server

pytest.importorskip("ray.serve")

# Ray's token authentication, with a token of this test's own (not ~/.ray's): every process of the
# cluster and its clients must agree on both
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
RAY = str(Path(sys.executable).with_name("ray"))
SYSTEM = ("You are the reference desk of a library of computing history. Answer in one short sentence, "
          "citing the machine, the year and the people involved. ") * 8
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a dragon", "KV caches make decoding"]


def _ray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=dict(os.environ, **RAY_ENV), capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    port = free_port()
    started = _ray("start", "--head", "--port", str(port), "--num-cpus", "2", "--disable-usage-stats",
                   "--include-dashboard=false")
    assert started.returncode == 0, started.stdout + started.stderr
    srv = start_server(tmp_path_factory.mktemp("replicas"), "replicas", "--ray-address", f"127.0.0.1:{port}",
                       "--replicas", "2", "--kv-cache-memory", "64MiB", env=RAY_ENV)
    try:
        request.getfixturevalue("llm_paged")
        yield srv.wait_ready()
    finally:
        srv.stop()
        _ray("stop", "--force")


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _replicas(srv) -> dict:
    return httpx.get(f"{srv.url}/replicas", timeout=10).json()


def _expected(llm, prompts: list[str], max_tokens: int) -> list[str]:
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def test_two_replicas_answer_like_one_engine(cluster, llm_paged):
    info = _replicas(cluster)
    assert info["configured"] == 2 and len(info["data"]) == 2 and info["router"] == "prefix"
    assert len({r["pid"] for r in info["data"]}) == 2
    client = _client(cluster)
    got = [client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0).choices[0].text
           for p in PROMPTS]
    assert got == _expected(llm_paged, PROMPTS, 16)
    # streaming through a replica gives the same text
    text = "".join(ch.choices[0].text for ch in client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0, stream=True))
    assert text == got[0]


def test_shared_system_prompt_is_routed_to_its_cache(cluster):
    """Two system prompts, questions alternating: each system prompt stays on one replica, so every
    repeat finds it cached (the replica's radix tree, reported as cached_tokens)."""
    client = _client(cluster)
    systems = [SYSTEM, SYSTEM.replace("library", "museum").replace("computing", "aviation")]
    cached = []
    for i in range(6):
        r = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=[
            {"role": "system", "content": systems[i % 2]}, {"role": "user", "content": f"Question number {i}?"}])
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        assert r.usage.prompt_tokens > 200
    assert all(c >= 192 for c in cached[2:]), cached  # the system prompt: whole blocks of 16 tokens


def test_metrics_label_each_replica(cluster):
    text = httpx.get(f"{cluster.url}/metrics", timeout=10).text
    assert f'kvserve_replicas{{model_name="{MODEL}"}} 2.0' in text
    ids = {r["id"] for r in _replicas(cluster)["data"]}
    for rid in ids:
        assert f'kvserve_kv_cache_blocks_total{{model_name="{MODEL}",replica="{rid}"}}' in text
    hits = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("kvserve_prefix_cache_hits_total{")]
    assert len(hits) == 2 and sum(hits) > 0


def test_prompt_over_the_context_is_a_clear_400(cluster):
    with pytest.raises(openai.BadRequestError) as e:
        _client(cluster).completions.create(model=MODEL, prompt=[1] * 600, max_tokens=4)
    assert "maximum context length" in str(e.value)


def test_killed_replica_fails_over_and_the_service_goes_on(cluster, llm_paged):
    """Six greedy requests (three streaming) share a prefix, so they run on one replica; that replica is
    killed mid-generation. Every request still returns its whole, correct text, retried once on the
    other replica, and Ray Serve brings the replica count back to 2."""
    prompts = [f"{SYSTEM}\nTell me about computer number {i}." for i in range(6)]
    expected = _expected(llm_paged, prompts, 48)
    client = openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key=API_KEY, max_retries=0, timeout=180)
    before = {r["id"]: r["pid"] for r in _replicas(cluster)["data"]}

    async def one(i: int) -> str:
        if i % 2:
            return (await client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=48,
                                                    temperature=0)).choices[0].text
        text = ""
        async for ch in await client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=48,
                                                        temperature=0, stream=True):
            text += ch.choices[0].text
        return text

    async def run() -> tuple[list[str], str]:
        tasks = [asyncio.create_task(one(i)) for i in range(6)]
        victim = None
        deadline = time.monotonic() + 60
        while victim is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            busy = [r for r in _replicas(cluster)["data"] if (r["requests_running"] or 0) > 0]
            victim = busy[0] if busy else None
        assert victim is not None, "no replica ever showed a running request"
        os.kill(victim["pid"], signal.SIGKILL)
        return await asyncio.gather(*tasks), victim["id"]

    texts, victim = asyncio.run(run())
    assert texts == expected
    info = _replicas(cluster)
    assert info["failovers"] >= 1
    assert _client(cluster).completions.create(model=MODEL, prompt="Hello", max_tokens=4).choices[0].text
    deadline = time.monotonic() + 120  # Ray Serve's controller replaces the dead replica
    while time.monotonic() < deadline:
        ids = {r["id"] for r in _replicas(cluster)["data"]}
        if len(ids) == 2 and victim not in ids:
            break
        time.sleep(1)
    assert len(ids) == 2 and victim not in ids and set(before) - {victim} <= ids, (before, ids)


def test_refusals_before_ray_starts():
    from kvserve.server.replicas import ReplicaSet

    with pytest.raises(ValueError, match="tensor-parallel"):
        ReplicaSet({"model": MODEL, "tensor_parallel_size": 3}, 2)
    with pytest.raises(ValueError, match="router must be one of prefix, round-robin"):
        ReplicaSet({"model": MODEL}, 2, router="random")
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        ReplicaSet({"model": MODEL}, 0)
