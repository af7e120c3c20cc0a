"""Batch-invariant kernels (``EngineConfig.batch_invariant``): each token's result is computed by the same
instructions in the same order whatever else is in the batch, so a token decoded alone, inside a batch of 256,
in a prefill chunk or in a trainer's forward over the whole trajectory gets the same bits.

    matmul:     out[M, N] = x[M, K] @ w[N, K]^T (+ bias). One tile shape and K split per weight (chosen from N and K,
                never from M), each K range in tiles of BLOCK_K from its start up, fp32 accumulation, the ranges
                summed in order. A row's result depends only on that row: tensor cores compute each output
                element's dot product on its own.
    attention:  one program per (token, KV head): the token's queries of that KV head's group (padded to 16
                rows) against its sequence's keys at positions [0, ctx) in tiles of TILE absolute positions
                (tile j holds positions [j*TILE, (j+1)*TILE), gathered through the block table key by key, so
                the block size does not matter), online softmax in fp32 in tile order. The same program for
                decode, prefill, chunked prefill and a prefix-cache hit: only ctx differs, and it is the token's
                own position + 1. No split-K.
    logprobs:   one program per row: log_softmax(logits / T)[token] with the vocab read in chunks of BLOCK_V in
                order (online max and sum), fp32.

What this gives up against the default kernels: cuBLAS' shape-tuned GEMMs, the decode matrix-vector kernels, and
split-K in decode attention (long contexts at small batch use fewer SMs). docs/gpu.md has the figures.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Attention: keys per tile (absolute positions) and the most queries of one KV head's group (padded to 16 rows
# for tl.dot); the binary search for a token's sequence runs a fixed number of rounds (any batch up to 2**20).
TILE = 64
MAX_GROUP = 16
SEARCH_ROUNDS = 20
# Logprobs: vocab entries per chunk.
BLOCK_V = 2048


# ---------------------------------------------------------------------------------------------------- matmul
# Programs a matmul aims for along N and K together: one wave of an H100 / H200 (132 SMs). A constant, not the
# device's count, so the tiling (and the rounding) is the same on every card.
TARGET_PROGRAMS = 132


def matmul_config(n: int, k: int) -> tuple[int, int, int, int, int, int]:
    """-> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, k_splits) of an [*, k] @ [n, k]^T product. A function of
    the weight's shape only: the engine and a trainer's forward over the same weight get the same tiles and splits.

    A weight with few column tiles (small N) has its K range cut into ``k_splits`` ranges of at least 4 tiles, so a
    decode step of a few rows still spreads over the device; each range's fp32 partial goes to a buffer and the
    ranges are summed in order (``_split_sum_kernel``), so a row's result still depends on nothing else."""
    block_n = 128 if triton.cdiv(n, 128) >= 64 else 64 if triton.cdiv(n, 64) >= 32 else 32
    block_k = 64
    tiles = triton.cdiv(n, block_n)
    splits = 1
    if tiles < TARGET_PROGRAMS:
        splits = max(1, min(triton.cdiv(k, block_k) // 4, triton.cdiv(TARGET_PROGRAMS, tiles)))
    return 64, block_n, block_k, 4, 4, splits


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, k_per_split, stride_xm, stride_wn, stride_om, stride_os,
                   HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # NOTE: M is not specialized (Triton would compile M == 1 apart): one binary for every batch size.
    # Axis 0 walks the row tiles, so the programs that read one weight tile run together (it stays in L2).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        a = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < k_hi),
                    other=0.0)                                                        # [BM, BK]
        b = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < k_hi),
                    other=0.0)                                                        # [BK, BN]
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")   # float32 weights: no TF32 rounding
        else:
            acc = tl.dot(a, b, acc)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT:   # the fp32 partial of this K range: [split, M, N]
        tl.store(out_ptr + split * stride_os + rm[:, None] * stride_om + rn[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_sum_kernel(part_ptr, b_ptr, out_ptr, numel, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK: tl.constexpr):
    # out = ((p0 + p1) + p2) ... + bias, element by element, in split order
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLITS):
        acc += tl.load(part_ptr + s * numel + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None, config: tuple[int, ...] | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias [N]) -> [M, N] in ``out_dtype`` (default x's dtype), fp32 accumulation.
    ``config``: another (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, k_splits) than ``matmul_config``'s (benchmarks
    only: a different tiling is a different rounding)."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.stride(1) == 1, "weight must be [N, K], rows contiguous"
    assert x.dtype == weight.dtype, f"x is {x.dtype}, the weight {weight.dtype}"
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return out
    bm, bn, bk, warps, stages, splits = config or matmul_config(n, k)
    k_per_split = triton.cdiv(triton.cdiv(k, bk), splits) * bk   # whole K tiles per range
    splits = triton.cdiv(k, k_per_split)
    target = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else out
    bias_arg = bias if bias is not None else weight
    _matmul_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn), splits)](
        x, weight, bias_arg, target, m, n, k, k_per_split, x.stride(0), weight.stride(0), n if splits > 1 else
        out.stride(0), m * n, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, SPLIT=splits > 1,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    if splits > 1:
        block = 1024
        _split_sum_kernel[(triton.cdiv(m * n, block),)](target, bias_arg, out, m * n, n, SPLITS=splits,
                                                        HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return out


# ------------------------------------------------------------------------------------------------- attention
@triton.jit(do_not_specialize=["num_seqs"])
def _attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, qsl_ptr,
                      num_seqs, scale,
                      stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                      stride_ot, stride_oh, stride_bt,
                      GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr,
                      ROUNDS: tl.constexpr, IEEE: tl.constexpr):
    t = tl.program_id(0)
    kv_head = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    heads = kv_head * GROUP + g
    total = tl.load(qsl_ptr + num_seqs)
    if t < total:   # tokens past the step's own (padding of a graph bucket) are left alone
        # the sequence s with qsl[s] <= t < qsl[s + 1]: binary search, a fixed number of rounds
        lo = t * 0
        hi = t * 0 + num_seqs
        for _ in range(ROUNDS):   # invariant: qsl[lo] <= t < qsl[hi]; stable once hi == lo + 1
            mid = (lo + hi) // 2
            right = tl.load(qsl_ptr + mid) <= t
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid)
        s = lo.to(tl.int64)
        start = tl.load(qsl_ptr + s)
        query_len = tl.load(qsl_ptr + s + 1) - start
        # the token sits at position seq_len - query_len + (t - start) and sees keys [0, ctx)
        ctx = tl.load(seq_lens_ptr + s) - query_len + (t - start) + 1
        q = tl.load(q_ptr + t.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0)                 # [BG, BD]
        m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        for j in range(0, tl.cdiv(ctx, TILE)):
            pos = j * TILE + tl.arange(0, TILE)
            pmask = pos < ctx
            block = tl.load(block_tables_ptr + s * stride_bt + pos // BLOCK_SIZE, mask=pmask, other=0).to(tl.int64)
            off = (pos % BLOCK_SIZE).to(tl.int64)
            kv_mask = pmask[:, None] & dmask[None, :]
            k = tl.load(k_cache_ptr + block[:, None] * stride_kb + off[:, None] * stride_ks + kv_head * stride_kh
                        + d[None, :], mask=kv_mask, other=0.0)                        # [TILE, BD]
            v = tl.load(v_cache_ptr + block[:, None] * stride_vb + off[:, None] * stride_vs + kv_head * stride_vh
                        + d[None, :], mask=kv_mask, other=0.0)                        # [TILE, BD]
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(pmask[None, :], scores * scale, float("-inf"))        # [BG, TILE]
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]   # an empty context (a graph's padding row): 0
        tl.store(out_ptr + t.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, Hq, D] (the step's new tokens, flat in sequence order; their K/V already in the cache), caches
    [num_blocks, block_size, Hkv, D], block_tables [S, W] int32, seq_lens [S] int32 (context after the step),
    query_start_loc [S + 1] int32 -> [T, Hq, D]: causal attention of each token over its sequence."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    assert group * num_kv_heads == num_heads and group <= MAX_GROUP, f"GQA group {group} over {MAX_GROUP}"
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    _attention_kernel[(num_tokens, num_kv_heads)](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, seq_lens.shape[0], scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), block_tables.stride(0),
        GROUP=group, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_G=MAX_GROUP,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), TILE=TILE, ROUNDS=SEARCH_ROUNDS,
        IEEE=q.dtype == torch.float32, num_warps=4, num_stages=2)
    return out


