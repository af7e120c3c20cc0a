"""The trainer's token logprobs without the [N, V] logits: ``log_softmax(h @ W.T / T)[target]`` computed a chunk
of rows at a time, forward and backward (the head's matmul recomputed per chunk in backward).

Why: a PPO/GRPO step's logprobs need the LM head over every model token. Done plainly (``head(h).float()``, then
``log_softmax``, then ``gather``) autograd keeps the float32 logits and the log-softmax output for backward, and
the backward builds their gradients: ~3 x N x V x 4 bytes alive at once. At 32 trajectories x 1,024 answer tokens
with a 151,936-id vocabulary (Qwen2.5) that is ~60 GB; a colocated trainer does not have it. Here at most one
chunk's [rows, V] float32 block is alive (``chunk_bytes``, 1 GiB by default), and what backward keeps is the
hidden states (which autograd keeps anyway) and one log-sum-exp per row; when all rows fit in one chunk, their
softmax is kept too (within ``chunk_bytes``) and backward does not recompute the head's matmul.

Numerics follow the plain path: the head's matmul runs in the autocast dtype when autocast is on (its output
rounded to that dtype, then upcast, as autocast's ``linear`` does) or in the inputs' dtype otherwise; the
log-sum-exp and the gradient of the softmax are float32; the weight's gradient is accumulated over chunks in
float32.

    d logprob_i / d logits_ij = (1[j == t_i] - p_ij) / T,   p = softmax(logits_i / T)
"""
from __future__ import annotations

import torch

DEFAULT_CHUNK_BYTES = 1 << 30


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The matmul's dtype: autocast's when it is on for x's device (and x is floating point), else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def rows_per_chunk(vocab: int, chunk_bytes: int) -> int:
    """Rows whose float32 logits fit in ``chunk_bytes`` (at least 1)."""
    return max(1, chunk_bytes // (4 * vocab))


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                rows: int, dtype: torch.dtype) -> torch.Tensor:
        # hidden [N, H], weight [V, H], targets [N] -> [N] float32
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        w = weight.to(dtype)
        probs = None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, rows):
                e = min(n, s + rows)
                logits = (hidden[s:e].to(dtype) @ w.T).float() / temperature           # [rows, V]
                lse[s:e] = torch.logsumexp(logits, dim=-1)
                out[s:e] = logits.gather(1, targets[s:e, None]).squeeze(1) - lse[s:e]
            if n <= rows:
                # one chunk holds everything: keep its softmax for backward (within chunk_bytes) rather than
                # recompute the head's matmul there
                probs = logits.sub_(lse[:, None]).exp_()                               # [N, V]
        ctx.save_for_backward(hidden, weight, targets, lse, probs)
        ctx.temperature, ctx.rows, ctx.dtype = temperature, rows, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, targets, lse, probs = ctx.saved_tensors
        temperature, rows, dtype = ctx.temperature, ctx.rows, ctx.dtype
        n = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        w = weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, rows):
                e = min(n, s + rows)
                h = hidden[s:e].to(dtype)
                if probs is None:
                    p = torch.exp((h @ w.T).float() / temperature - lse[s:e, None])       # [rows, V] softmax
                else:
                    p = probs                                                             # (one chunk, kept)
                g = grad_out[s:e].float()
                # grad wrt logits/T-scaled inputs: g * (onehot - softmax), then the 1/T of the scaling
                # (the kept softmax is not written: a retained graph may run backward again)
                grad_logits = p.mul_(-g[:, None]) if probs is None else p * -g[:, None]
                grad_logits.scatter_add_(1, targets[s:e, None], g[:, None])
                grad_logits = grad_logits.div_(temperature).to(dtype)                     # [rows, V]
                if need_h:
                    grad_h[s:e] = (grad_logits @ w).to(hidden.dtype)
                if need_w:
                    grad_w += (grad_logits.T @ h).float()
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None


def token_logprobs_chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           temperature: float = 1.0, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """``log_softmax((hidden @ weight.T).float() / temperature)[i, targets[i]]`` -> [N] float32, differentiable
    in ``hidden`` and ``weight``, never holding more than ``chunk_bytes`` of logits."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes!r}")
    rows = rows_per_chunk(weight.shape[0], chunk_bytes)
    return _TokenLogprobs.apply(hidden, weight, targets.long(), float(temperature), rows, _compute_dtype(hidden))
