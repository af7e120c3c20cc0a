"""Sampling without a vocabulary sort: one kernel that turns logits into (token, logprob) per row.

Same semantics as ``engine.sampling`` (the torch reference and test oracle): per row ``s = logits / T``;
greedy rows (T = 0 here) take the first argmax; sampled rows draw from ``softmax(s)`` restricted to
F = top_k -> top_p (over the top-k survivors, renormalised) -> min_p; every row returns the logprob of
its token under the FULL ``log_softmax(s)`` (T = 1 for greedy) and that row's log-sum-exp.

Every filter keeps an *upper set* of the row's values (all tokens with ``s >= `` some threshold), and so
does their intersection F. That is what lets the kernel avoid sorting:

- top_k: the k-th largest value is found exactly by a radix select over the order-preserving uint32 key of
  each fp32 value, 8 bits a pass (256-bin histograms); it stops early when a bucket holds exactly the tokens
  still needed, or when every key of the row has zero bits below the digit (bf16 logits at T = 1: 2 passes).
  K = {key >= threshold}: ties at the k-th value are kept, as in the reference.
- top_p and min_p by rejection: draw a candidate j from softmax(s) restricted to a superset of F (Gumbel-max,
  i.e. the exponential race of the reference); accept it when it is in F. If it is not, no token with
  ``s <= s_j`` is in F either (F is an upper set), so the next candidate is drawn from ``s > s_j``. Each round
  draws with fresh noise from a superset of F, so the accepted token has probability p_i / p(F) exactly.
  j is in the top-p set iff the mass of the tokens strictly above it is < top_p * mass(K) (one pass); a
  round accepts with probability >= p(F) / p(superset) >= top_p, and the superset shrinks after every
  rejection, so top_p = 0.95 takes ~1.05 rounds. Ties at the top-p boundary are all kept (the reference's
  sort keeps an arbitrary subset of them).
- plain temperature: the Gumbel-max draw happens in the first pass, beside the max and the sum of exps:
  one read of the logits.

Passes over a row (each a read of its logits, mostly from L2): T only: 1; top_p: 2 (+2 per rejection);
top_k with bf16 logits at T = 1: 4 (max/sum/first digit, second digit, candidate + mass(K), top-p check).

Noise: token i of a row in round r uses SplitMix64 at position i of the stream keyed by
``mix(mix(w0, w1, w2, w3), r)``, where the words are (seed, sample_index, step, 0) for a seeded row
(``engine.sampling.mix64``'s chain) and (sampler seed, call, row, 1) for an unseeded one: a seeded row's
draws depend on nothing else in the batch. Uniforms have 23 bits, (0, 1) open; E = -log(u) is computed
without the cancellation of log near 1 (E small is where a token's race is decided).

Layout: a program handles BLOCK_R rows (their state in [BLOCK_R] vectors, every reduction along the
vocabulary axis), in tiles of BLOCK_V columns. On the GPU BLOCK_R = 1: a row's result (token, logprob, the
order of every sum) depends on nothing but its own logits and parameters, whatever the batch. Tests under
``TRITON_INTERPRET=1`` use many rows a program (the interpreter pays per operation, not per element);
the per-row results are the same for any BLOCK_R.

No host sync, a grid fixed by the number of rows: the launch can be captured in a CUDA graph (the round
loop is data dependent inside the kernel, bounded by ``MAX_ITERS``; a row still undecided there, with
probability far below 2**-60 for any top_p >= 0.01, falls back to its argmax, which is always in F).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import gdc_launch_dependents, gdc_wait, launch_options, use_pdl

# params: int64 [R, NUM_PARAMS] per row, floats as float64 bit patterns (engine.sampling_triton packs them):
#   0 temperature (0.0 = greedy)   1 top_p (>= 1 disables)   2 log(min_p) (-inf disables)
#   3 top_k (0 disables; 0 < top_k < vocab)   4..7 the noise words w0..w3 (see the module docstring)
NUM_PARAMS = 8
BLOCK_V = 4096
MAX_ITERS = 128       # candidate + check sweeps a row may take (rounds: half of it)


@triton.jit
def _mix(z):
    """SplitMix64's output function on uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _chain(h, v):
    """One step of ``engine.sampling.mix64``: h <- splitmix64(h ^ v)."""
    return _mix((h ^ v) + 0x9E3779B97F4A7C15)


