"""A real server in a subprocess, shared by the server tests.

``server``: ``python -m kvserve.server --max-model-len 512 --dtype float32 --kv-cache paged --api-key KEY``
on a free port of 127.0.0.1, ready once /health answers 200.

The offline reference is the session's ``llm_paged`` (tests/conftest.py): float32, max_model_len 512,
so greedy results must match token for token.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

API_KEY = "sk-kvserve-test"
MODEL = "smollm2-135m"
COMMON = ["--model", MODEL, "--max-model-len", "512", "--dtype", "float32", "--quantization", "none", "--kv-cache", "paged",
          "--api-key", API_KEY, "--log-level", "warning"]
STARTUP_TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log_path: Path

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {API_KEY}"}

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self) -> "ServerProcess":
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def metric(self, name: str) -> float:
        """The value of one unlabelled-by-us metric (its only series) from /metrics."""
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def wait_blocks_free(self, timeout: float = 15.0) -> float:
        """Poll /metrics until no KV block is held by a request; return the seconds it took."""
        t0 = time.monotonic()
        while self.metric("kvserve_kv_cache_blocks_used") > 0:
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"KV blocks still used after {timeout}s")
            time.sleep(0.1)
        return time.monotonic() - t0


def start_server(tmp: Path, name: str, *extra: str, env: dict | None = None) -> ServerProcess:
    port = free_port()
    log_path = tmp / f"{name}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
    # OpenMP threads that spin while waiting make every op 2-10x slower when other processes share the
    # two cores (this test process, neighbours); sleeping waiters cost little when the cores are free.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = [sys.executable, "-m", "kvserve.server", "--host", "127.0.0.1", "--port", str(port), *COMMON, *extra]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)


MAX_QUEUE = 64


@pytest.fixture(scope="module")
def server(tmp_path_factory, request) -> ServerProcess:
    """One server for the module: 64 sequences at once and a queue limit of 64, so 64 clients all run
    and a 65th gets 503. The module's last test stops it with SIGTERM; the teardown is a fallback.

    The offline reference LLM loads here, while the server process loads its own copy: on two cores
    the two loads overlap rather than queue."""
    srv = start_server(tmp_path_factory.mktemp("server"), "main", "--kv-cache-memory", "128MiB",
                       "--max-num-seqs", "64", "--max-queue", str(MAX_QUEUE))
    try:
        request.getfixturevalue("llm_paged")
        yield srv.wait_ready()
    finally:
        srv.stop()
