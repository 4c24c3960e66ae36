"""The installed ``kvserve`` console script end to end, on the real model (each run loads it once)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def kvserve_cmd() -> list[str]:
    """The console script installed next to this interpreter (``pip install -e .``), else ``-m kvserve.cli``."""
    script = Path(sys.executable).parent / "kvserve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "kvserve.cli"]


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([*kvserve_cmd(), *args], input=stdin, capture_output=True, text=True, env=env,
                          timeout=600)


def test_generate_streams_and_reports():
    r = run_cli("generate", "The capital of France is", "--max-tokens", "8", "--kv-cache", "contiguous",
                "--max-model-len", "256")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "TTFT" in r.stderr
    assert "prompt tokens" in r.stderr and "KV allocated" in r.stderr
    assert "Traceback" not in r.stderr


def test_chat_two_piped_turns():
    r = run_cli("chat", "--max-tokens", "8", "--max-model-len", "512",
                stdin="What is the capital of France?\nAnd of Germany?\n")
    assert r.returncode == 0, r.stderr
    turns = re.findall(r"^\[turn (\d+): (\d+) prompt tokens, (\d+) from cache, (\d+) new tokens", r.stderr, re.M)
    assert [t[0] for t in turns] == ["1", "2"], r.stderr
    # the second turn's prompt holds the whole first exchange
    assert int(turns[1][1]) > int(turns[0][1]) + int(turns[0][3])
    assert int(turns[1][2]) >= 32  # ...and found the first turn in the prefix cache
    assert "Paris" in r.stdout


def test_cache_tree_shows_the_shared_prefix(capsys):
    from kvserve.cli import main

    shared = "You are a careful assistant who answers questions about astronomy in plain words. " * 3
    rc = main(["cache-tree", shared + "What is a comet?", shared + "What is a pulsar?", "--max-tokens", "4",
               "--max-model-len", "256", "--dtype", "float32"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "root (" in out and "tokens /" in out and "lock=0" in out
    assert "You are a careful" in out  # the shared node's preview
    second = err.strip().splitlines()[-1]
    cached = int(second.split(",")[1].split()[0])
    # the second prompt found the shared prefix in the cache: its full blocks and, token-granular, the
    # part of the next block the two prompts share
    assert cached >= 32
    assert "prefix cache:" in out


def test_generate_tensor_parallel_gives_the_single_process_text():
    """--tensor-parallel-size 3 through the console script: the same greedy text as one process, the per-rank
    KV line, and no worker left behind (workers hold the output pipes: run() returns only once they are gone)."""
    common = ("generate", "The capital of France is", "--max-tokens", "8", "--max-model-len", "256")
    one = run_cli(*common)
    three = run_cli(*common, "--tensor-parallel-size", "3")
    assert one.returncode == 0 and three.returncode == 0, three.stderr
    assert three.stdout == one.stdout
    assert "tensor parallel: 3 ranks, each with the KV above for its 1 of 3 KV heads" in three.stderr