@triton.jit
def _ordered_key(s):
    """fp32 -> uint32 with the same order (unsigned): sign flipped for s >= 0, all bits for s < 0; -0.0 -> +0.0."""
    b = s.to(tl.uint32, bitcast=True)
    b = tl.where(b == 0x80000000, 0, b)
    return tl.where((b >> 31) != 0, ~b, b | 0x80000000)


@triton.jit
def _race_key(s, stream, cols):
    """s - log(E) with E ~ Exp(1) drawn at ``cols`` of ``stream`` (SplitMix64 position cols + 1)."""
    z = stream + (cols.to(tl.uint64) + 1) * 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9                               # _mix, inlined (interpreter: a
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB                               # nested call costs ~0.7 ms)
    z = z ^ (z >> 31)
    # u in (0, 1) on a grid of 2**-23: u and 1 - u are exact in fp32 (24 bits would round r + 0.5)
    u = ((z >> 41).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    # E = -log(1 - u) (u uniform either way); for small u the series: log(1 - u) loses every digit there
    e = tl.where(u < 0.015625, u * (1.0 + u * (0.5 + u * 0.3333333333333333)), -tl.log(1.0 - u))
    return s - tl.log(e)


@triton.jit
def _load_scaled(logits_ptr, row_off, cols, mask, t):
    x = tl.load(logits_ptr + row_off + cols, mask=mask, other=float("-inf")).to(tl.float32)
    return x / t


@triton.jit
def _tile(logits_ptr, row_off, rmask, start, V, t, BLOCK_V: tl.constexpr):
    """Columns [start, start + BLOCK_V) of the program's rows -> (cols [1, BV], mask [BR, BV], s = x / T)."""
    cols = start + tl.arange(0, BLOCK_V)[None, :]
    mask = rmask[:, None] & (cols < V)
    return cols, mask, _load_scaled(logits_ptr, row_off, cols, mask, t)


@triton.jit
def _pick_bucket(hist, need, above):
    """Radix step: hist [BR, 256] counts (float32: exact below 2**24) of the still-matching keys by digit,
    need / above [BR] float32. -> (bucket holding the need-th largest key, count above that bucket, whether
    that bucket's keys are exactly the ones still needed)."""
    before = tl.cumsum(hist, 1) - hist                            # keys in buckets < b
    # above + (keys in buckets >= b) >= need  <=>  before <= above + total - need; true for a prefix of b
    b = tl.sum((before <= (above + tl.sum(hist, 1) - need)[:, None]).to(tl.int32), 1) - 1
    sel = tl.arange(0, 256)[None, :] == b[:, None]
    from_b = tl.sum(hist, 1) - tl.sum(tl.where(sel, before, 0.0), 1)   # keys in buckets >= b
    hist_b = tl.sum(tl.where(sel, hist, 0.0), 1)
    return b, above + from_b - hist_b, above + from_b == need


@triton.jit
def _sample_kernel(logits_ptr, stride_r, num_rows, V, params_ptr, token_ptr, out_ptr, lse_ptr,
                   BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, MAX_ITERS: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:  # see engine.kernels.pdl: the logits come from the previous kernel
        gdc_launch_dependents()
        gdc_wait()
    lrow = tl.arange(0, BLOCK_R)
    rows = tl.program_id(0) * BLOCK_R + lrow
    rmask = rows < num_rows
    row_off1 = rows.to(tl.int64) * stride_r                               # [BR]
    row_off = row_off1[:, None]                                           # [BR, 1]
    prow = params_ptr + rows.to(tl.int64) * 8
    temp = tl.load(prow + 0, mask=rmask, other=0).to(tl.float64, bitcast=True).to(tl.float32)
    top_p = tl.load(prow + 1, mask=rmask, other=0).to(tl.float64, bitcast=True).to(tl.float32)
    log_min_p = tl.load(prow + 2, mask=rmask, other=0).to(tl.float64, bitcast=True).to(tl.float32)
    top_k = tl.load(prow + 3, mask=rmask, other=0).to(tl.int32)
    h = tl.zeros([BLOCK_R], dtype=tl.uint64)
    for w in tl.static_range(4):
        h = _chain(h, tl.load(prow + 4 + w, mask=rmask, other=0).to(tl.uint64, bitcast=True))
    greedy = temp == 0.0
    t1 = tl.where(greedy, 1.0, temp)                                      # [BR]
    t = t1[:, None]
    sampled = rmask & ~greedy
    use_k = sampled & (top_k > 0)
    use_p = sampled & (top_p < 1.0)
    draw_now = sampled & ~use_k          # drawn in pass 1: K is the whole vocabulary
    any_draw_now = tl.max(draw_now.to(tl.int32), 0) > 0
    any_k = tl.max(use_k.to(tl.int32), 0) > 0
    stream0 = _chain(h, tl.zeros([BLOCK_R], dtype=tl.uint64))[:, None]

    # ---- pass 1: max, sum of exps, first argmax; the race of rows without top_k; top_k's first digit
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)                        # sum exp(s - m)
    arg = tl.zeros([BLOCK_R], dtype=tl.int32)
    best = tl.full([BLOCK_R], float("-inf"), tl.float32)
    cand = tl.zeros([BLOCK_R], dtype=tl.int32)
    hist = tl.zeros([BLOCK_R, 256], dtype=tl.float32)
    low24 = tl.zeros([BLOCK_R], dtype=tl.uint32)                         # max of key & 0xFFFFFF (etc.)
    low16 = tl.zeros([BLOCK_R], dtype=tl.uint32)
    low8 = tl.zeros([BLOCK_R], dtype=tl.uint32)
    for start in range(0, V, BLOCK_V):
        cols, mask, s = _tile(logits_ptr, row_off, rmask, start, V, t, BLOCK_V)
        cmax = tl.max(s, 1)
        arg = tl.where(cmax > m, start + tl.argmax(s, 1, tie_break_left=True), arg)
        new_m = tl.maximum(m, cmax)
        safe = tl.where(new_m == float("-inf"), 0.0, new_m)
        total = total * tl.exp(m - safe) + tl.sum(tl.exp(s - safe[:, None]), 1)
        m = new_m
        if any_draw_now:
            g = tl.where(mask & draw_now[:, None], _race_key(s, stream0, cols), float("-inf"))
            gmax = tl.max(g, 1)
            cand = tl.where(gmax > best, start + tl.argmax(g, 1, tie_break_left=True), cand)
            best = tl.maximum(best, gmax)
        if any_k:
            key = _ordered_key(s)
            kmask = mask & use_k[:, None]
            # one histogram for all the program's rows: bin = row * 256 + digit (an OR: the interpreter
            # checks every int32 add for overflow, slowly)
            bins = ((key >> 24) | (lrow.to(tl.uint32) << 8)[:, None]).to(tl.int32)
            hist += tl.reshape(tl.histogram(tl.reshape(bins, [BLOCK_R * BLOCK_V]), BLOCK_R * 256,
                                            mask=tl.reshape(kmask, [BLOCK_R * BLOCK_V])),
                               [BLOCK_R, 256]).to(tl.float32)
            low24 = tl.maximum(low24, tl.max(tl.where(kmask, key & 0xFFFFFF, 0), 1))
            low16 = tl.maximum(low16, tl.max(tl.where(kmask, key & 0xFFFF, 0), 1))
            low8 = tl.maximum(low8, tl.max(tl.where(kmask, key & 0xFF, 0), 1))

    # ---- top_k: radix select of the k-th largest key, K = {key >= thr}
    thr = tl.zeros([BLOCK_R], dtype=tl.uint32)                           # 0: every key (no top_k)
    prefix = tl.zeros([BLOCK_R], dtype=tl.uint32)
    need = top_k.to(tl.float32)
    above = tl.zeros([BLOCK_R], dtype=tl.float32)
    active = use_k
    if any_k:
        b, above_b, exact = _pick_bucket(hist, need, above)
        prefix = b.to(tl.uint32)
        above = above_b
        fin = active & (exact | (low24 == 0))
        thr = tl.where(fin, prefix << 24, thr)
        active = active & ~fin
    for d in tl.static_range(1, 4):
        if tl.max(active.to(tl.int32), 0) > 0:
            hist = tl.zeros([BLOCK_R, 256], dtype=tl.float32)
            for start in range(0, V, BLOCK_V):
                cols, mask, s = _tile(logits_ptr, row_off, rmask, start, V, t, BLOCK_V)
                key = _ordered_key(s)
                match = mask & active[:, None] & ((key >> (32 - 8 * d)) == prefix[:, None])
                bins = (((key >> (24 - 8 * d)) & 0xFF) | (lrow.to(tl.uint32) << 8)[:, None]).to(tl.int32)
                hist += tl.reshape(tl.histogram(tl.reshape(bins, [BLOCK_R * BLOCK_V]), BLOCK_R * 256,
                                                mask=tl.reshape(match, [BLOCK_R * BLOCK_V])),
                                   [BLOCK_R, 256]).to(tl.float32)
            b, above_b, exact = _pick_bucket(hist, need, above)
            prefix = tl.where(active, (prefix << 8) | b.to(tl.uint32), prefix)
            above = tl.where(active, above_b, above)
            if d == 1:
                rest_zero = low16 == 0
            elif d == 2:
                rest_zero = low8 == 0
            else:
                rest_zero = active
            fin = active & (exact | rest_zero)
            thr = tl.where(fin, prefix << (24 - 8 * d), thr)
            active = active & ~fin

    # ---- rounds: state 1 = needs a candidate, 2 = candidate to check against top_p, 0 = decided
    min_s = m + log_min_p                                                 # min_p: keep s >= max + log(min_p)
    cand_s = _load_scaled(logits_ptr, row_off1, cand, draw_now, t1)
    draws = draw_now.to(tl.int32)
    pivot = tl.full([BLOCK_R], float("-inf"), tl.float32)               # candidates come from s > pivot
    kmass = total                                                         # mass(K) in units of exp(s - m)
    need_kmass = use_k & use_p
    kmass = tl.where(need_kmass, 0.0, kmass)
    in_min = cand_s >= min_s
    state = tl.where(draw_now, tl.where(in_min, tl.where(use_p, 2, 0), 1), tl.where(use_k, 1, 0))
    pivot = tl.where(draw_now & ~in_min, cand_s, pivot)
    token = tl.where(draw_now & in_min, cand, arg)
    it = 0
    while (tl.max(state, 0) > 0) & (it < MAX_ITERS):
        drawing = state == 1
        checking = state == 2
        stream = _chain(h, draws.to(tl.uint64))[:, None]
        best = tl.full([BLOCK_R], float("-inf"), tl.float32)
        nxt = tl.zeros([BLOCK_R], dtype=tl.int32)
        mass_above = tl.zeros([BLOCK_R], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols, mask, s = _tile(logits_ptr, row_off, rmask, start, V, t, BLOCK_V)
            key = _ordered_key(s)
            in_k = mask & (key >= thr[:, None])
            allowed = in_k & drawing[:, None] & (s > pivot[:, None]) & (s >= min_s[:, None])
            if tl.max(allowed.to(tl.int32)) > 0:
                g = tl.where(allowed, _race_key(s, stream, cols), float("-inf"))
                gmax = tl.max(g, 1)
                nxt = tl.where(gmax > best, start + tl.argmax(g, 1, tie_break_left=True), nxt)
                best = tl.maximum(best, gmax)
            counted = in_k & (drawing & need_kmass)[:, None]                # K's mass, min_p aside
            if tl.max(counted.to(tl.int32)) > 0:
                kmass += tl.sum(tl.where(counted, tl.exp(s - m[:, None]), 0.0), 1)
            higher = mask & checking[:, None] & (s > cand_s[:, None])
            if tl.max(higher.to(tl.int32)) > 0:
                mass_above += tl.sum(tl.where(higher, tl.exp(s - m[:, None]), 0.0), 1)
        # a draw: the new candidate is in K and above min_p by construction (none found: numerically empty
        # support, take the argmax)
        found = drawing & (best > float("-inf"))
        cand = tl.where(found, nxt, cand)
        cand_s = tl.where(found, _load_scaled(logits_ptr, row_off1, nxt, found, t1), cand_s)
        token = tl.where(found & ~use_p, nxt, token)
        need_kmass = need_kmass & ~drawing
        draws += drawing.to(tl.int32)
        # a check: accepted iff the mass strictly above the candidate is < top_p * mass(K)
        accept = checking & (mass_above < top_p * kmass)
        token = tl.where(accept, cand, token)
        pivot = tl.where(checking & ~accept, cand_s, pivot)
        state = tl.where(found & use_p, 2, tl.where(drawing, 0, state))
        state = tl.where(checking, tl.where(accept, 0, 1), state)
        it += 1
    token = tl.where(state != 0, arg, token)                           # MAX_ITERS reached: the argmax

    lse = m + tl.log(total)
    lp = _load_scaled(logits_ptr, row_off1, token, rmask, t1) - lse
    tl.store(token_ptr + rows, token.to(tl.int64), mask=rmask)
    tl.store(out_ptr + rows, token.to(tl.float64), mask=rmask)
    tl.store(out_ptr + num_rows + rows, lp.to(tl.float64), mask=rmask)
    tl.store(lse_ptr + rows, lse, mask=rmask)


def sample_logits(logits: torch.Tensor, params: torch.Tensor, *, block_rows: int = 1, block_v: int | None = None,
                  max_iters: int = MAX_ITERS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [R, V] (any float dtype, vocab contiguous), params int64 [R, NUM_PARAMS] on the same device
    -> (token_ids [R] int64, [2, R] float64 of (token id, logprob), lse [R] float32 of s = logits / T).

    ``block_rows`` rows per program (1 on the GPU: batch invariance; more under the interpreter),
    ``block_v`` columns per tile (a power of two >= 16; default 4096, or the vocab's power of two if smaller),
    ``max_iters`` the cap on candidate + check sweeps (tests lower it to reach the fallback)."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float [rows, vocab] tensor, got {logits.dtype} {tuple(logits.shape)}")
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits: the vocab dimension must be contiguous")
    if vocab >= 2 ** 24:
        raise ValueError(f"logits: vocab {vocab} too large (token ids travel as float64 and int32; < 2**24)")
    if params.dtype != torch.int64 or tuple(params.shape) != (rows, NUM_PARAMS) or params.device != logits.device:
        raise ValueError(f"params must be int64 [{rows}, {NUM_PARAMS}] on {logits.device}, got {params.dtype} "
                         f"{tuple(params.shape)} on {params.device}")
    if block_v is None:
        block_v = min(BLOCK_V, max(16, triton.next_power_of_2(vocab)))
    if block_v < 16 or block_v & (block_v - 1) or block_rows < 1 or block_rows & (block_rows - 1):
        raise ValueError(f"block_v ({block_v}, >= 16) and block_rows ({block_rows}) must be powers of two")
    # Per-row results do not depend on block_rows: cap it at the batch and at Triton's largest tile.
    block_rows = min(block_rows, triton.next_power_of_2(rows), max(1, 2 ** 20 // max(block_v, 256)))
    params = params.contiguous()
    token_ids = torch.empty(rows, dtype=torch.int64, device=logits.device)
    out = torch.empty((2, rows), dtype=torch.float64, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return token_ids, out, lse
    pdl = use_pdl(logits)
    _sample_kernel[(triton.cdiv(rows, block_rows),)](
        logits, logits.stride(0), rows, vocab, params, token_ids, out, lse,
        BLOCK_R=block_rows, BLOCK_V=block_v, MAX_ITERS=max_iters, USE_PDL=pdl,
        num_warps=8 if block_v >= 2048 else 4, **launch_options(pdl))
    return token_ids, out, lse


__all__ = ["BLOCK_V", "MAX_ITERS", "NUM_PARAMS", "sample_logits"]