# -------------------------------------------------------------------------------------------------- logprobs
@triton.jit
def _logprob_kernel(logits_ptr, stride_r, tokens_ptr, temps_ptr, out_ptr, V, BLOCK_V: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    inv_t = 1.0 / tl.load(temps_ptr + r)
    m = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_V,), dtype=tl.float32)
    # lane-wise online max and sum over the chunks in vocab order, then one fixed tree over the lanes
    for c in range(0, V, BLOCK_V):
        offs = c + tl.arange(0, BLOCK_V)
        x = tl.load(logits_ptr + r * stride_r + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    big = tl.max(m, 0)
    lse = big + tl.log(tl.sum(s * tl.exp(m - big), 0))
    tok = tl.load(tokens_ptr + r)
    x_tok = tl.load(logits_ptr + r * stride_r + tok).to(tl.float32) * inv_t
    tl.store(out_ptr + r, x_tok - lse)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """logits [R, V], tokens [R] int64, temperatures [R] float32 -> [R] float32 log_softmax(logits / T)[token]."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1 and tokens.shape == (rows,) and temperatures.shape == (rows,)
    out = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _logprob_kernel[(rows,)](logits, logits.stride(0), tokens, temperatures, out, vocab, BLOCK_V=BLOCK_V,
                                 num_warps=4)
    return out


__all__ = ["matmul", "matmul_config", "paged_attention", "token_logprobs", "TILE", "MAX_GROUP"]
