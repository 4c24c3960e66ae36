"""What one engine step hands from the scheduler to the model runner: a plain plan.

Only ids, ints and lists, no live ``Request`` objects, so a plan can be sent as it is to another
process (a tensor-parallel worker runs exactly this); ``dataclasses.asdict`` gives its JSON form.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ScheduledSeq:
    """One request's part of a step."""

    request_id: str
    token_ids: list[int]  # the tokens whose K/V this step computes (a prompt chunk, or 1 for decode)
    start: int  # position of the first of them = tokens already in the cache
    block_tables: list[list[int]]  # per KV cache group: the request's blocks, in token order
    sample: bool  # the step reaches the end of the known tokens, so a token is sampled
    all_logits: bool = False  # every row gives logits, not only a sampling last one (prompt_logprobs)
    position_offset: int = 0  # sink_window: text position - cache position (tokens dropped from the middle)
    rope_at_text: bool = False  # KV compression: new tokens rotate at their text positions, not cache ones
    # KV compression: keep the queries of the prompt's last window (first text position, size) for scoring
    capture: tuple[int, int] | None = None
    compress: object | None = None  # KV compression (kv.compress.KVCompression) to run after this step
    observe: object | None = None  # h2o while decoding: add this step's attention to the scores, evict

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)  # ids of the requests preempted this step
    # sink_window / context shift: (group, block ids, delta) whose cached keys move down delta positions
    # before the forward
    position_shifts: list[tuple[int, list[int], int]] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    def __bool__(self) -> bool:
        return bool(self.seqs)
