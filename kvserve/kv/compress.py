"""Importance-based KV compression: after a request's prompt is prefilled, keep only its most useful
keys and values (the seeds' "compressed cache: keep the important tokens").

A press scores every cached token of every layer and KV head; each (layer, head) keeps its ``n``
best, where ``n = max(1, int(L * (1 - ratio)))`` for a prompt of L tokens (NVIDIA kvpress's count).
Methods, each the same arithmetic as kvpress's press of that name (tested against its indices):

    snapkv         the attention the prompt's last ``window_size`` queries pay each earlier key,
                   averaged over those queries, smoothed by a ``kernel_size`` average pool, averaged over
                   the query heads of each KV head; the window itself is always kept
    streaming_llm  position only: the first ``n_sink`` tokens and the most recent ones
    knorm          the keys with the *lowest* L2 norm (a large key norm goes with little attention)
    h2o            Heavy-Hitter Oracle, the one that keeps evicting while decoding: a budget of n tokens
                   per (layer, head), the last ``window_size`` (at most half the budget) always kept,
                   the rest the "heavy hitters" with the most attention accumulated so far. After the
                   prefill the prompt's last ``window_size`` queries give the first scores (summed,
                   not averaged); every decode step adds its query's attention; when the cache holds
                   a block more than the budget, each head evicts its block_size lowest-scoring
                   older tokens and a block goes back to the pool (evicting in blocks, not a token
                   per step, so a step packs at most once per block_size tokens)
    tova           the attention the last prompt token pays each key, averaged over all query heads
                   (every KV head keeps the same tokens); the last token is kept. The one extra method:
                   kvpress ranks it among its strong attention-based presses, and it needs no
                   statistics or training (its leaderboard is an image we could not read offline)

Packing (``pack``): every head keeps the same count, so each (layer, head) writes its kept rows, in
position order, into cache positions 0 .. n-1 of the request's own blocks, and the blocks past
ceil(n / block_size) go back to the pool. The block table and the decode kernels stay as they are:
they see a request of n tokens. Keys keep the RoPE of their original positions, so the request's
next tokens are rotated at their text positions while they are written at cache positions (the
manager's ``position_shift`` with ``rope_at_text``). Codes and scales of a quantized cache move together.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

METHODS = ("snapkv", "streaming_llm", "knorm", "tova", "h2o")
NEEDS_QUERIES = {"snapkv", "tova"}  # methods that score by attention: their last queries are captured


@dataclass(frozen=True)
class KVCompression:
    """What a request asks for: ``SamplingParams(kv_compression={"method": "snapkv", "ratio": 0.5})``,
    ``LLM(kv_compression="snapkv:0.5")``. ``ratio`` is the fraction of tokens removed (kvpress's
    ``compression_ratio``); 0 leaves the cache untouched."""

    method: str
    ratio: float
    window_size: int = 64  # snapkv: the observation window (queries)
    kernel_size: int = 5  # snapkv: the pooling kernel
    n_sink: int = 4  # streaming_llm: first tokens always kept

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"kv_compression method must be one of {list(METHODS)}, got {self.method!r}")
        if not 0 <= self.ratio < 1:
            raise ValueError(f"kv_compression ratio must be in [0, 1) (the fraction of tokens removed), got {self.ratio!r}")
        if self.window_size < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0 or self.n_sink < 0:
            raise ValueError("kv_compression: window_size >= 1, an odd kernel_size, n_sink >= 0")

    @staticmethod
    def parse(value) -> KVCompression | None:
        """None, a KVCompression, a dict ({"method": ..., "ratio": ..., options}) or "method:ratio"."""
        if value is None or isinstance(value, KVCompression):
            return value
        if isinstance(value, str):
            method, _, ratio = value.partition(":")
            try:
                return KVCompression(method.strip(), float(ratio) if ratio else 0.5)
            except ValueError as e:
                if "could not convert" in str(e):
                    raise ValueError(f"kv_compression: expected 'method:ratio' (e.g. 'snapkv:0.5'), got {value!r}") from None
                raise
        if isinstance(value, dict):
            unknown = set(value) - {"method", "ratio", "window_size", "kernel_size", "n_sink"}
            if unknown or "method" not in value:
                raise ValueError(f"kv_compression: a dict with 'method' and 'ratio' (and options), got {value!r}")
            return KVCompression(**{"ratio": 0.5, **value})
        raise ValueError(f"kv_compression: a dict, 'method:ratio' or None, got {type(value).__name__}")

    @property
    def query_window(self) -> int:
        """How many of the prompt's last queries the method reads (0: none)."""
        return {"snapkv": self.window_size, "h2o": self.window_size, "tova": 1}.get(self.method, 0)

    def recent(self, budget: int) -> int:
        """h2o: the most recent tokens always kept."""
        return min(self.window_size, budget // 2)

    def applies_to(self, length: int) -> bool:
        """Whether a prompt of ``length`` tokens is compressed at all: ratio > 0, and longer than what
        the method always keeps (snapkv's window, streaming_llm's sinks)."""
        floor = {"snapkv": self.window_size, "h2o": self.window_size, "streaming_llm": self.n_sink}.get(self.method, 0)
        return self.ratio > 0 and length > floor and n_kept(length, self.ratio) < length


def n_kept(length: int, ratio: float) -> int:
    return max(1, int(length * (1 - ratio)))


def scores(c: KVCompression, keys: torch.Tensor, queries: torch.Tensor | None) -> torch.Tensor:
    """One layer's scores [Hkv, L] (higher = keep) from its cached keys [Hkv, L, D] (RoPE applied) and,
    for the attention methods, the prompt's last queries [Hq, W, D] (RoPE applied)."""
    H, L, D = keys.shape
    if c.method == "knorm":
        return -torch.linalg.vector_norm(keys.float(), dim=-1)
    if c.method == "streaming_llm":
        s = torch.ones(H, L)
        pruned = L - n_kept(L, c.ratio)
        s[:, c.n_sink : c.n_sink + pruned] = 0
        return s
    Hq, W, _ = queries.shape
    G = Hq // H
    # each KV head's G query heads as one [G*W, D] matrix against its keys (no repeated copy of the keys);
    # in the model's dtype, as kvpress computes it (the softmax in fp32). The 1/sqrt(D) goes on the
    # queries, not on the [W, L] product: for head_dim 64 (or any power of 4) dividing by sqrt(D) is
    # exact either way, so the scores are kvpress's to the bit
    q = (queries / math.sqrt(D)).reshape(H, G * W, D)
    w = (q @ keys.to(queries.dtype).transpose(1, 2)).view(Hq, W, L)
    # the window's queries sit at positions L-W .. L-1: query i sees keys up to L-W+i (the only keys
    # any of them must not see are the window's own later ones)
    w[..., L - W :].masked_fill_(_future(W, w.device), float("-inf"))
    # fp32 weights from here on (kvpress rounds them to the model dtype: the same in an fp32 model, where
    # the indices are tested against its own; in bf16 this keeps more precision and skips two copies)
    w = w.softmax(dim=-1, dtype=torch.float32)
    if c.method == "h2o":  # accumulated (summed) attention of the window's queries, per KV head
        return w.sum(dim=1).view(H, G, L).mean(1)
    if c.method == "tova":  # the last query's attention, averaged over all query heads: one ranking for every head
        s = w[:, -1, : L - 1].mean(0).expand(H, L - 1)
        return F.pad(s, (0, 1), value=s.max().item() + 1)  # the last token is always kept
    s = w[..., : L - W].mean(dim=1)  # [Hq, L-W]
    s = F.avg_pool1d(s, kernel_size=c.kernel_size, padding=c.kernel_size // 2, stride=1)
    s = s.view(H, G, L - W).mean(1)
    return F.pad(s, (0, W), value=s.max().item() + 1)  # the window is always kept


@functools.lru_cache(maxsize=8)
def _future(W: int, device: torch.device) -> torch.Tensor:
    """[W, W] True where the window's query i must not see the window's key j: j > i."""
    return torch.ones(W, W, dtype=torch.bool, device=device).triu(1)


def select(s: torch.Tensor, n: int, recent: int = 0) -> torch.Tensor:
    """The ``n`` best-scoring positions per head, in position order: [Hkv, n]; the last ``recent``
    positions are always among them."""
    if recent:
        s = s.clone()
        s[:, s.shape[1] - recent :] = float("inf")
    return s.topk(n, dim=-1).indices.sort(dim=-1).values


def attention(keys: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """One decode query's attention over its cache, averaged over each KV head's query heads: q
    [Hq, D], keys [Hkv, L, D] -> [Hkv, L] (h2o's running score adds this every step)."""
    H, L, D = keys.shape
    G = q.shape[0] // H
    w = (q.float().view(H, G, D) @ keys.float().transpose(1, 2) / math.sqrt(D)).softmax(dim=-1)  # [H, G, L]
    return w.mean(1)


def pack(kv, layers: list[int], table: list[int], keep: torch.Tensor) -> None:
    """Move each (layer, head)'s kept positions ``keep[layer index, head, j]`` to cache position j of the
    request's blocks ``table`` (ascending, so a row never lands on one not yet read: all reads happen
    first anyway). Every tensor of the cache (K, V, and a quantized cache's scales) moves alike."""
    from kvserve.kv.storage import _raw

    bs = kv.block_size
    t = torch.as_tensor(table, dtype=torch.long)
    n = keep.shape[-1]
    slot = lambda p: t[p // bs] * bs + p % bs  # noqa: E731
    src = slot(keep)  # [layers, H, n]
    dst = slot(torch.arange(n))[None, None, :]
    lidx = torch.as_tensor([kv.layer_index[i] for i in layers])[:, None, None]
    hidx = torch.arange(keep.shape[1])[None, :, None]
    dev = kv.device
    src, dst, lidx, hidx = src.to(dev), dst.to(dev), lidx.to(dev), hidx.to(dev)
    for tensor in kv.tensors:
        raw = _raw(tensor)
        raw[lidx, dst, hidx] = raw[lidx, src, hidx]  # the right side is a gathered copy: no overlap issue
