"""Prometheus metrics for /metrics.

Two sources:

* the engine's own counters and gauges (KV blocks, prefix-cache tokens, preemptions, queue sizes,
  token counts) are read from ``AsyncLLM.stats()`` at scrape time by a custom collector, so they
  can never drift from what the engine reports;
* latencies (TTFT, inter-token, end-to-end) are measured by the server where the client sees them,
  queueing included, and go into histograms.

Every metric carries a ``model_name`` label, as vLLM's do. Names use the ``kvserve_`` prefix.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvserve.request import RequestOutput

# vLLM's buckets
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)

# (metric, help, key in AsyncLLM.stats())
_GAUGES = [
    ("kvserve_kv_cache_usage_ratio", "Fraction of KV blocks held by requests (0..1).", "usage"),
    ("kvserve_kv_cache_blocks_total", "Usable KV blocks in the pool.", "blocks_total"),
    ("kvserve_kv_cache_blocks_free", "KV blocks on the free list.", "blocks_free"),
    ("kvserve_kv_cache_blocks_used", "KV blocks held by requests (prefix-cache-only blocks excluded).", "blocks_used"),
    ("kvserve_kv_cache_blocks_cached", "KV blocks held only by the prefix cache (evictable).", "blocks_cached"),
    ("kvserve_kv_cache_bytes_allocated", "Bytes of the KV pool (codes and scales of a quantized cache).",
     "kv_bytes_allocated"),
    ("kvserve_kv_cache_bytes_touched", "Bytes of the KV pool whose pages have been touched (zeroed in idle time or "
     "used): the part of the reservation that holds RAM.", "kv_bytes_touched"),
    ("kvserve_kv_cache_bytes_in_use", "Bytes of the KV blocks held by requests.", "kv_bytes_in_use"),
    ("kvserve_kv_cache_bytes_per_token", "KV bytes one token costs over all layers (scales included).",
     "kv_bytes_per_token"),
    ("kvserve_tensor_parallel_size", "Ranks the model and its KV cache are split over (the KV figures above are "
     "per rank).", "tensor_parallel_size"),
    ("kvserve_kv_cache_bytes_allocated_all_ranks", "Bytes of the KV pools of all tensor-parallel ranks.",
     "kv_bytes_allocated_all_ranks"),
    ("kvserve_num_requests_running", "Requests in the running batch.", "requests_running"),
    ("kvserve_num_requests_waiting", "Requests waiting to be scheduled.", "requests_waiting"),
    ("kvserve_num_requests_swapped", "Requests preempted to the CPU swap pool.", "requests_swapped"),
    ("kvserve_num_requests_unfinished", "Requests admitted by the server and not yet finished.", "num_unfinished"),
]
_COUNTERS = [
    ("kvserve_prompt_tokens", "Prompt tokens added to the engine.", "prompt_tokens"),
    ("kvserve_generation_tokens", "Tokens generated.", "generation_tokens"),
    ("kvserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
    ("kvserve_prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_cache_hits"),
    ("kvserve_num_preemptions", "Requests preempted for lack of KV blocks.", "preemptions"),
    ("kvserve_engine_steps", "Engine steps run.", "steps"),
    ("kvserve_requests_aborted", "Requests aborted (client gone, abort, shutdown).", "num_aborted"),
    ("kvserve_engine_step_errors", "Engine steps that raised.", "num_errors"),
    ("kvserve_kv_compressions", "Requests whose KV cache was compressed after prefill.", "kv_compressions"),
    ("kvserve_kv_compression_tokens_before", "Tokens in compressed requests' caches before compression.",
     "kv_compression_tokens_before"),
    ("kvserve_kv_compression_tokens_after", "Tokens kept by KV compression.", "kv_compression_tokens_after"),
    ("kvserve_kv_compression_blocks_returned", "KV blocks given back to the pool by compression.",
     "kv_compression_blocks_returned"),
]


_TIER_METRICS = [
    ("hits", CounterMetricFamily, "KV blocks loaded up from this tier on a prefix match."),
    ("bytes_loaded", CounterMetricFamily, "Bytes loaded up from this tier."),
    ("load_seconds", CounterMetricFamily, "Seconds spent loading blocks from this tier."),
    ("stored", CounterMetricFamily, "KV blocks written into this tier."),
    ("evicted", CounterMetricFamily, "KV blocks this tier dropped for room (LRU)."),
    ("corrupt", CounterMetricFamily, "Files skipped as corrupt, truncated or another model's (disk)."),
    ("write_errors", CounterMetricFamily, "Writes that failed (the disk tier then stops writing)."),
    ("blocks", GaugeMetricFamily, "KV blocks this tier holds."),
    ("bytes", GaugeMetricFamily, "Bytes this tier holds."),
]


class _EngineCollector:
    """Reads one stats() snapshot per scrape. Keys the engine does not report yet read as 0.

    With ``replica_stats`` (``kvserve serve --replicas N``) every engine metric has one series per live
    replica, labelled ``replica``; ``sum without (replica) (...)`` gives the whole service. Two more
    series say how many replicas answer and how many requests were retried after a replica died."""

    def __init__(self, stats, model_name: str, replica_stats=None):
        self.stats, self.model_name, self.replica_stats = stats, model_name, replica_stats

    def collect(self):
        if self.replica_stats is None:
            sources, labels = [([self.model_name], self.stats())], ["model_name"]
        else:
            reps = self.replica_stats()
            sources = [([self.model_name, rid], s) for rid, s in reps.items()]
            labels = ["model_name", "replica"]
            front = self.stats()
            g = GaugeMetricFamily("kvserve_replicas", "Engine replicas publishing their stats.", labels=["model_name"])
            g.add_metric([self.model_name], len(reps))
            yield g
            c = CounterMetricFamily("kvserve_replica_failovers", "Requests retried on another replica after "
                                    "theirs died.", labels=["model_name"])
            c.add_metric([self.model_name], float(front.get("num_failovers") or 0))
            yield c
        for names, family in ((_GAUGES, GaugeMetricFamily), (_COUNTERS, CounterMetricFamily)):
            for name, doc, key in names:
                m = family(name, doc, labels=labels)
                for values, s in sources:
                    m.add_metric(values, float(s.get(key) or 0))
                yield m
        # KV tiers (only those configured): one series per tier
        tiered = [(values, s, t) for values, s in sources for t in ("host", "disk") if f"kv_tier_{t}_blocks" in s]
        if tiered:
            for key, family, doc in _TIER_METRICS:
                m = family(f"kvserve_kv_tier_{key}", doc, labels=labels + ["tier"])
                for values, s, t in tiered:
                    m.add_metric(values + [t], float(s.get(f"kv_tier_{t}_{key}") or 0))
                yield m


class Metrics:
    """A registry of its own per app, so two apps in one process do not clash."""

    def __init__(self, stats, model_name: str, replica_stats=None):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, model_name, replica_stats))
        kw = dict(labelnames=["model_name"], registry=self.registry)
        self.ttft = Histogram("kvserve_time_to_first_token_seconds", "Time from request arrival to its first token.",
                              buckets=TTFT_BUCKETS, **kw).labels(model_name)
        self.itl = Histogram("kvserve_inter_token_latency_seconds", "Time between two tokens of a request.",
                             buckets=ITL_BUCKETS, **kw).labels(model_name)
        self.e2e = Histogram("kvserve_e2e_request_latency_seconds", "Time from request arrival to its last token.",
                             buckets=E2E_BUCKETS, **kw).labels(model_name)
        self.finished = Counter("kvserve_request_success", "Requests finished, by finish reason.",
                                labelnames=["model_name", "finished_reason"], registry=self.registry)

    def tracker(self) -> "RequestTimer":
        return RequestTimer(self)


class RequestTimer:
    """Latencies of one request (or the n samples of one prompt), fed each output as it arrives."""

    def __init__(self, metrics: Metrics):
        self.m = metrics
        self.start = self.last = time.perf_counter()
        self.tokens = 0  # tokens of the furthest sample so far: samples of one prompt advance together
        self.done = False

    def on_output(self, out: RequestOutput) -> None:
        n = max((len(c.token_ids) for c in out.outputs), default=0)
        now = time.perf_counter()
        new = n - self.tokens
        if new > 0:
            if self.tokens == 0:
                self.m.ttft.observe(now - self.start)
            else:
                # an output carries several tokens when its consumer fell behind: spread the gap
                for _ in range(new):
                    self.m.itl.observe((now - self.last) / new)
            self.tokens, self.last = n, now
        if out.finished and not self.done:
            self.done = True
            self.m.e2e.observe(now - self.start)
            for c in out.outputs:
                self.m.finished.labels(self.m.model_name, c.finish_reason or "abort").inc()
