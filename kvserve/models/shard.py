"""Tensor-parallel sharding of a decoder's weights (Megatron-style), one rank's slice at a time.

With N ranks, rank r holds:

- attention: its ``num_heads / N`` query heads and their KV heads, so **its KV cache holds only those
  heads** (the seeds' distributed point: the cache is split with the heads). q/k/v are column-parallel
  (rows of the fused ``qkv_proj``), ``o_proj`` row-parallel (its columns for those heads); the partial
  outputs of the ranks are summed by an all-reduce. When N exceeds the KV heads (Gemma 3 has one), a KV
  head is replicated on the N / num_kv_heads ranks whose query heads use it, as vLLM does.
- MLP: ``intermediate_size / N`` of the gate/up rows (column-parallel) and the same columns of
  ``down_proj`` (row-parallel), then an all-reduce. A MoE layer shards **every expert by its width**,
  not experts across ranks: each rank runs the same router on the same tokens, so every rank does the
  same share of the work however the tokens route, and no all-to-all is needed (docs/moe.md).
- replicated: the embedding, the LM head, the norms and the router. The vocabulary could be split too,
  but for the models here the LM head is a few percent of the weights, and replicating it means rank 0
  computes the logits alone and samples, with no all-gather of [tokens, vocab] each step.

Refused, with the reason: N that divides neither the query heads, nor (or by) the KV heads, nor the
MLP width; OLMoE's QK-norm over the whole q/k rows (a norm across ranks would need its own all-reduce).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from kvserve.config import ModelConfig
from kvserve.models.moe import experts_of


_NORMS = ("input_norm", "post_attn_norm", "q_norm", "k_norm", "attn_out_norm", "mlp_out_norm")
_KNOWN = {*_NORMS, "router", "shared_expert_gate", "o_proj", "o_proj.bias", "gate_up_proj", "gate_proj", "up_proj",
          "down_proj", *(f"{x}_proj{b}" for x in ("q", "k", "v", "qkv") for b in ("", ".bias"))}


def check_tp(cfg: ModelConfig, n: int) -> None:
    """Raise ValueError when ``cfg`` cannot be split over ``n`` ranks."""
    if n < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {n}")
    if n == 1:
        return
    Hq, Hkv = cfg.num_heads, cfg.num_kv_heads
    why = []
    if Hq % n:
        why.append(f"its {Hq} query heads do not divide by {n}")
    if Hkv % n and n % Hkv:
        why.append(f"its {Hkv} KV heads neither divide by {n} nor divide {n} (replicated KV heads)")
    widths = {"intermediate_size": cfg.intermediate_size} if len(cfg.dense_layers) or not cfg.num_experts else {}
    if cfg.num_experts:
        widths["expert width"] = cfg.expert_size
        if cfg.shared_expert_intermediate_size:
            widths["shared expert width"] = cfg.shared_expert_intermediate_size
    why += [f"its {name} {w} does not divide by {n}" for name, w in widths.items() if w % n]
    if cfg.qk_norm and cfg.qk_norm_over == "all":
        why.append("its QK-norm runs over whole q/k rows (OLMoE), which tensor parallelism would split")
    if why:
        valid = [k for k in range(2, Hq + 1) if not Hq % k and (not Hkv % k or not k % Hkv)
                 and all(not w % k for w in widths.values())]
        raise ValueError(f"tensor_parallel_size={n} cannot split {cfg.name}: " + "; ".join(why)
                         + f". Sizes that work: {', '.join(map(str, valid)) or 'none above 1'}")


def shard_config(cfg: ModelConfig, rank: int, n: int) -> ModelConfig:
    """The shape of one rank's slice of the model: its heads and MLP width."""
    if n == 1:
        return cfg
    return replace(
        cfg, num_heads=cfg.num_heads // n, num_kv_heads=max(1, cfg.num_kv_heads // n),
        # a MoE model without dense layers may carry an intermediate_size it never uses (check_tp skips it)
        intermediate_size=cfg.intermediate_size // n if not cfg.intermediate_size % n else cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size // n if cfg.moe_intermediate_size else None,
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size // n)


def _kv_heads(cfg: ModelConfig, rank: int, n: int) -> range:
    """The KV heads rank ``rank`` holds: a 1/n share, or (n > num_kv_heads) the one its query heads use."""
    Hkv = cfg.num_kv_heads
    if Hkv >= n:
        per = Hkv // n
        return range(rank * per, (rank + 1) * per)
    return range(rank * Hkv // n, rank * Hkv // n + 1)


def _heads(t: torch.Tensor, heads: range, D: int) -> torch.Tensor:
    return t[heads.start * D : heads.stop * D]


def _part(t: torch.Tensor, rank: int, n: int, dim: int = 0) -> torch.Tensor:
    """Rank ``rank``'s 1/n slice of ``t`` along ``dim``."""
    size = t.shape[dim] // n
    return t.narrow(dim, rank * size, size).contiguous()


def _gate_up(t: torch.Tensor, rank: int, n: int, dim: int = 0) -> torch.Tensor:
    """A fused [gate; up] tensor: the rank's slice of each half, fused again."""
    gate, up = t.chunk(2, dim)
    return torch.cat((_part(gate, rank, n, dim), _part(up, rank, n, dim)), dim)


def shard_weights(weights: dict[str, torch.Tensor], cfg: ModelConfig, rank: int, n: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s weights (the names the decoder reads), from the full checkpoint's."""
    if n == 1:
        return weights
    D = cfg.head_dim
    q_heads = range(rank * cfg.num_heads // n, (rank + 1) * cfg.num_heads // n)
    kv_heads = _kv_heads(cfg, rank, n)
    out: dict[str, torch.Tensor] = {}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        layer = {k[len(p):]: v for k, v in weights.items() if k.startswith(p)}
        for suffix in ("", ".bias"):  # q/k/v: the rank's heads' rows (fused or not)
            if "qkv_proj" + suffix in layer:
                q, k, v = layer["qkv_proj" + suffix].split([cfg.q_size, cfg.kv_size, cfg.kv_size])
            elif "q_proj" + suffix in layer:
                q, k, v = (layer[f"{x}_proj{suffix}"] for x in "qkv")
            else:
                continue
            out[p + "qkv_proj" + suffix] = torch.cat((_heads(q, q_heads, D), _heads(k, kv_heads, D), _heads(v, kv_heads, D)))
        out[p + "o_proj"] = layer["o_proj"][:, q_heads.start * D : q_heads.stop * D].contiguous()
        if "o_proj.bias" in layer and rank == 0:  # added once, by rank 0, before the all-reduce sums the ranks
            out[p + "o_proj.bias"] = layer["o_proj.bias"]
        if cfg.is_moe(i):
            gate_up, down = experts_of(weights, p, cfg.num_experts)
            out[p + "experts.gate_up_proj"] = torch.stack([_gate_up(t, rank, n) for t in gate_up])
            out[p + "experts.down_proj"] = torch.stack([_part(t, rank, n, 1) for t in down])
            out[p + "router"] = layer["router"]
            if cfg.shared_expert_intermediate_size:
                sp = "shared_expert."
                gu = layer.get(sp + "gate_up_proj")
                if gu is None:
                    gu = torch.cat((layer[sp + "gate_proj"], layer[sp + "up_proj"]))
                out[p + sp + "gate_up_proj"] = _gate_up(gu, rank, n)
                out[p + sp + "down_proj"] = _part(layer[sp + "down_proj"], rank, n, 1)
                if "shared_expert_gate" in layer:
                    out[p + "shared_expert_gate"] = layer["shared_expert_gate"]
        else:
            gu = layer.get("gate_up_proj")
            if gu is None:
                gu = torch.cat((layer["gate_proj"], layer["up_proj"]))
            out[p + "gate_up_proj"] = _gate_up(gu, rank, n)
            out[p + "down_proj"] = _part(layer["down_proj"], rank, n, 1)
        for name in _NORMS:
            if name in layer:
                out[p + name] = layer[name]
        unknown = [k for k in layer if k not in _KNOWN and not k.startswith(("experts.", "shared_expert."))]
        if unknown:  # a tensor this module does not know how to split: better refused than dropped
            raise ValueError(f"tensor parallelism: do not know how to shard {p}{unknown[0]}")
    out.update({k: v for k, v in weights.items() if not k.startswith("layers.")})  # embed, norm, lm_head
    return out


def load_model(src, dtype: torch.dtype, device: torch.device, quantization: str | None, max_positions: int,
               rank: int = 0, world: int = 1):
    """(the full model's config, this rank's Decoder): load the checkpoint, keep rank ``rank``'s slice."""
    from kvserve.models.decoder import Decoder
    from kvserve.models.loader import load_weights

    cfg, weights = load_weights(src, dtype)
    check_tp(cfg, world)
    weights = shard_weights(weights, cfg, rank, world)
    model = Decoder(shard_config(cfg, rank, world), weights, dtype, device, quantization,
                    max_positions=max_positions, tensor_parallel=world > 1)
    return cfg, model
