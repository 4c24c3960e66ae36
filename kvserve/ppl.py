"""Perplexity through the engine's own KV cache (``kvserve ppl``).

The text is cut into windows of up to ``window`` tokens; each window is one request with
``prompt_logprobs=0``, so the engine returns the log-probability of every token after the first given
the ones before it. The engine should prefill in small chunks (``max_num_batched_tokens=64``): then
most of the keys and values a token attends to come from the cache (quantized, if it is), written
by earlier chunks, and not from the chunk's own fresh K/V. So the figure measures the cache.

    perplexity = exp(-(sum of log p(token | tokens before it in its window)) / tokens scored)

The default text, on every machine with Python: the standard library's ``pydoc_data.topics``
(~465 KB of English from the language reference), its topics in sorted order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvserve.sampling_params import SamplingParams


def corpus_text() -> str:
    """The documentation topics of Python's standard library, in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@dataclass
class PerplexityResult:
    perplexity: float
    num_tokens: int  # tokens scored (each window's first is not)
    num_windows: int
    nll: float  # mean negative log-likelihood per token, nats
    top1: list[int] = field(default_factory=list, repr=False)  # the most likely token at each scored position

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "num_tokens": self.num_tokens, "num_windows": self.num_windows,
                "nll": self.nll}


def windows(token_ids: list[int], window: int, max_tokens: int | None = None) -> list[list[int]]:
    """The first ``max_tokens`` tokens (all if None) cut into consecutive windows of ``window`` tokens;
    a last window shorter than 2 tokens is dropped (it has nothing to score)."""
    ids = token_ids[:max_tokens] if max_tokens is not None else token_ids
    return [w for i in range(0, len(ids), window) if len(w := ids[i : i + window]) >= 2]


def perplexity(llm, token_ids: list[int], window: int = 4096, max_tokens: int | None = None,
               top1: bool = False) -> PerplexityResult:
    """Perplexity of ``token_ids`` under ``llm`` (a ``kvserve.LLM``), window by window.

    ``top1`` also keeps each scored position's most likely token (for agreement between caches)."""
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1 if top1 else 0)
    chunks = windows(token_ids, window, max_tokens)
    if not chunks:
        raise ValueError("the text has fewer than 2 tokens: nothing to score")
    total, n, best = 0.0, 0, []
    outs = llm.generate([{"prompt_token_ids": w} for w in chunks], params, use_tqdm=False)
    for w, out in zip(chunks, outs):
        for tok, entry in zip(w[1:], out.prompt_logprobs[1:]):
            total += entry[tok]
            n += 1
            if top1:
                best.append(max(entry, key=entry.get))
    nll = -total / n
    return PerplexityResult(math.exp(nll), n, len(chunks), nll, best)
