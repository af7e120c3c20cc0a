"""Paged extend attention: the new tokens of each sequence (prefill chunks, and decodes in a mixed step) over its
cached prefix, causal, in tiles of new tokens (``engine.kernels.attention`` has the layout, the decode kernel
and the helpers both share); optionally split-KV, and over a device work list for the mixed-step CUDA graphs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.attention.base import EXTEND_SPLIT_TILES, extend_max_splits
from engine.kernels.attention import _LOG2E, _block_d, _ieee_dot, _online_softmax_step, _tile_offsets

# Split-KV (flash-decoding for extend tiles): a tile's keys [0, end) may be cut into up to MAX_SPLITS
# consecutive ranges of at least SPLIT_TILES KV tiles each, one program per range, merged afterwards by
# _extend_merge_kernel. Why: a mixed step of a multi-turn workload is mostly decode rows and short
# observations over long histories (1-2k keys): without splits its ~50-100 programs are fewer than the SMs
# and each walks the whole history serially. The split count of a tile is a function of its own key count
# only (``_split_range``), so a token's result does not depend on the rest of the step, nor on graph vs eager.
@triton.jit
def _split_range(end, split, MAX_SPLITS: tl.constexpr, SPLIT_TILES: tl.constexpr, BLOCK_N: tl.constexpr):
    """(number of splits of a tile with keys [0, end), this split's key range [lo, hi))."""
    n_kv = tl.cdiv(end, BLOCK_N)
    n_split = tl.minimum(tl.maximum(n_kv // SPLIT_TILES, 1), MAX_SPLITS)
    per = tl.cdiv(n_kv, n_split) * BLOCK_N
    lo = split * per
    hi = tl.minimum(lo + per, end)
    return n_split, lo, hi


@triton.jit
def _extend_tile(tiles_ptr, qsl_ptr, TILED: tl.constexpr, TOKS: tl.constexpr, MAX_SPLITS: tl.constexpr):
    """-> (sequence, first new token of the tile, split) of this program; seq = -1: no work."""
    if TILED:
        # grid (len(tiles), num_kv_heads, MAX_SPLITS): tiles[i] = seq << 16 | tile index, -1 = no work
        entry = tl.load(tiles_ptr + tl.program_id(0))
        seq = tl.where(entry < 0, -1, entry >> 16)
        tok0 = (entry & 0xFFFF) * TOKS
        split = tl.program_id(2)
    else:
        # grid (num_seqs, num_kv_heads, cdiv(max_query_len, TOKS) * MAX_SPLITS)
        seq = tl.program_id(0)
        tok0 = (tl.program_id(2) // MAX_SPLITS) * TOKS
        split = tl.program_id(2) % MAX_SPLITS
    return seq, tok0, split


@triton.jit(do_not_specialize=["stride_bt"])
def _extend_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr, tiles_ptr, part_o_ptr, part_lse_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
    qk_scale,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, TOKS: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    IEEE: tl.constexpr, TILED: tl.constexpr, MAX_SPLITS: tl.constexpr, SPLIT_TILES: tl.constexpr,
):
    # A tile is TOKS new tokens x GROUP heads of one sequence (``_extend_tile``). TILED: the grid depends on
    # no host value of the step, so a captured CUDA graph serves every mix of sequences whose tiles fit
    # (engine.mixed_graphs).
    seq, tok0, split = _extend_tile(tiles_ptr, qsl_ptr, TILED, TOKS, MAX_SPLITS)
    if seq < 0:
        return
    kvh = tl.program_id(1)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if tok0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len  # cached prefix; new token i sits at position ctx + i
    # Keys [0, ctx + tok0] are visible to every row of the tile: whole KV tiles below that need no mask.
    # The rest, up to the last valid token's position, gets the causal mask k_pos <= q_pos.
    last_tok = tl.minimum(tok0 + TOKS, q_len) - 1
    end = ctx + last_tok + 1
    unmasked_end = ((ctx + tok0 + 1) // BLOCK_N) * BLOCK_N
    if MAX_SPLITS > 1:
        n_split, lo, hi = _split_range(end, split, MAX_SPLITS, SPLIT_TILES, BLOCK_N)
        if split >= n_split:
            return
    else:
        n_split, lo, hi = 1, 0, end

    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    r_tok = tok0 + r // GROUP
    r_head = kvh * GROUP + r % GROUP
    r_valid = (r < TOKS * GROUP) & (r_tok < q_len)
    dmask = d < HEAD_DIM
    row_mask = r_valid[:, None] & dmask[None, :]
    q_off = (q_start + r_tok).to(tl.int64)[:, None] * stride_qt + r_head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_mask, other=0.0).to(k_cache_ptr.dtype.element_ty)
    q_pos = ctx + r_tok  # [BLOCK_M]; invalid rows get positions past the tile, never stored

    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    kv_head_ptr_k = k_cache_ptr + kvh * stride_kh
    kv_head_ptr_v = v_cache_ptr + kvh * stride_kh

    all_n = tl.full([BLOCK_N], 1, dtype=tl.int1)
    for tile in range(lo, tl.minimum(hi, unmasked_end), BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        tok_off = _tile_offsets(bt_row, pos, all_n, BLOCK_SIZE, stride_kb, stride_ks)
        m_i, l_i, acc = _online_softmax_step(
            q, kv_head_ptr_k, kv_head_ptr_v, tok_off, d,
            dmask[:, None] & all_n[None, :], all_n[:, None] & dmask[None, :], None,
            m_i, l_i, acc, qk_scale, IEEE)
    for tile in range(tl.maximum(lo, unmasked_end), hi, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        valid = pos < hi
        tok_off = _tile_offsets(bt_row, pos, valid, BLOCK_SIZE, stride_kb, stride_ks)
        m_i, l_i, acc = _online_softmax_step(
            q, kv_head_ptr_k, kv_head_ptr_v, tok_off, d,
            dmask[:, None] & valid[None, :], valid[:, None] & dmask[None, :],
            (pos[None, :] <= q_pos[:, None]) & valid[None, :],
            m_i, l_i, acc, qk_scale, IEEE)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if n_split == 1:
        o_off = (q_start + r_tok).to(tl.int64)[:, None] * stride_ot + r_head[:, None] * stride_oh + d[None, :]
        tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        # part_o: [T, Hq, MAX_SPLITS, HEAD_DIM] fp32; part_lse: [T, Hq, MAX_SPLITS] fp32 (log2 domain)
        row = ((q_start + r_tok).to(tl.int64) * NUM_HEADS + r_head) * MAX_SPLITS + split
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=row_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=r_valid)


@triton.jit
def _extend_merge_kernel(
    seq_lens_ptr, qsl_ptr, out_ptr, tiles_ptr, part_o_ptr, part_lse_ptr, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, TOKS: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    TILED: tl.constexpr, MAX_SPLITS: tl.constexpr, SPLIT_TILES: tl.constexpr,
):
    # The extend grid with one program per tile (split 0's): merge the tile's splits,
    # out = sum_i 2^(lse_i - m) o_i / sum_i 2^(lse_i - m); tiles of one split were written directly.
    seq, tok0, split = _extend_tile(tiles_ptr, qsl_ptr, TILED, TOKS, MAX_SPLITS)
    if (seq < 0) | (split != 0):
        return
    kvh = tl.program_id(1)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if tok0 >= q_len:
        return
    ctx = tl.load(seq_lens_ptr + seq) - q_len
    end = ctx + tl.minimum(tok0 + TOKS, q_len)
    n_split, lo, hi = _split_range(end, 0, MAX_SPLITS, SPLIT_TILES, BLOCK_N)
    if n_split == 1:
        return
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    r_tok = tok0 + r // GROUP
    r_head = kvh * GROUP + r % GROUP
    r_valid = (r < TOKS * GROUP) & (r_tok < q_len)
    row_mask = r_valid[:, None] & (d[None, :] < HEAD_DIM)
    row0 = ((q_start + r_tok).to(tl.int64) * NUM_HEADS + r_head) * MAX_SPLITS
    row_splits = tl.zeros([BLOCK_M], dtype=tl.int32) + n_split   # [BLOCK_M]
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in tl.static_range(MAX_SPLITS):
        lse = tl.load(part_lse_ptr + row0 + s, mask=r_valid & (row_splits > s), other=float("-inf"))
        m = tl.maximum(m, lse)
    m = tl.where(m == float("-inf"), 0.0, m)   # every split empty (cannot happen for a valid row: key 0)
    num = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in tl.static_range(MAX_SPLITS):
        live = r_valid & (row_splits > s)
        lse = tl.load(part_lse_ptr + row0 + s, mask=live, other=float("-inf"))
        w = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - m))
        o = tl.load(part_o_ptr + (row0 + s)[:, None] * HEAD_DIM + d[None, :],
                    mask=live[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        num += w[:, None] * o
        den += w
    den = tl.where(den > 0, den, 1.0)
    o_off = (q_start + r_tok).to(tl.int64)[:, None] * stride_ot + r_head[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + o_off, (num / den[:, None]).to(out_ptr.dtype.element_ty), mask=row_mask)


def paged_extend_attention(
    q: torch.Tensor,                # [T, Hq, D]: the new tokens of all sequences, flat
    k_cache: torch.Tensor,          # [NB, BS, Hkv, D], already holding the new tokens' K/V
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,     # [S, max_blocks] int32
    seq_lens: torch.Tensor,         # [S] int32: cached prefix + new tokens
    query_start_loc: torch.Tensor,  # [S + 1] int32
    max_query_len: int,             # host value: sizes the grid
    scale: float,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    tiles: torch.Tensor | None = None,  # [N] int32: seq << 16 | tile, -1 = none (extend_tiles); sizes the grid
    max_splits: int | None = None,      # KV splits a tile may take; None: extend_max_splits(T)
    split_tiles: int = EXTEND_SPLIT_TILES,  # least KV tiles (of block_n keys) a split covers
    max_seq_len: int | None = None,     # host value (eager only): no tile splits below 2 * split_tiles tiles
) -> torch.Tensor:
    """Causal attention of each new token (position seq_len - query_len + i) over its sequence's
    positions [0, own position]: the cached prefix plus the new tokens up to itself.

    With ``tiles`` the grid is (len(tiles), Hkv, splits) and ``max_query_len`` is not read: the work list comes
    from the device (tiles of ``extend_tile_tokens`` tokens, the default block_m), as CUDA graphs need."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert num_heads % num_kv_heads == 0 and k_cache.shape[3] == head_dim and q.stride(2) == 1
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    group = num_heads // num_kv_heads
    num_seqs = query_start_loc.shape[0] - 1
    if out is None:
        # a work list may leave rows uncomputed (a graph's padding tokens): zeros, not garbage, flow on from them
        out = (torch.empty if tiles is None else torch.zeros)(q.shape, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.stride(2) == 1
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_d = _block_d(head_dim)
    block_m = _extend_block_m(block_d, group, block_m)
    block_n = block_n or 64
    toks = block_m // group
    splits = extend_max_splits(num_tokens) if max_splits is None else max(1, int(max_splits))
    split_tiles = max(1, int(split_tiles))
    if tiles is None and max_seq_len is not None and max_seq_len < 2 * split_tiles * block_n:
        splits = 1   # no tile would split (_split_range): the same result without the partials
    if splits > 1:
        part_o = torch.empty((num_tokens, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_tokens, num_heads, splits), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    if tiles is not None:
        assert block_m == _extend_block_m(block_d, group, None), "tiles are built for the default block_m"
        assert tiles.dtype == torch.int32 and tiles.dim() == 1
        grid = (tiles.shape[0], num_kv_heads, splits)
        merge_grid = (tiles.shape[0], num_kv_heads, 1)
    else:
        n_tiles = triton.cdiv(max_query_len, toks)
        grid = (num_seqs, num_kv_heads, n_tiles * splits)
        merge_grid = grid   # (its programs of split != 0 exit at once)
    common = dict(NUM_HEADS=num_heads, GROUP=group, TOKS=toks, BLOCK_M=block_m, HEAD_DIM=head_dim,
                  BLOCK_D=block_d, BLOCK_N=block_n, TILED=tiles is not None, MAX_SPLITS=splits,
                  SPLIT_TILES=split_tiles)
    tiles_arg = tiles if tiles is not None else seq_lens
    _extend_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, tiles_arg, part_o, part_lse,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        scale * _LOG2E, BLOCK_SIZE=block_size, IEEE=_ieee_dot(k_cache.dtype),
        num_warps=4 if block_m * block_d <= 64 * 128 else 8, **common,
    )
    if splits > 1:
        _extend_merge_kernel[merge_grid](
            seq_lens, query_start_loc, out, tiles_arg, part_o, part_lse, out.stride(0), out.stride(1),
            num_warps=4, **common)
    return out


def _extend_block_m(block_d: int, group: int, block_m: int | None) -> int:
    """Query rows (tokens x heads of a group) of one extend program."""
    return max(block_m or (64 if block_d >= 128 else 128), triton.next_power_of_2(group), 16)


def extend_tile_tokens(num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """New tokens per tile of ``paged_extend_attention`` with its default block_m: what a ``tiles`` list
    counts in (a sequence of q new tokens has cdiv(q, this) tiles)."""
    group = num_heads // num_kv_heads
    return _extend_block_m(_block_d(head_dim), group, None) // group


__all__ = ["extend_tile_tokens", "paged_extend_attention"]
