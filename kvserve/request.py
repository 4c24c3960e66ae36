"""A request as the scheduler sees it, and what the user gets back.

The scheduler knows no "prefill phase": a request has ``num_tokens`` (prompt + generated so far)
and ``num_computed_tokens`` (how many of those have K/V in the cache). Each step it is given some
of the difference: a whole prompt, a chunk of one, or the single newest token (decode).
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from kvserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted, its KV blocks copied to the CPU pool
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    # prompt_logprobs: entry i for prompt token i (None for token 0, which nothing predicts)
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=lambda: [None])
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens found in the prefix cache at first scheduling
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str = ""  # detokenized output so far (stop strings cut)
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    swapped_blocks: int = 0  # blocks whose K/V sit in the CPU swap pool
    finished_time: float | None = None
    prefix_node: object | None = None  # the prefix-tree node this request locked (kv.prefix_cache.Node)
    num_blocks_in_tree: int = 0  # leading blocks already inserted into the prefix tree
    first_token_time: float | None = None
    parent_id: str | None = None  # set for the children of an n > 1 request
    index: int = 0  # which of the parent's n samples this is
    compression: object | None = None  # kv.compress.KVCompression: squeeze the KV cache after the prefill
    # its prefill has ended in this KV lifetime (compression ran or was not needed); a recompute resets it
    compression_decided: bool = False
    # after it: (tokens before, tokens kept, blocks returned) of the last compression
    kv_compression_stats: tuple[int, int, int] | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    # SamplingParams.prompt_logprobs: per prompt token, {its id: logprob, top-k ids: logprobs}; None first
    prompt_logprobs: list[dict[int, float] | None] | None = None
