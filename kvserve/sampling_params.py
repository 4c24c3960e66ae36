"""SamplingParams, in vLLM's shape."""
from __future__ import annotations

from dataclasses import dataclass, field

from kvserve.kv.compress import KVCompression


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    ``temperature=0`` is greedy. ``seed`` gives a request its own random stream, so its tokens do not
    depend on what else runs in the batch. ``logprobs=k`` returns the k most likely tokens at each
    step (and the sampled one). ``prompt_logprobs=k`` returns, for each prompt token after the first,
    its log-probability given the tokens before it (and the k most likely tokens there): what
    perplexity and log-likelihood evaluations need. Such a request computes its whole prompt (the
    prefix cache holds K/V, not logits), as vLLM does. Stop strings are cut from the text, as in vLLM.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # when a request does not fit max_model_len (the full cache policy): "error" refuses a prompt that
    # long and stops generation at the context ("length"); "truncate" keeps the prompt's last tokens
    # (leaving room for max_tokens, at most half the context); "shift" is llama.cpp's context shift:
    # keep the first num_sink_tokens, drop the older half of the rest, re-rotate, continue
    context_overflow: str = "error"
    # compress this request's KV cache once its prompt is prefilled (kv.compress): {"method": "snapkv",
    # "ratio": 0.5}, "snapkv:0.5", or a KVCompression; None: the engine's default (LLM(kv_compression=...))
    kv_compression: KVCompression | dict | str | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        if self.n < 1:
            raise bad("n", "must be at least 1")
        if self.temperature < 0:
            raise bad("temperature", "must be non-negative")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < -1:
            raise bad("top_k", "must be -1 (disable), 0 (disable) or at least 1")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be greater than zero")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", "must be at least 1")
        if self.min_tokens < 0:
            raise bad("min_tokens", "must be non-negative")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be at most max_tokens ({self.max_tokens})")
        if self.logprobs is not None and self.logprobs < 0:
            raise bad("logprobs", "must be non-negative")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise bad("prompt_logprobs", "must be non-negative")
        if self.context_overflow not in ("error", "truncate", "shift"):
            raise bad("context_overflow", "must be 'error', 'truncate' or 'shift'")
        self.kv_compression = KVCompression.parse(self.kv_compression)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
