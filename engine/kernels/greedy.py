"""Greedy sampling on the device in two kernels: the argmax token of each row and its log-probability.

    logits [R, V] (any float dtype, e.g. the lm_head's bf16 output)
      -> token_ids [R] int64 = argmax (first index among equal maxima, as torch.argmax)
         out [2, R] float64 = (token id, logits[token] - logsumexp(logits)) in fp32, widened

Stage 1, grid (R, cdiv(V, BLOCK_V)): each program reduces one vocab chunk to (max, first argmax,
sum(exp(x - max))). Stage 2, grid (R,): merges the chunks: M = max of the chunk maxima, the token is the
argmax of the first chunk holding M (chunks are in vocab order, so it is the first occurrence overall),
lse = M + log(sum_c s_c * exp(m_c - M)), logprob = M - lse.

This replaces ~20 small torch kernels (upcast, argmax, gather, logsumexp's six, the float64 packing) of
the greedy path; the widened [2, R] pair is what ``ModelRunner`` copies to the host in one transfer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import gdc_launch_dependents, gdc_wait, launch_options, use_pdl

BLOCK_V = 4096


@triton.jit
def _greedy_partial_kernel(logits_ptr, stride_r, V, part_max_ptr, part_arg_ptr, part_sum_ptr, num_chunks,
                           BLOCK_V: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:  # see engine.kernels.pdl: the logits come from the previous kernel
        gdc_launch_dependents()
        gdc_wait()
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = c * BLOCK_V + tl.arange(0, BLOCK_V)
    x = tl.load(logits_ptr + r * stride_r + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    m = tl.max(x, 0)
    arg = tl.argmax(x, 0, tie_break_left=True)
    m_safe = tl.where(m == float("-inf"), 0.0, m)   # an all -inf chunk: sum 0, not NaN
    s = tl.sum(tl.exp(x - m_safe), 0)
    slot = r * num_chunks + c
    tl.store(part_max_ptr + slot, m)
    tl.store(part_arg_ptr + slot, c * BLOCK_V + arg)
    tl.store(part_sum_ptr + slot, s)


@triton.jit
def _greedy_merge_kernel(part_max_ptr, part_arg_ptr, part_sum_ptr, token_ptr, out_ptr, num_rows, num_chunks,
                         BLOCK_C: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    r = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    cmask = c < num_chunks
    pm = tl.load(part_max_ptr + r * num_chunks + c, mask=cmask, other=float("-inf"))
    ps = tl.load(part_sum_ptr + r * num_chunks + c, mask=cmask, other=0.0)
    big = tl.max(pm, 0)
    first = tl.argmax(pm, 0, tie_break_left=True)
    token = tl.load(part_arg_ptr + r * num_chunks + first)
    big_safe = tl.where(big == float("-inf"), 0.0, big)
    lse = big_safe + tl.log(tl.sum(ps * tl.exp(pm - big_safe), 0))
    tl.store(token_ptr + r, token.to(tl.int64))
    tl.store(out_ptr + r, token.to(tl.float64))
    tl.store(out_ptr + num_rows + r, (big - lse).to(tl.float64))


def greedy_sample(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V] -> (token_ids [R] int64, [2, R] float64 of (token id, logprob))."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1, "the vocab dimension must be contiguous"
    assert vocab < 2 ** 24, "token ids travel as float64 (exact) and chunk indices as int32"
    token_ids = torch.empty(rows, dtype=torch.int64, device=logits.device)
    out = torch.empty((2, rows), dtype=torch.float64, device=logits.device)
    if rows == 0:
        return token_ids, out
    num_chunks = triton.cdiv(vocab, BLOCK_V)
    part_max = torch.empty((rows, num_chunks), dtype=torch.float32, device=logits.device)
    part_sum = torch.empty_like(part_max)
    part_arg = torch.empty((rows, num_chunks), dtype=torch.int32, device=logits.device)
    pdl = use_pdl(logits)
    _greedy_partial_kernel[(rows, num_chunks)](
        logits, logits.stride(0), vocab, part_max, part_arg, part_sum, num_chunks,
        BLOCK_V=BLOCK_V, USE_PDL=pdl, num_warps=8, **launch_options(pdl))
    _greedy_merge_kernel[(rows,)](
        part_max, part_arg, part_sum, token_ids, out, rows, num_chunks,
        BLOCK_C=max(16, triton.next_power_of_2(num_chunks)), USE_PDL=pdl, num_warps=1, **launch_options(pdl))
    return token_ids, out


__all__ = ["greedy_sample"]
