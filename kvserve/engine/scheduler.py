"""Continuous batching with one token budget (vLLM v1's scheduler, in small).

Each step:
  1. running requests first, oldest first: each gets what it still lacks (1 token for a decode, the
     rest of its prompt, capped by the budget: that is chunked prefill). If the pool has no room,
     the newest running request is preempted (recompute: drop its KV and re-queue it; swap: copy
     its blocks to a CPU pool and bring them back later).
  2. then, if nobody was preempted, swapped-out requests come back, then waiting ones are admitted
     while there are budget, sequence slots and blocks.

With ``kv_cache="off"`` every request drops its KV after each step, so the next step recomputes the
whole sequence: the no-cache reference, through the same code.
"""
from __future__ import annotations

from collections import deque

import torch

from kvserve.config import CacheConfig, SchedulerConfig
from kvserve.engine.batch import ScheduledRequest, SchedulerOutput
from kvserve.kv.manager import KVCacheManager
from kvserve.kv.storage import KVCache
from kvserve.request import Request, RequestStatus


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, cache_cfg: CacheConfig, kv_manager: KVCacheManager, kv_cache: KVCache):
        self.cfg, self.cache_cfg = cfg, cache_cfg
        self.kv = kv_manager
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()
        self._swap_store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # request id -> CPU copies of K, V
        self.swap_bytes_used = 0
        self.num_preemptions = 0
        self.num_swapped_blocks = 0  # blocks currently held in the CPU pool

    # ------------------------------------------------------------------ queue
    def add_request(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

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
            self._drop_swap(req)
        self.kv.free(req)

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.cfg.max_num_batched_tokens

        # 1. running requests
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while self.kv.allocate_slots(req, n) is None:
                victim = self.running.pop()  # the newest
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, n))
                budget -= n
                i += 1

        if out.preempted:
            return out  # memory is short: admit nobody new this step

        # 2. swapped-out requests come back first, then waiting ones
        while self.swapped and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            req = self.swapped[0]
            if not self._swap_in(req):
                break
            self.swapped.popleft()
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if self.kv.allocate_slots(req, n) is None:
                self.running.append(req)  # scheduled next step
                break
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
        if self.swapped:
            return out

        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            if not req.block_ids and req.num_computed_tokens == 0:
                blocks, num_hit = self.kv.get_computed_blocks(req)
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = num_hit
                req.block_ids, req.num_computed_tokens = blocks, num_hit
            n = req.num_tokens - req.num_computed_tokens
            if n > budget and not self.cfg.enable_chunked_prefill:
                break
            n = min(n, budget)
            if self.kv.allocate_slots(req, n) is None:
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
        return out

    def after_step(self, out: SchedulerOutput) -> None:
        """Advance each scheduled request past the tokens it just computed."""
        for s in out.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
            self.kv.cache_blocks(s.request)
            if self.cache_cfg.kv_cache == "off" and not s.request.is_finished:
                # No cache: forget everything; the next step recomputes the whole sequence.
                self.kv.free(s.request)
                s.request.num_computed_tokens = 0

    # ------------------------------------------------------------------ preemption
    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.num_preemptions += 1
        req.num_preemptions += 1
        out.preempted.append(req)
        if self.cache_cfg.preemption_mode == "swap" and self._swap_out(req):
            return
        # recompute: drop the KV; the request re-runs prompt + generated tokens when it is readmitted
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def _swap_out(self, req: Request) -> bool:
        nbytes = len(req.block_ids) * self.kv_cache.spec.block_bytes(self.kv_cache.block_size)
        if self.swap_bytes_used + nbytes > self.cache_cfg.swap_space:
            return False  # CPU pool full: fall back to recompute
        self._swap_store[req.request_id] = self.kv_cache.copy_out(req.block_ids)
        self.swap_bytes_used += nbytes
        self.num_swapped_blocks += len(req.block_ids)
        req.swapped_blocks = len(req.block_ids)
        self.kv.free(req)
        req.status = RequestStatus.SWAPPED
        self.swapped.appendleft(req)
        return True

    def _swap_in(self, req: Request) -> bool:
        n_blocks = req.swapped_blocks
        if n_blocks > self.kv.pool.num_free:
            return False
        req.block_ids = self.kv.pool.allocate(n_blocks)
        k, v = self._swap_store[req.request_id]
        self.kv_cache.copy_in(req.block_ids, k, v)
        self._drop_swap(req)
        req.status = RequestStatus.RUNNING
        return True

    def _drop_swap(self, req: Request) -> None:
        if self._swap_store.pop(req.request_id, None) is not None:
            self.swap_bytes_used -= req.swapped_blocks * self.kv_cache.spec.block_bytes(self.kv_cache.block_size)
            self.num_swapped_blocks -= req.swapped_blocks
            req.swapped_blocks = 0
