"""The head in float32 (``EngineConfig.fp32_lm_head``, SGLang's ``--enable-fp32-lm-head``): for a bf16 / fp16
model, the final RMSNorm and the lm_head run in float32 over float32 copies of their weights, so the logits
(and the logprobs a trainer's importance ratio divides by) carry no bf16 rounding of the head.

    hidden [T, H]  model dtype: the residual stream after the last layer (summed in the model dtype, as
                   transformers sums it)
      -> x = float32(hidden); x * rsqrt(mean(x^2) + eps) * norm_weight    all float32, no rounding   [T, H]
      -> x @ lm_head_weight.T                                              float32 GEMM (GEMV in decode) [T, V]

The rest of the model (the embedding lookup included) stays in the model dtype. The copies are derived state,
never written by a loader: ``CausalLM.refresh_fp32_head`` rewrites them from the model's parameters in place
(``copy_``: the decode CUDA graphs read ``norm_weight`` at its captured address), and ``WeightUpdater`` calls it
after every applied update that wrote the final norm, the lm_head or a tied embedding (a rolled-back one restored
the parameters bitwise, so the copies still match). A tied lm_head's copy is a copy of the embedding table.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Fp32Head(nn.Module):
    """Float32 copies of the final norm's and the lm_head's weights, and the two ops that read them."""

    def __init__(self, vocab_size: int, hidden_size: int, eps: float, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        # Buffers, not Parameters: invisible to the weight mapper and the updater's parameter table (so an
        # update's backup and the sleep of the weights see the model's own parameters only).
        self.register_buffer("norm_weight", torch.empty(hidden_size, dtype=torch.float32, device=device),
                             persistent=False)
        self.register_buffer("lm_head_weight",
                             torch.empty(vocab_size, hidden_size, dtype=torch.float32, device=device),
                             persistent=False)

    @staticmethod
    def nbytes(vocab_size: int, hidden_size: int) -> int:
        """Device bytes of the copies (what ``engine.memory`` reserves for them)."""
        return (vocab_size + 1) * hidden_size * 4

    @torch.no_grad()
    def refresh(self, norm_weight: torch.Tensor, lm_head_weight: torch.Tensor) -> None:
        """Upcast the model-dtype weights into the copies, in place (same addresses)."""
        self.norm_weight.copy_(norm_weight)
        self.lm_head_weight.copy_(lm_head_weight)

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] (model dtype) -> RMSNorm in float32 [T, H] float32 (torch ops: CPU, the oracle)."""
        x = hidden.to(torch.float32)
        return self.norm_weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def norm_fused(self, hidden: torch.Tensor, residual: torch.Tensor | None, kernels) -> torch.Tensor:
        """``norm(hidden + residual)`` in one Triton kernel (the sum rounded to the model dtype first, as the
        torch path's layer output is) -> [T, H] float32."""
        return kernels.rms_norm(hidden, self.norm_weight, self.eps, residual, upcast=True)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [R, H] float32 (from ``norm``) -> logits [R, V] float32."""
        return F.linear(hidden, self.lm_head_weight)
