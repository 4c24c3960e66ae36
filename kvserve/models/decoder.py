"""One decoder for the Llama family, Gemma 3 and mixture-of-experts models: RMSNorm, RoPE, GQA/MQA
attention, a gated MLP, tied embeddings. Gemma 3 differs in a few switches of ``ModelConfig`` (QK-norm,
norms after attention and MLP too, GeLU-tanh, scaled embeddings, sliding-window layers with their own
RoPE base); the sliding window itself is the KV cache's and the attention backend's business
(``kv.spec``, ``attn``). MoE models (Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE) swap a layer's MLP for a
router over experts (``moe.py``); nothing else changes.

``forward`` takes a ForwardBatch (a flat list of new tokens from any number of requests, prompt
chunks and decodes mixed) and the attention backend, which owns the KV cache; the same code runs
prefill and decode, and the model never sees how the cache is laid out.
Q/K/V and gate/up are fused into one matmul each: fewer, larger ops per layer.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kvserve.attn import AttentionBackend, ForwardBatch
from kvserve.config import ModelConfig
from kvserve.models.layers import (Linear, Rotary, add_rms_norm, apply_rotary, gelu_tanh_and_mul, rms_norm,
                                   silu_and_mul)
from kvserve.models.moe import MoE, experts_of


@dataclass
class DecoderLayer:
    input_norm: torch.Tensor
    qkv_proj: Linear  # [q_size + 2 * kv_size, hidden], with the q/k/v biases when cfg.attention_bias
    o_proj: Linear
    post_attn_norm: torch.Tensor
    gate_up_proj: Linear | None  # [2 * intermediate, hidden]; None in a MoE layer
    down_proj: Linear | None
    moe: MoE | None = None  # a MoE layer's MLP
    # Gemma 3: RMSNorm of each head's q and k [head_dim], and of the attention / MLP outputs [hidden]
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    attn_out_norm: torch.Tensor | None = None
    mlp_out_norm: torch.Tensor | None = None


class Decoder:
    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        quantization: str | None = None,
        max_positions: int | None = None,
        tensor_parallel: bool = False,
    ):
        # cfg is this rank's slice under tensor parallelism (models.shard): its heads and MLP width; the
        # partial outputs of o_proj and of the MLP are then summed over the ranks (an all-reduce each)
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.tensor_parallel = tensor_parallel
        dev = lambda t: t.to(self.device)  # noqa: E731
        lin = lambda w, q=quantization, bias=None: Linear(w.to(self.device), q, bias)  # noqa: E731
        # w8a8-channel leaves down_proj unquantized: its input (SiLU(gate) * up) has the widest outliers, and
        # quantizing it too drops agreement with fp32 from 338 to 319 of 360 teacher-forced tokens
        down_q = None if quantization == "w8a8-channel" else quantization
        self.layers: list[DecoderLayer] = []
        for i in range(cfg.num_layers):
            w = lambda name: weights[f"layers.{i}.{name}"]  # noqa: E731

            def fused(name: str, parts: tuple[str, ...]) -> torch.Tensor:
                # The loader may hand a fused tensor over (the GGUF path does: its disk cache holds it
                # fused, so a load maps it instead of copying); else concatenate the parts here.
                key = f"layers.{i}.{name}"
                if key in weights:
                    return weights[key]
                missing = [p for p in parts if f"layers.{i}.{p}" not in weights]
                if missing:
                    raise ValueError(f"layer {i} of the checkpoint has neither {name} nor {missing}")
                return torch.cat([w(p) for p in parts])

            mlp: dict = {}
            if cfg.is_moe(i):
                gate_up, down = experts_of(weights, f"layers.{i}.", cfg.num_experts)
                shared = {}
                if cfg.shared_expert_intermediate_size:
                    shared = dict(shared_gate_up=lin(fused("shared_expert.gate_up_proj",
                                                           ("shared_expert.gate_proj", "shared_expert.up_proj"))),
                                  shared_down=lin(w("shared_expert.down_proj"), down_q),
                                  shared_gate=dev(w("shared_expert_gate").reshape(-1)) if cfg.shared_expert_gate else None)
                mlp["moe"] = MoE(router=dev(w("router").float()), gate_up=[lin(t) for t in gate_up],
                                 down=[lin(t, down_q) for t in down], top_k=cfg.num_experts_per_tok,
                                 norm_topk_prob=cfg.norm_topk_prob, router_act=cfg.router_act,
                                 act_and_mul=silu_and_mul, **shared)
                mlp["gate_up_proj"] = mlp["down_proj"] = None
            else:
                mlp["gate_up_proj"] = lin(fused("gate_up_proj", ("gate_proj", "up_proj")))
                mlp["down_proj"] = lin(w("down_proj"), down_q)
            qkv_bias = None
            if cfg.attention_bias:  # Qwen2: q, k and v each add a bias; fused like their weights
                qkv_bias = fused("qkv_proj.bias", ("q_proj.bias", "k_proj.bias", "v_proj.bias"))
            self.layers.append(
                DecoderLayer(
                    input_norm=dev(w("input_norm")),
                    qkv_proj=lin(fused("qkv_proj", ("q_proj", "k_proj", "v_proj")), bias=qkv_bias),
                    o_proj=lin(w("o_proj"), bias=weights.get(f"layers.{i}.o_proj.bias")),  # Llama attention_bias
                    post_attn_norm=dev(w("post_attn_norm")),
                    **mlp,
                    **{n: dev(w(n)) for n in ("q_norm", "k_norm") if cfg.qk_norm},
                    **{n: dev(w(n)) for n in ("attn_out_norm", "mlp_out_norm") if cfg.sandwich_norms},
                )
            )
        self.embed = dev(weights["embed"])
        self.norm = dev(weights["norm"])
        # int4 layers, int8 LM head: a GGUF keeps its output/embedding matrix at 8 bits (Q8_0) too. w8a8
        # layers, int8 (weight-only) head: the logits decide the token, and vLLM's W8A8 leaves lm_head out too
        self.lm_head = lin(weights["lm_head"] if "lm_head" in weights else weights["embed"],
                           "int8" if quantization in ("int4", "w8a8") else quantization)
        n_pos = max_positions or cfg.max_position_embeddings
        rotary = Rotary(cfg.head_dim, cfg.rope_theta, n_pos, dtype, self.device)
        local = rotary
        if cfg.rope_local_theta is not None and cfg.rope_local_theta != cfg.rope_theta:
            local = Rotary(cfg.head_dim, cfg.rope_local_theta, n_pos, dtype, self.device)
        self.rotary = [local if cfg.is_sliding(i) else rotary for i in range(cfg.num_layers)]  # per layer
        self.act_and_mul = gelu_tanh_and_mul if cfg.hidden_act == "gelu_tanh" else silu_and_mul
        # HF multiplies by sqrt(hidden) rounded to the model dtype
        self.embed_scale = torch.tensor(cfg.hidden_size ** 0.5, dtype=dtype) if cfg.scale_embeddings else None

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        """Hidden states of the rows in ``batch.logits_idx``: [S, hidden]."""
        cfg = self.cfg
        T = batch.num_tokens
        h = self.embed[batch.input_ids]  # [T, hidden]: the residual stream
        if self.embed_scale is not None:
            h = h * self.embed_scale
        qk_size = cfg.q_size + cfg.kv_size
        eps = cfg.rms_norm_eps
        mlp_out = None
        for i, layer in enumerate(self.layers):
            # each sublayer's residual add is fused with the norm that follows it
            if mlp_out is None:
                x = rms_norm(h, layer.input_norm, eps)
            else:
                x = add_rms_norm(h, mlp_out, layer.input_norm, eps)
            qkv = layer.qkv_proj(x)
            # q and k sit side by side in qkv: rotate them as one [T, Hq + Hkv, D] tensor (half the ops)
            qk = qkv[:, :qk_size].view(T, -1, cfg.head_dim)
            if layer.q_norm is not None and cfg.qk_norm_over == "all":  # OLMoE: the whole q and k rows
                qk = torch.cat((rms_norm(qkv[:, : cfg.q_size], layer.q_norm, eps),
                                rms_norm(qkv[:, cfg.q_size : qk_size], layer.k_norm, eps)), dim=1).view(T, -1, cfg.head_dim)
            elif layer.q_norm is not None:  # QK-norm: each head's q and k normalized before RoPE
                D, H = cfg.head_dim, cfg.num_heads
                qk = torch.cat((rms_norm(qk[:, :H].reshape(-1, D), layer.q_norm, eps).view(T, H, D),
                                rms_norm(qk[:, H:].reshape(-1, D), layer.k_norm, eps).view(T, -1, D)), dim=1)
            qk = self.rotary[i].rotate_(qk, batch.positions)
            q, k = qk[:, : cfg.num_heads], qk[:, cfg.num_heads :]
            v = qkv[:, qk_size:].view(T, cfg.num_kv_heads, cfg.head_dim)
            o = attn.forward(q, k, v, i, batch.attn)
            attn_out = self._reduce(layer.o_proj(o.reshape(T, cfg.q_size)))
            if layer.attn_out_norm is not None:
                attn_out = rms_norm(attn_out, layer.attn_out_norm, eps)
            x = add_rms_norm(h, attn_out, layer.post_attn_norm, eps)
            if layer.moe is not None:
                mlp_out = layer.moe(x)
            else:
                mlp_out = layer.down_proj(self.act_and_mul(layer.gate_up_proj(x)))
            mlp_out = self._reduce(mlp_out)
            if layer.mlp_out_norm is not None:
                mlp_out = rms_norm(mlp_out, layer.mlp_out_norm, eps)
        h = h + mlp_out
        # Only rows that sample need the final norm and the (large) LM head.
        return rms_norm(h[batch.logits_idx], self.norm, cfg.rms_norm_eps)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor parallelism: sum a row-parallel layer's partial outputs over the ranks (in place)."""
        if self.tensor_parallel:
            dist.all_reduce(x)
        return x

    @torch.inference_mode()
    def shift_keys(self, kv, block_ids: list[int], delta: int, layers: Sequence[int] | None = None) -> None:
        """Re-rotate the cached keys of ``block_ids`` in ``layers`` (default: all; a KV cache group's
        blocks hold only its own layers) from position p to p - delta: RoPE by -delta, with each layer's
        own base, on top of what they carry (rotations add), so they equal keys computed at p - delta."""
        ids = torch.as_tensor(block_ids, dtype=torch.long, device=kv.device)
        for i in range(self.cfg.num_layers) if layers is None else layers:
            rot = self.rotary[i]
            cos, sin = rot.cos[delta], -rot.sin[delta]  # the rotation by -delta
            k = kv.blocks(i)[0]  # [num_blocks, block_size, Hkv, D]
            k[ids] = apply_rotary(k[ids].float(), cos.float(), sin.float()).to(k.dtype)  # fp32: rounds once

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, hidden] -> [S, vocab] in fp32 (sampling wants full precision). An int8 head (the int4 and
        int8 settings) at 1-2 rows returns its fp32 sums: in bf16, logits near 20 are 0.125 apart, and
        SmolLM2's first answer token to "What is the capital of France?" tied 'The' with 'L' (fp32: -1.883
        vs -1.965 log-probability), and the tie went to 'L'."""
        return self.lm_head(hidden, float_out=True).float()
