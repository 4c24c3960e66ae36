"""What each engine step did to KV memory, as records that observers turn into text or a trace.

The engine hands every observer one ``StepRecord`` after each step (``LLMEngine.observers``):

    step 7  12.4 ms | prefill 2:64 | decode 0 1 | blocks +5 -2 (evicted 2, copied 1) | hit 32 tok
            | held 41 (3 cached) free 58 of 99 | KV 1.28 MiB in use of 3.09 MiB

The block counts come from counters the pool and manager keep since the start, so they add up by
construction: allocated - freed == the change in blocks held, whatever happened between steps (an
abort, say) lands in the next record. Two observers ship here: ``Explainer`` (kvserve generate/chat
--explain: one line per step and a closing summary that ties the seeds' formula to the blocks) and
``ChromeTrace`` (--trace FILE: Chrome's Trace Event Format, opened by Perfetto or chrome://tracing).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from kvserve.kv.spec import format_bytes


@dataclass
class KVCounters:
    """The pool's and manager's running totals at one moment."""

    allocated: int = 0
    freed: int = 0
    evicted: int = 0  # blocks the prefix tree gave up (a subset of freed)
    copied: int = 0  # copy-on-write of a prefix-cache tail
    swapped_out: int = 0
    swapped_in: int = 0
    prefix_hit_tokens: int = 0
    preemptions: int = 0

    @classmethod
    def read(cls, engine) -> "KVCounters":
        m = engine.kv_manager
        pc = m.prefix_cache
        return cls(m.pool.num_allocated_total, m.pool.num_freed_total, pc.evicted_blocks if pc else 0,
                   m.num_copied_blocks, m.num_swapped_out_blocks, m.num_swapped_in_blocks, m.prefix_hits,
                   engine.scheduler.num_preemptions)

    def __sub__(self, other: "KVCounters") -> "KVCounters":
        return KVCounters(*(a - b for a, b in zip(vars(self).values(), vars(other).values())))

    def __add__(self, other: "KVCounters") -> "KVCounters":
        return KVCounters(*(a + b for a, b in zip(vars(self).values(), vars(other).values())))


@dataclass
class StepRecord:
    step: int
    start: float  # time.monotonic() when the step began
    seconds: float
    seqs: list[tuple[str, str, int]]  # (request id, "prefill" | "decode", tokens computed)
    delta: KVCounters  # what happened to blocks since the previous record
    preempted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    arrivals: dict[str, float] = field(default_factory=dict)  # request id -> arrival (monotonic), first seen
    blocks_total: int = 0
    blocks_held: int = 0  # by anyone: requests or the prefix tree (pool.num_used)
    blocks_cached: int = 0  # held by the prefix tree alone (evictable)
    block_bytes: int = 0
    kv_bytes_allocated: int = 0
    tokens_resident: int = 0  # cache positions live requests hold (what the seeds' formula counts)

    @property
    def blocks_free(self) -> int:
        return self.blocks_total - self.blocks_held

    @property
    def blocks_in_use(self) -> int:
        return self.blocks_held - self.blocks_cached


def describe_seqs(seqs: list[tuple[str, str, int]]) -> str:
    """'prefill 2:64 | decode 0 1' (request:tokens for prompt chunks, ids for decodes)."""
    prefill = [f"{rid}:{n}" for rid, kind, n in seqs if kind == "prefill"]
    decode = [rid for rid, kind, _ in seqs if kind == "decode"]
    parts = []
    if prefill:
        parts.append("prefill " + " ".join(prefill))
    if decode:
        parts.append("decode " + " ".join(decode))
    return " | ".join(parts) or "idle"


class Explainer:
    """--explain: one line per step on ``out`` (colour only on a terminal), a summary at the end."""

    def __init__(self, engine, out: TextIO | None = None):
        self.engine, self.out = engine, out or sys.stderr
        self.records = 0
        self.total = KVCounters()
        self.peak: StepRecord | None = None
        self.tokens = 0
        self.console = None
        if self.out.isatty():
            from rich.console import Console

            self.console = Console(file=self.out, highlight=False)

    def __call__(self, r: StepRecord) -> None:
        self.records += 1
        self.total = self.total + r.delta
        self.tokens += sum(n for _, _, n in r.seqs)
        if self.peak is None or (r.blocks_in_use, r.tokens_resident) > (self.peak.blocks_in_use, self.peak.tokens_resident):
            self.peak = r
        self._print(self.line(r))

    @staticmethod
    def line(r: StepRecord) -> str:
        d = r.delta
        moves = [f"{name} {n}" for name, n in (("evicted", d.evicted), ("copied", d.copied),
                                                ("swapped out", d.swapped_out), ("swapped in", d.swapped_in)) if n]
        blocks = f"blocks +{d.allocated} -{d.freed}" + (f" ({', '.join(moves)})" if moves else "")
        parts = [f"step {r.step:<4d} {r.seconds * 1e3:6.1f} ms", describe_seqs(r.seqs), blocks]
        if d.prefix_hit_tokens:
            parts.append(f"hit {d.prefix_hit_tokens} tok")
        if r.preempted:
            parts.append("preempted " + " ".join(r.preempted))
        if r.finished:
            parts.append("finished " + " ".join(r.finished))
        parts.append(f"held {r.blocks_held} ({r.blocks_cached} cached) free {r.blocks_free} of {r.blocks_total}")
        parts.append(f"KV {format_bytes(r.blocks_in_use * r.block_bytes)} in use of {format_bytes(r.kv_bytes_allocated)}")
        return " | ".join(parts)

    def _print(self, text: str, style: str | None = None) -> None:
        if self.console is not None:
            self.console.print(text, style=style, markup=False)
        else:
            print(text, file=self.out, flush=True)

    def summary(self) -> str:
        """How the steps add up, and the seeds' formula against the blocks at the busiest step."""
        t, e = self.total, self.engine
        lines = [f"{self.records} steps, {self.tokens} tokens computed; blocks allocated {t.allocated}, freed "
                 f"{t.freed} (evicted from the prefix tree {t.evicted}), copied on write {t.copied}, swapped out "
                 f"{t.swapped_out} / in {t.swapped_in}; preemptions {t.preemptions}; prefix-hit tokens "
                 f"{t.prefix_hit_tokens}"]
        p = self.peak
        if p is not None and p.tokens_resident:
            formula = e.kv_spec.formula_bytes(p.tokens_resident)
            used = p.blocks_in_use * p.block_bytes
            lines.append(
                f"busiest step ({p.step}): {p.tokens_resident} tokens resident -> the seeds' formula "
                f"(2 x layers x kv_heads x head_dim x tokens x bytes) gives {format_bytes(formula)}; their "
                f"{p.blocks_in_use} blocks x {e.kv_cache.block_size} tokens hold {format_bytes(used)} "
                f"({used / max(1, formula):.2f}x: partly filled last blocks, and shared prefix blocks "
                f"counted once); the pool allocated {format_bytes(p.kv_bytes_allocated)}")
        return "\n".join(lines)

    def close(self) -> None:
        self._print(self.summary(), style="bold")


