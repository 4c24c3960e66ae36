"""A sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE): a router picks k of E SwiGLU
experts per token, and the token's output is the router-weighted sum of theirs.

Grouped expert compute: the step's (token, expert) pairs are sorted by expert, so each expert's tokens
form one contiguous slice, and each expert that got any token runs one GEMM over its slice (gate/up,
SwiGLU, down). The results are weighted and added back to their tokens with one ``index_add_``. A
decode step at batch 1 runs k small GEMVs; a prefill chunk of T tokens runs at most E GEMMs whose rows
add up to T * k. Experts that no token chose cost nothing.

The KV cache never sees any of this: attention is a dense model's, so a MoE model's KV bytes per token
are those of the dense model with the same attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.models.layers import Linear


@dataclass
class MoE:
    router: torch.Tensor  # [E, hidden], kept in fp32: the top-k choice should not hinge on rounding
    gate_up: list[Linear]  # per expert, [2 * expert_size, hidden]
    down: list[Linear]  # per expert, [hidden, expert_size]
    top_k: int
    norm_topk_prob: bool
    router_act: str  # "softmax" | "sigmoid"
    act_and_mul: object  # SwiGLU on a fused [rows, 2 * width] gate/up product
    shared_gate_up: Linear | None = None  # the shared expert, when the model has one
    shared_down: Linear | None = None
    shared_gate: torch.Tensor | None = None  # [hidden]: sigmoid(x . w) scales the shared expert's output

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's k experts and their weights: ([T, k] int64, [T, k] fp32)."""
        logits = x.float() @ self.router.t()
        probs = logits.softmax(dim=-1) if self.router_act == "softmax" else logits.sigmoid()
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return experts, weights

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        T, k = x.shape[0], self.top_k
        experts, weights = self.route(x)
        if T == 1:  # a lone decode step: its k experts one after another, nothing to sort or scatter
            w = weights[0].to(x.dtype)
            out = None
            for j, e in enumerate(experts[0].tolist()):
                y = self.down[e](self.act_and_mul(self.gate_up[e](x))).mul_(w[j])
                out = y if out is None else out.add_(y)
            return self._add_shared(x, out)
        flat = experts.flatten()  # pair p = token p // k's (p % k)-th choice
        order = flat.argsort(stable=True)  # the pairs, grouped by expert
        token = order // k
        counts = torch.bincount(flat, minlength=len(self.gate_up)).tolist()  # one host sync per layer
        xs = x[token]  # [T * k, hidden]: each expert's tokens contiguous
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                ys[rows] = self.down[e](self.act_and_mul(self.gate_up[e](xs[rows])))
                start += n
        ys *= weights.flatten()[order].to(ys.dtype)[:, None]
        return self._add_shared(x, torch.zeros_like(x).index_add_(0, token, ys))

    def _add_shared(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.shared_gate_up is not None:
            shared = self.shared_down(self.act_and_mul(self.shared_gate_up(x)))
            if self.shared_gate is not None:
                shared = shared * torch.sigmoid(x @ self.shared_gate.to(x.dtype))[:, None]
            out += shared
        return out


def experts_of(weights: dict[str, torch.Tensor], prefix: str, num_experts: int) -> tuple[list, list]:
    """Per expert (fused gate/up [2 * width, hidden], down [hidden, width]) from either layout the loaders
    hand over: one tensor per expert (``experts.{j}.gate_proj`` / ``up_proj`` / ``down_proj``) or stacked
    over experts (``experts.gate_up_proj`` [E, 2 * width, hidden] and ``experts.down_proj``, or
    ``experts.gate_proj`` and ``experts.up_proj`` [E, width, hidden] as GGUF stores them)."""
    p = prefix + "experts."
    if p + "down_proj" in weights:
        down = list(weights[p + "down_proj"].unbind(0))
        if p + "gate_up_proj" in weights:
            gate_up = list(weights[p + "gate_up_proj"].unbind(0))
        else:
            gate_up = [torch.cat(gu) for gu in zip(weights[p + "gate_proj"].unbind(0), weights[p + "up_proj"].unbind(0))]
    else:
        missing = [f"{p}{j}.{n}" for j in range(num_experts) for n in ("gate_proj", "up_proj", "down_proj")
                   if f"{p}{j}.{n}" not in weights]
        if missing:
            raise ValueError(f"the checkpoint lacks expert weights: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        gate_up = [torch.cat([weights[f"{p}{j}.gate_proj"], weights[f"{p}{j}.up_proj"]]) for j in range(num_experts)]
        down = [weights[f"{p}{j}.down_proj"] for j in range(num_experts)]
    if len(gate_up) != num_experts or len(down) != num_experts:
        raise ValueError(f"{prefix}: {len(gate_up)} experts in the checkpoint, the config says {num_experts}")
    return gate_up, down
