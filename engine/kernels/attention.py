"""Paged attention kernels: decode (split-K, flash-decoding) here, extend (new tokens over a cached prefix) in
``engine.kernels.extend_attention``; the helpers both use (KV tile offsets, one online-softmax step) are here.

Both read K/V only through the block table, after ``store_kv`` has written the step's new tokens::

    k_cache, v_cache: [NB, BS, Hkv, D]
    position p of sequence s  ->  page = block_tables[s, p // BS], row = p % BS
    element (p, kv head h, d)  =  cache[page, p % BS, h, d]

A KV tile is BLOCK_N consecutive positions gathered page by page (BLOCK_N need not equal BS), so a tile
may span several pages or part of one.

GQA: one program owns one KV head and *all* query heads of its group (``GROUP = Hq // Hkv``); each KV tile
is loaded once and multiplied against every query row of the group. Rows of the score tile are:
    decode:  row r = query head kvh * GROUP + r                      (r < GROUP; rows up to BLOCK_H masked)
    extend:  row r = (token tok0 + r // GROUP, head kvh * GROUP + r % GROUP)

Softmax is online in float32 in the base-2 domain: scores are pre-multiplied by scale * log2(e), so
exp2(x * log2 e) = exp(x) and a split's log-sum-exp is stored as log2(sum) + running max.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from engine.attention.base import decode_split_count
from engine.kernels.pdl import gdc_launch_dependents, gdc_wait, launch_options, use_pdl

_LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # IEEE: float32 operands at full precision (Triton's default for fp32 dots is tf32).
    # NOTE: Triton's CPU interpreter multiplies the raw bits of bf16 operands; there (IEEE is set by the
    # host wrapper when interpreting) widen them first: bf16 -> fp32 is exact, the sum is fp32 as on the GPU.
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _tile_offsets(bt_row_ptr, pos, mask, BLOCK_SIZE: tl.constexpr, stride_kb, stride_ks):
    """Element offset of each position's row in the cache (kv head 0, d 0): [BLOCK_N] int64."""
    page = tl.load(bt_row_ptr + pos // BLOCK_SIZE, mask=mask, other=0).to(tl.int64)
    return page * stride_kb + (pos % BLOCK_SIZE) * stride_ks


@triton.jit
def _online_softmax_step(q, k_cache_ptr, v_cache_ptr, tok_off, d, kv_mask_t, kv_mask, score_mask,
                         m_i, l_i, acc, qk_scale, IEEE: tl.constexpr):
    """One KV tile of online softmax. q: [M, BD]; tok_off: [N]; kv_mask_t: [BD, N] (None = all valid);
    kv_mask: [N, BD]; score_mask: [M, N] or None. Returns the updated (m_i, l_i, acc)."""
    k = tl.load(k_cache_ptr + tok_off[None, :] + d[:, None], mask=kv_mask_t, other=0.0)  # [BD, N]
    qk = _dot(q, k, IEEE) * qk_scale                                                    # [M, N]
    if score_mask is not None:
        qk = tl.where(score_mask, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + tok_off[:, None] + d[None, :], mask=kv_mask, other=0.0)    # [N, BD]
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return m_new, l_i, acc


# ------------------------------------------------------------------------------------------------ decode
# NOTE: the block-table width (stride_bt) and the split count change from step to step in eager mode;
# without do_not_specialize every new divisibility class of them recompiles the kernel mid-run.
@triton.jit(do_not_specialize=["stride_bt", "num_splits"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, seq_lens_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
    qk_scale, num_splits,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    DIRECT: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr,
):
    # grid: (num_seqs, num_kv_heads, num_splits); sequence s's one query token is row s of q.
    if USE_PDL:  # see engine.kernels.pdl: q and this step's K/V come from the previous kernels
        gdc_launch_dependents()
        gdc_wait()
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # split i covers [i * per_split, (i + 1) * per_split) ∩ [0, seq_len), per_split a multiple of BLOCK_N;
    # trailing splits may be empty (they record lse = -inf and are ignored by the reduce).
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + h
    row_mask = (h[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=row_mask, other=0.0)
    q = q.to(k_cache_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_H], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    kv_head_ptr_k = k_cache_ptr + kvh * stride_kh
    kv_head_ptr_v = v_cache_ptr + kvh * stride_kh
    dmask = d < HEAD_DIM
    for tile in range(start, end, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        valid = pos < end
        tok_off = _tile_offsets(bt_row, pos, valid, BLOCK_SIZE, stride_kb, stride_ks)
        m_i, l_i, acc = _online_softmax_step(
            q, kv_head_ptr_k, kv_head_ptr_v, tok_off, d,
            dmask[:, None] & valid[None, :], valid[:, None] & dmask[None, :], valid[None, :],
            m_i, l_i, acc, qk_scale, IEEE)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if DIRECT:
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        # part_o: [S, Hq, num_splits, HEAD_DIM] fp32; part_lse: [S, Hq, num_splits] fp32 (log2 domain)
        row = (seq * NUM_HEADS + heads) * num_splits + split
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=row_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=h < GROUP)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    part_o_ptr, part_lse_ptr, out_ptr, stride_ot, stride_oh, num_splits,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    # grid: (num_seqs, num_heads). Merge the splits: out = sum_i 2^(lse_i - m) o_i / sum_i 2^(lse_i - m).
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < num_splits
    base = (seq * NUM_HEADS + head) * num_splits
    lse = tl.load(part_lse_ptr + base + s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # seq_len == 0 (a padded row): every split empty -> zeros
    w = tl.exp2(lse - m)
    o = tl.load(part_o_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :],
                mask=smask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    num = tl.sum(w[:, None] * o, 0)
    den = tl.sum(w, 0)
    den = tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, (num / den).to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


@lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device,
                       block_n: int = 64) -> int:
    """Splits per (sequence, kv head) so the grid covers the SMs about twice, with at least two KV tiles
    per split; a power of two (few distinct compilations). NOTE: under CUDA graphs pass a fixed value:
    this depends on ``max_seq_len``, which changes between replays."""
    # a bare "cuda" device means the current one, not GPU 0
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    return decode_split_count(num_seqs, num_kv_heads, sms, 64, max_seq_len, block_n)


def _ieee_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or _INTERPRETED


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def paged_decode_attention(
    q: torch.Tensor,             # [S, Hq, D]: one query token per sequence
    k_cache: torch.Tensor,       # [NB, BS, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    seq_lens: torch.Tensor,      # [S] int32, including the query token (0 = padded row -> zeros)
    scale: float,
    *,
    num_splits: int = 1,
    out: torch.Tensor | None = None,  # [S, Hq, D]
    block_n: int | None = None,
) -> torch.Tensor:
    """Attention of each sequence's single new token over positions [0, seq_len) of its sequence."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert num_heads % num_kv_heads == 0 and k_cache.shape[3] == head_dim and q.stride(2) == 1
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.stride(2) == 1
    if num_seqs == 0:
        return out
    block_d = _block_d(head_dim)
    block_n = block_n or 64
    num_splits = max(1, int(num_splits))
    direct = num_splits == 1
    pdl = use_pdl(q)
    if direct:
        part_o = part_lse = out  # unused
    else:
        part_o = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_o, part_lse,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        scale * _LOG2E, num_splits,
        NUM_HEADS=num_heads, GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        DIRECT=direct, IEEE=_ieee_dot(k_cache.dtype), USE_PDL=pdl,
        num_warps=4, **launch_options(pdl),
    )
    if not direct:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part_o, part_lse, out, out.stride(0), out.stride(1), num_splits,
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_S=triton.next_power_of_2(num_splits), USE_PDL=pdl, num_warps=1, **launch_options(pdl),
        )
    return out


# jit returns an InterpretedFunction instead of a JITFunction under TRITON_INTERPRET=1 (read at decoration)
_INTERPRETED = not isinstance(_decode_kernel, triton.runtime.JITFunction)


__all__ = ["default_num_splits", "paged_decode_attention"]