class ChromeTrace:
    """--trace FILE: the steps, each request's phases and the block counts, in Chrome's Trace Event
    Format. Track 0 holds the engine steps; each request gets its own track, on which one span from
    arrival to finish holds its phases (queued, prefill, decode, preempted) in order, so spans nest."""

    def __init__(self, engine):
        self.engine = engine
        self.t0 = time.monotonic()
        self.events: list[dict] = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "kvserve"}},
                                   {"name": "thread_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "engine steps"}}]
        self.tracks: dict[str, int] = {}
        # request id -> (arrival, current phase, phase start)
        self.open: dict[str, tuple[float, str, float]] = {}

    def _us(self, t: float) -> float:
        return round(max(0.0, t - self.t0) * 1e6, 1)

    def _span(self, name: str, tid: int, start: float, end: float, args: dict | None = None) -> None:
        ev = {"name": name, "ph": "X", "pid": 1, "tid": tid, "ts": self._us(start),
              "dur": max(0.0, round(self._us(end) - self._us(start), 1))}
        if args:
            ev["args"] = args
        self.events.append(ev)

    def _track(self, rid: str) -> int:
        if rid not in self.tracks:
            self.tracks[rid] = tid = len(self.tracks) + 1
            self.events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": f"request {rid}"}})
        return self.tracks[rid]

    def _enter(self, rid: str, phase: str, t: float) -> None:
        arrival, old, since = self.open[rid]
        if old != phase:
            self._span(old, self._track(rid), since, t)
            self.open[rid] = (arrival, phase, t)

    def __call__(self, r: StepRecord) -> None:
        end = r.start + r.seconds
        self._span(f"step {r.step}", 0, r.start, end,
                   {"seqs": describe_seqs(r.seqs), **{k: v for k, v in vars(r.delta).items() if v}})
        self.events.append({"name": "KV blocks", "ph": "C", "pid": 1, "tid": 0, "ts": self._us(end),
                            "args": {"in use": r.blocks_in_use, "cached": r.blocks_cached, "free": r.blocks_free}})
        for rid, arrival in r.arrivals.items():
            self.open.setdefault(rid, (max(arrival, self.t0), "queued", max(arrival, self.t0)))
        for rid in r.preempted:
            if rid in self.open:
                self._enter(rid, "preempted", r.start)
        for rid, kind, _ in r.seqs:
            if rid in self.open:
                self._enter(rid, kind, r.start)
        for rid in r.finished:
            self._close(rid, end)

    def _close(self, rid: str, t: float) -> None:
        if rid not in self.open:
            return
        arrival, phase, since = self.open.pop(rid)
        tid = self._track(rid)
        self._span(phase, tid, since, t)
        # the parent span last: viewers sort by start time, and equal starts put the longer one outside
        self._span(f"request {rid}", tid, arrival, t)

    def to_json(self) -> dict:
        now = time.monotonic()
        for rid in list(self.open):  # still running (or aborted between steps): close at the end
            self._close(rid, now)
        return {"traceEvents": self.events, "displayTimeUnit": "ms"}

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f)
