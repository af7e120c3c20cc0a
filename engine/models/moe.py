"""A sparse mixture-of-experts block (Qwen3-MoE): a softmax router picks ``top_k`` of ``E`` SwiGLU experts per token.

    router     logits = x @ router.weight^T            [T, E]  (model dtype)
               p = softmax(logits) in float32; (w, ids) = top_k(p)   [T, k] each, w descending
               w /= sum(w) when norm_topk_prob; w rounded to the model dtype
    experts    y_t = sum over j of w[t, j] * down[e] @ (silu(g) * u),  [g | u] = gate_up[e] @ x_t,  e = ids[t, j]

Parameters, in transformers 5's layout (what a v5 trainer's ``named_parameters`` pushes)::

    router.weight  [E, H]
    gate_up        [E, 2I, H]   rows gate | up of each expert (checkpoints: experts.{e}.gate_proj / up_proj)
    down           [E, H, I]                                   (checkpoints: experts.{e}.down_proj)

Two paths, chosen by ``use_fused``:
  - torch (CPU, and the reference): the tokens are grouped by expert (a stable sort of the flat [T * k] expert ids,
    so each expert's rows stay in token order), one product pair per expert that has tokens, and the weighted outputs
    summed into each token's row in expert order, as transformers sums them. It reads the expert counts on the host;
  - fused (CUDA by default, ``engine.kernels.moe``): the routing in one kernel (the lowest expert first among equal
    probabilities), the same grouping on the device and one grouped Triton product per projection, no host read.
    The first time it fails (it would not build under this Triton, say) the torch path takes over, with a WARNING.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from engine.model_config import ModelConfig

logger = logging.getLogger(__name__)


def route_logits(logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's logits [T, E] -> (weights [T, k] in the logits' dtype, expert ids [T, k] int64): softmax in
    float32, top-k by descending probability, renormalised when ``norm_topk_prob`` (the torch routing; the fused
    path's kernel computes the same)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


class SparseMoE(nn.Module):
    def __init__(self, config: "ModelConfig", dtype: torch.dtype) -> None:
        super().__init__()
        c = config
        self.num_experts, self.top_k, self.norm_topk_prob = c.num_experts, c.num_experts_per_tok, c.norm_topk_prob
        self.router = nn.Linear(c.hidden_size, c.num_experts, bias=False, dtype=dtype)
        self.gate_up = nn.Parameter(torch.empty(c.num_experts, 2 * c.moe_intermediate_size, c.hidden_size,
                                                dtype=dtype))
        self.down = nn.Parameter(torch.empty(c.num_experts, c.hidden_size, c.moe_intermediate_size, dtype=dtype))
        # Qwen2-MoE's shared expert: every token, scaled by sigmoid(shared_expert_gate(x)); rows gate | up
        self.shared_gate_up = self.shared_down = self.shared_expert_gate = None
        if c.shared_expert_intermediate_size:
            s = c.shared_expert_intermediate_size
            self.shared_gate_up = nn.Linear(c.hidden_size, 2 * s, bias=False, dtype=dtype)
            self.shared_down = nn.Linear(s, c.hidden_size, bias=False, dtype=dtype)
            self.shared_expert_gate = nn.Linear(c.hidden_size, 1, bias=False, dtype=dtype)
        # (slots [T], ids [T, k]) -> None: where the routing of each forward goes (engine.routing), or None
        self.routing_sink = None
        # None: the fused kernels on CUDA (when triton imports), the torch path elsewhere; True / False force it
        # (True on CPU runs the kernels under TRITON_INTERPRET=1: tests only)
        self.use_fused: Optional[bool] = None

    def _fused(self, x: torch.Tensor):
        """engine.kernels (the fused path) when it applies to x, else None."""
        if self.use_fused is False or (self.use_fused is None and x.device.type != "cuda"):
            return None
        from engine.models.decoder import fused_kernels
        kernels = fused_kernels()
        if kernels is None and self.use_fused:
            raise RuntimeError("SparseMoE.use_fused=True but engine.kernels (triton) cannot be imported")
        return kernels

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] in x's dtype, expert ids [T, k] int64), by descending router probability."""
        return route_logits(F.linear(x, self.router.weight), self.top_k, self.norm_topk_prob)

    def forward(self, x: torch.Tensor, slots: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [T, H] -> [T, H]. ``slots`` [T]: the tokens' KV slots, where ``routing_sink`` records the experts
        chosen."""
        out = self._routed(x, slots)
        if self.shared_gate_up is None:
            return out
        gate, up = self.shared_gate_up(x).chunk(2, dim=-1)
        shared = self.shared_down(F.silu(gate) * up)
        return out + torch.sigmoid(self.shared_expert_gate(x)) * shared   # transformers' order: routed + shared

    def _routed(self, x: torch.Tensor, slots: Optional[torch.Tensor]) -> torch.Tensor:
        """The routed experts' part of ``forward``."""
        kernels = self._fused(x)
        if kernels is not None:
            try:
                from engine.kernels.moe import fused_moe, fused_route
                sink = self.routing_sink if slots is not None else None
                target = getattr(sink, "target", None)     # the store's column: the kernel records the ids itself
                weights, ids = fused_route(F.linear(x, self.router.weight), self.top_k, self.norm_topk_prob,
                                           record=(slots, target) if target is not None else None)
                if sink is not None and target is None:
                    sink(slots, ids)
                return fused_moe(x, self.gate_up, self.down, weights, ids, kernels.silu_and_mul)
            except Exception as e:  # noqa: BLE001 - a compile or launch failure of the kernel
                logger.warning("the fused MoE kernel failed (%s: %s); the torch MoE path from now on",
                               type(e).__name__, e)
                self.use_fused = False
        weights, ids = self.route(x)
        if self.routing_sink is not None and slots is not None:
            self.routing_sink(slots, ids)
        out = torch.zeros_like(x)
        flat = ids.reshape(-1)                                                        # [T * k]: token t, slot j at t*k + j
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()            # host read (reference path)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sel = order[start:start + n]                                              # expert e's (token, slot) pairs
            start += n
            tokens, ranks = sel // self.top_k, sel % self.top_k                      # token, and e's place in its top-k
            gate, up = F.linear(x[tokens], self.gate_up[e]).chunk(2, dim=-1)          # [n, I] each
            y = F.linear(F.silu(gate) * up, self.down[e]) * weights[tokens, ranks, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


__all__ = ["SparseMoE", "route_logits"]
