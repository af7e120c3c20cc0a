"""KV store: scatter the new tokens' K/V into the paged cache at their flat slots (``store_kv``), optionally
rotating q and k first in the same kernel (``rotary_store_kv``).

    k, v:              [T, Hkv, D]            (views of the fused qkv output are fine: head_dim contiguous)
    k_cache, v_cache:  [NB, BS, Hkv, D]       contiguous; flat slot s = block * BS + offset
    slot_mapping:      [T] int64; slot < 0 = padding token (CUDA-graph batches), nothing is written
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.elementwise import _rotate_heads
from engine.kernels.pdl import gdc_launch_dependents, gdc_wait, launch_options, use_pdl


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_slot, stride_ch,  # cache strides of one slot and one kv head (elements)
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM)
    dst = slot.to(tl.int64) * stride_slot + h[:, None] * stride_ch + d[None, :]
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check_store_args(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape and k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[2:] == (num_kv_heads, head_dim), "cache [NB, BS, Hkv, D] disagrees with k"
    assert k_cache.is_contiguous(), "slots are flat indices: the cache must be contiguous"
    assert k.stride(2) == 1 and v.stride(2) == 1, "head_dim must be contiguous"
    assert slot_mapping.shape == (num_tokens,)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k/v [T, Hkv, D] into k_cache/v_cache [NB, BS, Hkv, D] at ``slot_mapping`` (negative = skip)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    _check_store_args(k, v, k_cache, v_cache, slot_mapping)
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )


@triton.jit
def _rotary_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_st,
    stride_slot, stride_ch,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # see engine.kernels.pdl: everything below reads the previous kernels' outputs
        gdc_launch_dependents()
        gdc_wait()
    # one program per token: rotate q in place; rotate k into the cache (k itself is left as it was);
    # copy v into the cache. Same fp32 maths as apply_rotary_ (x1 cos - x2 sin | x2 cos + x1 sin).
    t = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_HALF)
    cmask = c < HALF
    cos = tl.load(cos_ptr + t * stride_ct + c, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_st + c, mask=cmask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, t, stride_qt, stride_qh, NUM_Q_HEADS, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return  # a padding row of a CUDA-graph batch: nothing goes to the cache
    hk = tl.arange(0, BLOCK_HK)
    kmask = (hk[:, None] < NUM_KV_HEADS) & cmask[None, :]
    k1_ptr = k_ptr + t * stride_kt + hk[:, None] * stride_kh + c[None, :]
    k1 = tl.load(k1_ptr, mask=kmask, other=0.0).to(tl.float32)
    k2 = tl.load(k1_ptr + HALF, mask=kmask, other=0.0).to(tl.float32)
    # round to the activation dtype first (as apply_rotary_ does in place), then to the cache dtype
    r1 = (k1 * cos[None, :] - k2 * sin[None, :]).to(k_ptr.dtype.element_ty)
    r2 = (k2 * cos[None, :] + k1 * sin[None, :]).to(k_ptr.dtype.element_ty)
    dst = slot.to(tl.int64) * stride_slot + hk[:, None] * stride_ch + c[None, :]
    tl.store(k_cache_ptr + dst, r1.to(k_cache_ptr.dtype.element_ty), mask=kmask)
    tl.store(k_cache_ptr + dst + HALF, r2.to(k_cache_ptr.dtype.element_ty), mask=kmask)
    v_src = v_ptr + t * stride_vt + hk[:, None] * stride_vh + c[None, :]
    tl.store(v_cache_ptr + dst, tl.load(v_src, mask=kmask).to(v_cache_ptr.dtype.element_ty), mask=kmask)
    tl.store(v_cache_ptr + dst + HALF, tl.load(v_src + HALF, mask=kmask).to(v_cache_ptr.dtype.element_ty),
             mask=kmask)


def rotary_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """``apply_rotary_(q, k, cos, sin)`` then ``store_kv(k, v, ...)`` in one kernel: q [T, Hq, D] is rotated
    in place, the rotated k goes to the cache only (k is not modified), v is copied; cos/sin [T, D/2]."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, num_kv_heads, _ = k.shape
    _check_store_args(k, v, k_cache, v_cache, slot_mapping)
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim and head_dim % 2 == 0 and q.stride(2) == 1
    assert cos.stride(1) == 1 and sin.stride(1) == 1
    half = head_dim // 2
    assert cos.shape == (num_tokens, half) and sin.shape == (num_tokens, half)
    if num_tokens == 0:
        return
    pdl = use_pdl(q)
    _rotary_store_kv_kernel[(num_tokens,)](
        q, k, v, cos, sin, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        sin.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HALF=half,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads), BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half), USE_PDL=pdl, num_warps=4, **launch_options(pdl),
    )
