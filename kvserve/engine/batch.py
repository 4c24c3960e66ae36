"""What one engine step hands from the scheduler to the runner, and from the runner to the model."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvserve.request import Request


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens whose K/V this step computes (a prompt chunk, or 1 for decode)

    @property
    def samples(self) -> bool:
        """A token is sampled only when this step reaches the end of the known tokens; a prompt chunk
        that stops short of the end produces nothing."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


@dataclass
class AttnGroup:
    """Queries that one attention call serves: either one request's prompt chunk, or all the
    single-token decodes of the step batched together.

    Masks for a chunk of n queries at positions c..c+n-1 over L = c+n cached keys (x = visible):

        keys ->   0 1 2 3 4 5          (c = 3, n = 3)
        query c   x x x x . .
        query c+1 x x x x x .
        query c+2 x x x x x x
    """

    q_rows: torch.Tensor | slice  # rows of the flat [T] batch this group owns
    batch: int  # B: requests in the group
    q_len: int  # Q: queries per request (1 for the decode group)
    kv_read: slice | tuple[torch.Tensor, int]  # slots (a view) or (block table [B, n], width) to gather; see KVCache.read
    mask: torch.Tensor | None = None  # [B, 1, Q, L'] bool (True = attend), L' = keys read; None = all
    lens: torch.Tensor | None = None  # [B] decode groups read through a block table: keys each request sees
    is_causal: bool = False  # a whole prompt at once: plain causal mask, no tensor needed


@dataclass
class ForwardBatch:
    """The flat batch the model runs: every request's new tokens, concatenated."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] absolute positions (RoPE)
    slot_mapping: torch.Tensor  # [T] where each token's K/V is written
    groups: list[AttnGroup]
    logits_idx: torch.Tensor  # [S] rows whose hidden state becomes logits (requests that sample)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]
