"""The cache made visible: per-step records (``LLMEngine.observers``), the --explain text and the
Chrome/Perfetto trace, on a scripted workload whose tiny pool forces prefix-tree eviction and
preemption. The records must add up and agree with ``cache_stats()``."""
from __future__ import annotations

import io
import json

import pytest

from kvserve import SamplingParams
from kvserve.engine.trace import ChromeTrace, Explainer
from tests.conftest import make_llm
from tests.model.test_cli_generate import run_cli

SHARED = ("You are a careful assistant who answers in plain words. Keep every answer short, and say when "
          "you are unsure. ")


@pytest.fixture(scope="module")
def scripted():
    """One request alone (its blocks go to the prefix tree), one that hits its prefix, then five at once
    in a pool too small for them: the tree is evicted and the newest running requests are preempted."""
    llm = make_llm(num_kv_blocks=14, max_model_len=192, max_num_batched_tokens=64, max_num_seqs=5)
    e = llm.engine
    records, text = [], io.StringIO()
    explainer, tracer = Explainer(e, out=text), ChromeTrace(e)
    e.observers += [records.append, explainer, tracer]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    llm.generate(SHARED + "What is a cache?", params, use_tqdm=False)
    llm.generate(SHARED + "What is a queue?", params, use_tqdm=False)
    others = [f"Story {i}: once upon a time a fox named {name} walked" for i, name in enumerate("ABCDE")]
    llm.generate(others, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), use_tqdm=False)
    explainer.close()
    return llm, records, text.getvalue(), tracer.to_json()


def test_block_counts_add_up_every_step(scripted):
    llm, records, _, _ = scripted
    held = 0
    for r in records:
        assert r.delta.allocated - r.delta.freed == r.blocks_held - held, r
        assert r.delta.evicted <= r.delta.freed
        held = r.blocks_held
        assert r.blocks_in_use + r.blocks_cached + r.blocks_free == r.blocks_total


def test_records_agree_with_cache_stats(scripted):
    llm, records, _, _ = scripted
    stats = llm.cache_stats()
    last = records[-1]
    assert stats["preemptions"] == sum(len(r.preempted) for r in records) == sum(r.delta.preemptions for r in records) > 0
    assert stats["prefix_cache_evicted_blocks"] == sum(r.delta.evicted for r in records) > 0
    assert stats["prefix_cache_hits"] == sum(r.delta.prefix_hit_tokens for r in records) > 0
    assert (stats["blocks_used"], stats["blocks_cached"], stats["blocks_free"]) == \
        (last.blocks_in_use, last.blocks_cached, last.blocks_free)
    assert {rid for r in records for rid in r.finished} == {rid for r in records for rid, _, _ in r.seqs}


def test_explain_prints_one_line_per_step_and_a_summary(scripted):
    _, records, text, _ = scripted
    lines = text.strip().splitlines()
    steps = [ln for ln in lines if ln.startswith("step ")]
    assert len(steps) == len(records)
    assert any("preempted" in ln for ln in steps) and any("evicted" in ln for ln in steps)
    assert any("hit " in ln for ln in steps) and any("copied" in ln for ln in steps)
    assert "the seeds' formula" in lines[-1] and "preemptions" in lines[-2]
    assert "\x1b[" not in text  # colour only on a terminal


def test_trace_has_the_required_fields_and_spans_nest(scripted):
    _, records, _, trace = scripted
    events = json.loads(json.dumps(trace))["traceEvents"]
    for ev in events:
        assert {"name", "ph", "pid", "tid"} <= ev.keys()
        if ev["ph"] in ("X", "C"):
            assert isinstance(ev["ts"], float | int) and ev["ts"] >= 0
        if ev["ph"] == "X":
            assert ev["dur"] >= 0
    spans = [ev for ev in events if ev["ph"] == "X"]
    steps = sorted((ev for ev in spans if ev["tid"] == 0), key=lambda ev: ev["ts"])
    assert len(steps) == len(records)
    assert all(a["ts"] + a["dur"] <= b["ts"] + 0.2 for a, b in zip(steps, steps[1:]))  # steps do not overlap
    tracks = {ev["tid"] for ev in spans} - {0}
    assert len(tracks) == 7
    seen = set()
    for tid in tracks:
        parent = [ev for ev in spans if ev["tid"] == tid and ev["name"].startswith("request ")]
        phases = sorted((ev for ev in spans if ev["tid"] == tid and not ev["name"].startswith("request ")),
                        key=lambda ev: ev["ts"])
        assert len(parent) == 1
        p = parent[0]
        for a in phases:  # inside the request's span, one after another
            assert p["ts"] <= a["ts"] and a["ts"] + a["dur"] <= p["ts"] + p["dur"] + 0.2
        assert all(a["ts"] + a["dur"] <= b["ts"] + 0.2 for a, b in zip(phases, phases[1:]))
        assert phases[0]["name"] == "queued" and phases[-1]["name"] == "decode"
        seen |= {a["name"] for a in phases}
    assert seen == {"queued", "prefill", "decode", "preempted"}
    counters = [ev for ev in events if ev["ph"] == "C"]
    assert len(counters) == len(records)
    assert counters[-1]["args"] == {"in use": records[-1].blocks_in_use, "cached": records[-1].blocks_cached,
                                    "free": records[-1].blocks_free}


def test_generate_explain_and_trace_from_the_cli(tmp_path):
    path = tmp_path / "trace.json"
    r = run_cli("generate", "The capital of France is", "--max-tokens", "6", "--max-model-len", "256",
                "--explain", "--trace", str(path))
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    steps = [ln for ln in r.stderr.splitlines() if ln.startswith("step ")]
    assert len(steps) == 6 and "prefill 0:" in steps[0] and "decode 0" in steps[1]
    assert "the seeds' formula" in r.stderr and "trace:" in r.stderr
    events = json.loads(path.read_text())["traceEvents"]
    assert sum(ev["ph"] == "X" and ev["tid"] == 0 for ev in events) == 6


def test_dashboard_snapshot_counts_equal_cache_stats_at_every_step():
    """The /dashboard grid's data (kvserve.server.dashboard.snapshot), taken after every step of a swap-
    preempting workload: its owner counts are cache_stats()'s used / cached / free, each running
    request owns the blocks of its table, and the swap pool holds what cache_stats() says."""
    from kvserve.server.dashboard import snapshot

    llm = make_llm(num_kv_blocks=14, max_model_len=192, max_num_batched_tokens=64, max_num_seqs=5,
                   preemption_mode="swap")
    e = llm.engine
    seen = {"swapped": 0, "shared": 0}

    def check(_record):
        snap, stats = snapshot(e), e.cache_stats()
        owners = snap["blocks"]
        used = sum(o not in ("free", "cached") for o in owners)
        assert (used, owners.count("cached"), owners.count("free")) == \
            (stats["blocks_used"], stats["blocks_cached"], stats["blocks_free"])
        assert sum(n for _, n in snap["swapped"]) == stats["swapped_blocks"]
        for r in snap["requests"]:
            if r["status"] == "running":
                for b in r["block_tables"][0]:
                    assert owners[b - 1] in (r["id"], "shared")
        seen["swapped"] += bool(snap["swapped"])
        seen["shared"] += owners.count("shared") > 0

    e.observers.append(check)
    prompts = [SHARED + f"Question {i}: what is a {w}?" for i, w in enumerate(["cache", "queue", "tree", "heap", "map"])]
    llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), use_tqdm=False)
    assert seen["swapped"] > 0 and seen["shared"] > 0 and e.cache_stats()["preemptions"] > 0
