"""Continuous batching with one token budget (vLLM v1's scheduler, in small).

Each step:
  1. running requests first, oldest first: each gets what it still lacks (1 token for a decode, the
     rest of its prompt, capped by the budget: that is chunked prefill). If the pool has no room,
     the newest running request is preempted (recompute: drop its KV and re-queue it; swap: copy
     its blocks to a CPU pool and bring them back later).
  2. then, if nobody was preempted, swapped-out requests come back, then waiting ones are admitted
     while there are budget, sequence slots and blocks.

The scheduler decides; KV memory is the manager's (``kv.manager``): the scheduler never touches the
pool, the tree or the K/V tensors. It returns a plain plan (``SchedulerOutput``).

With ``kv_cache="off"`` every request drops its KV after each step, so the next step recomputes the
whole sequence: the no-cache reference, through the same code.
"""
from __future__ import annotations

from collections import deque

from kvserve.config import CacheConfig, KVCacheMode, PreemptionMode, SchedulerConfig
from kvserve.engine.batch import ScheduledSeq, SchedulerOutput
from kvserve.kv.manager import KVCacheManager, PrefixHit
from kvserve.request import Request, RequestStatus


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, cache_cfg: CacheConfig, kv_manager: KVCacheManager):
        self.cfg, self.cache_cfg = cfg, cache_cfg
        self.kv = kv_manager
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue
    def add_request(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)
        self.kv.prefetch(req)  # KV tiers: its blocks start coming up from disk while it waits

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def finish(self, req: Request, reason: str) -> None:
        """Mark finished, free its blocks, and take it off every queue."""
        req.status, req.finish_reason = RequestStatus.FINISHED, reason
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        elif req in self.swapped:
            self.swapped.remove(req)
            self.kv.drop_swap(req)
        self.kv.free(req)
        self.requests.pop(req.request_id, None)

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> SchedulerOutput:
        scheduled: list[tuple[Request, int]] = []
        preempted: list[str] = []
        budget = self.cfg.max_num_batched_tokens

        # 1. running requests
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while self.kv.allocate_slots(req, n) is None:
                victim = self.running.pop()  # the newest
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                scheduled.append((req, n))
                budget -= n
                i += 1

        if not preempted:  # memory is short: admit nobody new this step
            self._admit(scheduled, budget)
        return SchedulerOutput([self._plan(req, n) for req, n in scheduled], preempted,
                               self.kv.take_position_shifts())

    def _admit(self, scheduled: list[tuple[Request, int]], budget: int) -> None:
        """Swapped-out requests come back first; waiting ones only when none is left swapped out."""
        while self.swapped and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            req = self.swapped[0]
            if not self.kv.swap_in(req):
                break
            self.swapped.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if self.kv.allocate_slots(req, n) is None:
                break  # it is running again: scheduled next step
            scheduled.append((req, n))
            budget -= n
        if self.swapped:
            return

        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            hit = PrefixHit() if self.kv.bypasses_prefix_cache(req) else self.kv.get_computed_blocks(req)
            n = req.num_tokens - hit.num_tokens
            if n > budget and not self.cfg.enable_chunked_prefill:
                break
            n = min(n, budget)
            if self.kv.allocate_slots(req, n, hit) is None:
                break
            self.kv.record_hit(req, hit)
            req.num_computed_tokens = hit.num_tokens
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = hit.num_tokens
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append((req, n))
            budget -= n

    def _plan(self, req: Request, n: int) -> ScheduledSeq:
        c = req.num_computed_tokens
        tables = [list(t) for t in self.kv.block_tables(req.request_id)]
        # prompt_logprobs: the logits of prompt positions not yet scored (a recomputed request skips them)
        all_logits = req.params.prompt_logprobs is not None and len(req.prompt_logprobs) < req.num_prompt_tokens
        rid = req.request_id
        seq = ScheduledSeq(rid, req.all_token_ids[c : c + n], c, tables, c + n == req.num_tokens,
                           all_logits, self.kv.position_shift(rid), self.kv.rope_at_text(rid))
        # KV compression: once per prefill (a recomputed request compresses again), at its last chunk;
        # the attention methods keep the queries of the prompt's last window as its chunks run. Decode
        # steps never compress, even once a short prompt plus its output outgrows the window.
        comp, length = req.compression, req.num_tokens
        if comp is not None and not req.compression_decided:
            if comp.applies_to(length):
                if comp.query_window and c + n > length - comp.query_window:
                    seq.capture = (length - comp.query_window, comp.query_window)
                if c + n == length:
                    seq.compress = comp
            req.compression_decided = c + n == length
        elif comp is not None and comp.method == "h2o" and seq.rope_at_text and n == 1:
            seq.capture, seq.observe = (c, 1), comp  # h2o keeps scoring (and evicting) while it decodes
        return seq

    def after_step(self, out: SchedulerOutput) -> None:
        """Advance each scheduled request past the tokens it just computed."""
        for s in out.seqs:
            req = self.requests[s.request_id]
            req.num_computed_tokens += s.num_new_tokens
            self.kv.cache_blocks(req)
            if self.cache_cfg.kv_cache == KVCacheMode.OFF:
                # No cache: forget everything; the next step recomputes the whole sequence.
                self.kv.free(req)
                req.num_computed_tokens = 0

    # ------------------------------------------------------------------ preemption
    def _preempt(self, req: Request) -> None:
        self.num_preemptions += 1
        req.num_preemptions += 1
        if self.cache_cfg.preemption_mode == PreemptionMode.SWAP and self.kv.swap_out(req):
            req.status = RequestStatus.SWAPPED
            self.swapped.appendleft(req)
            return
        # recompute (or the CPU pool is full): drop the KV; the request re-runs prompt + generated
        # tokens when it is readmitted (with prefix caching, mostly from the tree)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.compression_decided = False  # its prefill runs again: so does its compression
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
