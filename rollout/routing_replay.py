"""Routing replay (R3) in a transformers MoE trainer: its forward uses the experts the rollout engine routed each
token to (``Completion.routed_experts``, engine.routing) instead of choosing them again.

    with replay_routing(hf_model, [routed_0, routed_1, ...]):     # one per batch row, [P_b, L, k] int, or None
        logits = hf_model(input_ids=batch_ids).logits                   # batch_ids [B, S], right-padded

Row b's positions [0, P_b) take the recorded experts at every MoE layer (the j-th MoE layer reads column j); their
weights are the trainer's own router probabilities of those experts, renormalised as the config says, so gradients
reach the router as usual. Positions past P_b (the last token, padding) route freely. Without replay a trainer's
forward can pick other experts than the rollout where two experts' scores are close, and the importance ratio then
compares two different networks; tests/engine/test_moe.py shows the difference.

Needs transformers 5's ``Qwen3MoeSparseMoeBlock`` (a ``gate`` router module returning logits, weights and indices);
another layout is refused with a clear error rather than silently routed freely.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _moe_blocks(model: nn.Module) -> list[nn.Module]:
    blocks = [m for m in model.modules() if type(m).__name__ in ("Qwen3MoeSparseMoeBlock", "Qwen2MoeSparseMoeBlock")]
    for b in blocks:
        gate = getattr(b, "gate", None)
        if gate is None or not all(hasattr(gate, a) for a in ("weight", "top_k", "norm_topk_prob")):
            raise TypeError("replay_routing needs transformers 5's Qwen3MoeSparseMoeBlock (a gate router with weight, "
                            f"top_k and norm_topk_prob); got {type(gate).__name__} in {type(b).__name__}")
    return blocks


def replay_ids(routed: Sequence[Optional[torch.Tensor]], seq_len: int, num_layers: int, top_k: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids [B * S, layers, k] int64, mask [B * S] bool: rows that replay), rows in the (batch, position) order
    of ``hidden.view(-1, H)``; MoE layer j reads ``ids[:, j]``."""
    b = len(routed)
    ids = torch.zeros(b, seq_len, num_layers, top_k, dtype=torch.int64, device=device)
    mask = torch.zeros(b, seq_len, dtype=torch.bool, device=device)
    for i, r in enumerate(routed):
        if r is None:
            continue
        if r.dim() != 3 or r.shape[1:] != (num_layers, top_k):
            raise ValueError(f"routed[{i}] must be [positions, {num_layers} MoE layers, {top_k}], got "
                             f"{tuple(r.shape)}")
        n = min(r.shape[0], seq_len)
        ids[i, :n] = r[:n].to(device=device, dtype=torch.int64)
        mask[i, :n] = True
    return ids.view(b * seq_len, num_layers, top_k), mask.view(b * seq_len)


@contextlib.contextmanager
def replay_routing(model: nn.Module, routed: Sequence[Optional[torch.Tensor]]) -> Iterator[None]:
    """Within the block, every forward of ``model`` over a [len(routed), S] batch replays ``routed`` (see the
    module docstring)."""
    blocks = _moe_blocks(model)
    if not blocks:
        raise ValueError("replay_routing: the model has no Qwen3-MoE / Qwen2-MoE sparse blocks")
    originals = []
    # the replayed ids of a forward's shape, built once for every layer (each forward calls every layer's router)
    built: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def ids_for(seq_len: int, device: torch.device):
        key = (seq_len, device)
        if key not in built:
            built[key] = replay_ids(routed, seq_len, len(blocks), blocks[0].gate.top_k, device)
        return built[key]

    for j, block in enumerate(blocks):
        gate = block.gate

        def forward(hidden, gate=gate, j=j):
            hidden = hidden.reshape(-1, gate.weight.shape[1])                           # [B * S, H]
            logits = F.linear(hidden, gate.weight)                                     # [B * S, E]
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            _, free = torch.topk(probs, gate.top_k, dim=-1)
            ids, mask = ids_for(hidden.shape[0] // len(routed), hidden.device)
            ids = torch.where(mask[:, None], ids[:, j], free)
            weights = probs.gather(1, ids)
            if gate.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return logits, weights.to(logits.dtype), ids

        originals.append(gate)
        gate.forward = forward          # an instance attribute over the class's forward
    try:
        yield
    finally:
        for gate in originals:
            del gate.forward


__all__ = ["replay_ids", "replay_routing"]
