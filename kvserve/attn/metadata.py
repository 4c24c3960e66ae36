"""What the model needs to run one step's attention: the flat batch and, per KV cache group, where
each token's K/V goes and which cached keys each query sees."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SeqSpan:
    """One request's part of a step, as attention sees it: tokens ``start .. start + num_new - 1`` are
    computed now, after ``start`` tokens already in the cache."""

    start: int
    num_new: int
    block_tables: list[np.ndarray]  # per KV cache group: the blocks holding tokens 0 .. start + num_new - 1

    @property
    def end(self) -> int:
        return self.start + self.num_new


@dataclass
class AttnGroup:
    """Queries that one attention call serves: either one request's prompt chunk, or all the
    single-token decodes of the step batched together.

    Masks for a chunk of n queries at positions c..c+n-1 over L = c+n cached keys (x = visible):

        keys ->   0 1 2 3 4 5          (c = 3, n = 3)
        query c   x x x x . .
        query c+1 x x x x x .
        query c+2 x x x x x x

    Under a sliding window of W positions query p also drops keys 0 .. p - W (W = 3 above: query c+2,
    at position 5, sees keys 3, 4, 5).
    """

    q_rows: torch.Tensor | slice  # rows of the flat [T] batch this group owns
    batch: int  # B: requests in the group
    q_len: int  # Q: queries per request (1 for the decode group)
    kv_read: slice | tuple[torch.Tensor, int]  # slots (a view) or (block table [B, n], width) to gather; see KVCache.read
    mask: torch.Tensor | None = None  # [B, 1, Q, L'] bool (True = attend), L' = keys read; None = all
    lens: torch.Tensor | None = None  # [B] decode groups read through a block table: keys each request sees
    begins: torch.Tensor | None = None  # [B] with lens, under a sliding window: the first key each one sees
    is_causal: bool = False  # a whole prompt at once: plain causal mask, no tensor needed


@dataclass
class AttnMetadata:
    """One KV cache group's view of the step (built by ``AttentionBackend.prepare``)."""

    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written in this group's blocks
    groups: list[AttnGroup]


@dataclass
class ForwardBatch:
    """The flat batch the model runs: every request's new tokens, concatenated."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] absolute positions (RoPE)
    logits_idx: torch.Tensor  # [S] rows whose hidden state becomes logits (requests that sample)
    attn: list[AttnMetadata]  # per KV cache group

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]
