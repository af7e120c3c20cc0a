"""Sampling without a vocabulary sort: one kernel that turns logits into (token, logprob) per row.

Same semantics as ``engine.sampling`` (the torch reference and test oracle): per row ``s = logits / T``;
greedy rows (T = 0 here) take the first argmax; sampled rows draw from ``softmax(s)`` restricted to
F = top_k -> top_p (over the top-k survivors, renormalised) -> min_p; every row returns the logprob of
its token under the FULL ``log_softmax(s)`` (T = 1 for greedy) and that row's log-sum-exp.

Every filter keeps an *upper set* of the row's values (all tokens with ``s >= `` some threshold), and so
does their intersection F. That is what lets the kernel avoid sorting:

- pass 1 reads the logits once, lane-local (lane l of a tile of BLOCK_V columns sees columns l, l + BLOCK_V,
  ...; nothing is reduced across lanes until the end): the max and its first index, the sum of exps, the
  Gumbel-max race of rows without top_k, and for top_k rows each lane's three largest values (with their
  indices) and the largest value it dropped.
- top_k: the k-th largest value is found exactly by a radix select over the order-preserving uint32 keys,
  8 bits a step (256-bin histograms), stopping early when a bucket holds exactly the keys still needed or no
  key has bits left below the digit (bf16 logits at T = 1: 2 steps). It runs over the lanes' three largest
  values, in registers: that is the row's k-th largest whenever every dropped value is below it (a lane held
  4 of the top k otherwise: probability ~ C(k, 4) / BLOCK_V**3, 3e-5 for k = 50); if not, over the logits, a
  pass a digit. K = {key >= threshold}: ties at the k-th value are kept, as in the reference.
- top_p and min_p by rejection: draw a candidate j from softmax(s) restricted to a superset of F (the
  exponential race of the reference); accept it when it is in F. If it is not, no token with ``s <= s_j`` is
  in F either (F is an upper set), so the next candidate is drawn from ``s > s_j``. Each round draws with
  fresh noise from a superset of F, so the accepted token has probability p_i / p(F) exactly. j is in the
  top-p set iff the mass of the tokens strictly above it is < top_p * mass(K); a round accepts with
  probability >= p(F) / p(superset) >= top_p, and the superset shrinks after every rejection, so top_p = 0.95
  takes ~1.05 rounds. Ties at the top-p boundary are all kept (the reference's sort keeps an arbitrary subset
  of them). With top_k (decided from the lanes) the rounds run over the lanes' values, in registers: K is
  among them. Without, a round is a pass over the logits.

Passes over a row's logits: T only, or top_k (+ top_p, min_p): 1; top_p or min_p without top_k: 2 (+1 per
rejection).

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
BLOCK_V = 2048
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
def _digit_hist(key, match, lrow, SHIFT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """[BR, 256] float32 counts of the digit (key >> SHIFT) & 0xFF over the keys where ``match``: one histogram
    for the program's rows, bin = row * 256 + digit (an OR: the interpreter checks every int32 add, slowly)."""
    bins = (((key >> SHIFT) & 0xFF) | (lrow.to(tl.uint32) << 8)[:, None]).to(tl.int32)
    h = tl.histogram(tl.reshape(bins, [BLOCK_R * BLOCK_V]), BLOCK_R * 256,
                     mask=tl.reshape(match, [BLOCK_R * BLOCK_V]))
    return tl.reshape(h, [BLOCK_R, 256]).to(tl.float32)


@triton.jit
def _digit_match(key, ok, prefix, SHIFT: tl.constexpr):
    """Keys still in the running: ``ok`` and, past the first digit, the digits chosen so far (``prefix``)."""
    if SHIFT == 24:
        match = ok
    else:
        match = ok & ((key >> (SHIFT + 8)) == prefix[:, None])
    return match


@triton.jit
def _radix_step(hist, need, above, prefix, thr, active, rest_zero, SHIFT: tl.constexpr):
    """Choose the digit (key >> SHIFT) & 0xFF of the need-th largest key. Rows decided here (the bucket holds
    exactly the keys still needed, no lower bits left, or the last digit) get thr = prefix << SHIFT."""
    b, above_b, exact = _pick_bucket(hist, need, above)
    prefix = tl.where(active, (prefix << 8) | b.to(tl.uint32), prefix)
    above = tl.where(active, above_b, above)
    fin = active & (exact | rest_zero)
    thr = tl.where(fin, prefix << SHIFT, thr)
    return above, prefix, thr, active & ~fin


@triton.jit
def _low_bits(key, ok, SHIFT: tl.constexpr):
    """[BR]: the largest value of the key bits below digit (key >> SHIFT) & 0xFF among ``ok`` (0: none set)."""
    return tl.max(tl.where(ok, key & ((1 << SHIFT) - 1), 0), 1)


@triton.jit
def _lower_insert(s, cols, v1, i1, v2, i2, v3, i3, v4):
    """Per lane, before (v1, i1) takes s: keep (v1, i1) >= (v2, i2) >= (v3, i3) the three largest values (the
    earliest index first among equals) and v4 the largest value dropped. -> the new (v2, i2, v3, i3, v4)."""
    g1 = s > v1
    g2 = s > v2
    g3 = s > v3
    v4 = tl.maximum(v4, tl.where(g3, v3, s))
    v3n = tl.where(g2, v2, tl.where(g3, s, v3))
    i3n = tl.where(g2, i2, tl.where(g3, cols, i3))
    v2n = tl.where(g1, v1, tl.where(g2, s, v2))
    i2n = tl.where(g1, i1, tl.where(g2, cols, i2))
    return v2n, i2n, v3n, i3n, v4


@triton.jit
def _race_best(g, idx):
    """[BR]: the best race key and the lowest index holding it."""
    best = tl.max(g, 1)
    return best, tl.min(tl.where(g == best[:, None], idx, 2147483647), 1)


@triton.jit
def _slot_round(v, idx, thr, drawing, pivot, min_s, checking, cand_s, m, stream):
    """One lane slot of the register rounds: the race over its entries in the candidate set, and its mass
    strictly above the candidate."""
    ok = idx >= 0
    allowed = ok & (_ordered_key(v) >= thr[:, None]) & drawing[:, None] & (v > pivot[:, None]) \
        & (v >= min_s[:, None])
    g = tl.where(allowed, _race_key(v, stream, idx), float("-inf"))
    best, nxt = _race_best(g, idx)
    above = tl.sum(tl.where(ok & checking[:, None] & (v > cand_s[:, None]), tl.exp(v - m[:, None]), 0.0), 1)
    return best, nxt, above


@triton.jit
def _lane_topk(v1, i1, v2, i2, v3, i3, v4, use_k, need, lrow, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """top_k over the lanes' three largest values: radix select of the need-th largest key among them ->
    (thr, fast): fast where that is the row's k-th largest key (every dropped value v4 is below it)."""
    thr = tl.zeros([BLOCK_R], dtype=tl.uint32)
    ka, kb, kc = _ordered_key(v1), _ordered_key(v2), _ordered_key(v3)
    oa, ob, oc = (i1 >= 0) & use_k[:, None], (i2 >= 0) & use_k[:, None], (i3 >= 0) & use_k[:, None]
    # a row with fewer finite values than k keeps all of them (the -inf ones have probability 0)
    need_u = tl.minimum(need, tl.sum(oa.to(tl.float32) + ob.to(tl.float32) + oc.to(tl.float32), 1))
    prefix = tl.zeros([BLOCK_R], dtype=tl.uint32)
    above = tl.zeros([BLOCK_R], dtype=tl.float32)
    active = use_k
    for d in tl.static_range(4):
        if tl.max(active.to(tl.int32), 0) > 0:
            SHIFT = 24 - 8 * d
            hist = _digit_hist(ka, _digit_match(ka, oa, prefix, SHIFT), lrow, SHIFT, BLOCK_R, BLOCK_V)
            hist += _digit_hist(kb, _digit_match(kb, ob, prefix, SHIFT), lrow, SHIFT, BLOCK_R, BLOCK_V)
            hist += _digit_hist(kc, _digit_match(kc, oc, prefix, SHIFT), lrow, SHIFT, BLOCK_R, BLOCK_V)
            if SHIFT == 0:
                rest_zero = active
            else:
                rest_zero = (_low_bits(ka, oa, SHIFT) | _low_bits(kb, ob, SHIFT) | _low_bits(kc, oc, SHIFT)) == 0
            above, prefix, thr, active = _radix_step(hist, need_u, above, prefix, thr, active, rest_zero, SHIFT)
    fast = use_k & (_ordered_key(tl.max(v4, 1)) < thr)
    thr = tl.where(fast, thr, 0)
    return thr, fast


@triton.jit
def _lane_kmass(v, idx, thr, m):
    """[BR]: the mass (units of exp(s - m)) of one lane slot's values in K."""
    ink = (_ordered_key(v) >= thr[:, None]) & (idx >= 0)
    return tl.sum(tl.where(ink, tl.exp(v - m[:, None]), 0.0), 1)


@triton.jit
def _lane_round(v1, i1, v2, i2, v3, i3, thr, drawing, pivot, min_s, checking, cand_s, m, stream):
    """A round over the lanes' values of fast top_k rows: (best race key, its token, mass above the candidate)."""
    ba, na, ma = _slot_round(v1, i1, thr, drawing, pivot, min_s, checking, cand_s, m, stream)
    bb, nb, mb = _slot_round(v2, i2, thr, drawing, pivot, min_s, checking, cand_s, m, stream)
    bc, nc, mc = _slot_round(v3, i3, thr, drawing, pivot, min_s, checking, cand_s, m, stream)
    best = tl.maximum(tl.maximum(ba, bb), bc)
    nxt = tl.minimum(tl.minimum(tl.where(ba == best, na, 2147483647), tl.where(bb == best, nb, 2147483647)),
                     tl.where(bc == best, nc, 2147483647))
    return best, nxt, ma + mb + mc


@triton.jit
def _sample_kernel(logits_ptr, stride_r, num_rows, V, params_ptr, token_ptr, out_ptr, lse_ptr,
                   BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, MAX_ITERS: tl.constexpr,
                   LANE_TOPK: tl.constexpr, USE_PDL: tl.constexpr):
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
    need = tl.load(prow + 3, mask=rmask, other=0).to(tl.float32)        # top_k (exact: < 2**24)
    h = tl.zeros([BLOCK_R], dtype=tl.uint64)
    for w in tl.static_range(4):
        h = _chain(h, tl.load(prow + 4 + w, mask=rmask, other=0).to(tl.uint64, bitcast=True))
    greedy = temp == 0.0
    t1 = tl.where(greedy, 1.0, temp)                                      # [BR]
    t = t1[:, None]
    sampled = rmask & ~greedy
    use_k = sampled & (need > 0)
    use_p = sampled & (top_p < 1.0)
    draw_now = sampled & ~use_k          # drawn in pass 1: K is the whole vocabulary
    any_draw_now = tl.max(draw_now.to(tl.int32), 0) > 0
    any_k = tl.max(use_k.to(tl.int32), 0) > 0
    stream0 = _chain(h, tl.zeros([BLOCK_R], dtype=tl.uint64))[:, None]

    # ---- pass 1, lane-local (a lane: columns l, l + BV, ...; reduced once at the end): the max and its first
    # index, the sum of exps, the race of the rows without top_k, the three largest values of the top_k rows
    v1 = tl.full([BLOCK_R, BLOCK_V], float("-inf"), tl.float32)
    i1 = tl.full([BLOCK_R, BLOCK_V], -1, tl.int32)
    lsum = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.float32)                 # sum of exp(s - v1) in the lane
    gb = tl.full([BLOCK_R, BLOCK_V], float("-inf"), tl.float32)
    gi = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.int32)
    v2 = tl.full([BLOCK_R, BLOCK_V], float("-inf"), tl.float32)
    i2 = tl.full([BLOCK_R, BLOCK_V], -1, tl.int32)
    v3 = tl.full([BLOCK_R, BLOCK_V], float("-inf"), tl.float32)
    i3 = tl.full([BLOCK_R, BLOCK_V], -1, tl.int32)
    v4 = tl.full([BLOCK_R, BLOCK_V], float("-inf"), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols, mask, s = _tile(logits_ptr, row_off, rmask, start, V, t, BLOCK_V)
        new = tl.maximum(v1, s)
        safe = tl.where(new == float("-inf"), 0.0, new)
        lsum = lsum * tl.exp(v1 - safe) + tl.exp(s - safe)
        if any_draw_now:
            g = tl.where(mask & draw_now[:, None], _race_key(s, stream0, cols), float("-inf"))
            gi = tl.where(g > gb, cols, gi)
            gb = tl.maximum(gb, g)
        if LANE_TOPK:
            if any_k:
                v2, i2, v3, i3, v4 = _lower_insert(s, cols, v1, i1, v2, i2, v3, i3, v4)
        i1 = tl.where(s > v1, cols, i1)
        v1 = new
    m = tl.max(v1, 1)
    arg = tl.min(tl.where(v1 == m[:, None], i1, 2147483647), 1)
    total = tl.sum(tl.where(v1 == float("-inf"), 0.0, lsum * tl.exp(v1 - m[:, None])), 1)   # sum exp(s - m)
    best, cand = _race_best(gb, gi)

    # ---- top_k: the k-th largest key by radix select, K = {key >= thr}. First over the lanes' three largest
    # values (registers): exact when every value a lane dropped is below it ("fast"), which fails with
    # probability ~ lanes * C(k, 4) / lanes**4 (2.7e-5 for k = 50). Else over the logits, a pass a digit.
    thr = tl.zeros([BLOCK_R], dtype=tl.uint32)                           # 0: every key (no top_k)
    fast = rows < 0                                                       # all False
    if LANE_TOPK:
        if any_k:
            thr, fast = _lane_topk(v1, i1, v2, i2, v3, i3, v4, use_k, need, lrow, BLOCK_R, BLOCK_V)
    slow = use_k & ~fast
    if tl.max(slow.to(tl.int32), 0) > 0:
        prefix = tl.zeros([BLOCK_R], dtype=tl.uint32)
        above = tl.zeros([BLOCK_R], dtype=tl.float32)
        active = slow
        low24 = tl.zeros([BLOCK_R], dtype=tl.uint32)
        low16 = tl.zeros([BLOCK_R], dtype=tl.uint32)
        low8 = tl.zeros([BLOCK_R], dtype=tl.uint32)
        for d in tl.static_range(4):
            if tl.max(active.to(tl.int32), 0) > 0:
                SHIFT = 24 - 8 * d
                hist = tl.zeros([BLOCK_R, 256], dtype=tl.float32)
                for start in range(0, V, BLOCK_V):
                    cols, mask, s = _tile(logits_ptr, row_off, rmask, start, V, t, BLOCK_V)
                    key = _ordered_key(s)
                    match = _digit_match(key, mask & active[:, None], prefix, SHIFT)
                    hist += _digit_hist(key, match, lrow, SHIFT, BLOCK_R, BLOCK_V)
                    if SHIFT == 24:
                        low24 = tl.maximum(low24, _low_bits(key, match, 24))
                        low16 = tl.maximum(low16, _low_bits(key, match, 16))
                        low8 = tl.maximum(low8, _low_bits(key, match, 8))
                if SHIFT == 24:
                    rest_zero = low24 == 0
                elif SHIFT == 16:
                    rest_zero = low16 == 0
                elif SHIFT == 8:
                    rest_zero = low8 == 0
                else:
                    rest_zero = active
                above, prefix, thr, active = _radix_step(hist, need, above, prefix, thr, active, rest_zero, SHIFT)

    # ---- rounds: state 1 = needs a candidate, 2 = candidate to check against top_p, 0 = decided. Fast top_k
    # rows run them over their lanes' values (registers), the others over the logits (a pass a round).
    min_s = m + log_min_p                                                 # min_p: keep s >= max + log(min_p)
    cand_s = _load_scaled(logits_ptr, row_off1, cand, draw_now, t1)
    draws = draw_now.to(tl.int32)
    pivot = tl.full([BLOCK_R], float("-inf"), tl.float32)               # candidates come from s > pivot
    kmass = total                                                         # mass(K) in units of exp(s - m)
    need_kmass = slow & use_p                                             # summed in the first memory draw
    kmass = tl.where(need_kmass, 0.0, kmass)
    if LANE_TOPK:
        if tl.max(fast.to(tl.int32), 0) > 0:
            kmass = tl.where(fast, _lane_kmass(v1, i1, thr, m) + _lane_kmass(v2, i2, thr, m)
                             + _lane_kmass(v3, i3, thr, m), kmass)
    in_min = cand_s >= min_s
    state = tl.where(draw_now, tl.where(in_min, tl.where(use_p, 2, 0), 1), tl.where(use_k, 1, 0))
    pivot = tl.where(draw_now & ~in_min, cand_s, pivot)
    token = tl.where(draw_now & in_min, cand, arg)
    if MAX_ITERS > 0:   # (a loop capped at 0 is not emitted: Triton 3.6 failed to compile it for sm_90)
        it = 0
        while (tl.max(state, 0) > 0) & (it < MAX_ITERS):
            drawing = state == 1
            checking = state == 2
            stream = _chain(h, draws.to(tl.uint64))[:, None]
            best = tl.full([BLOCK_R], float("-inf"), tl.float32)
            nxt = tl.zeros([BLOCK_R], dtype=tl.int32)
            mass_above = tl.zeros([BLOCK_R], dtype=tl.float32)
            draw_mem = drawing & ~fast
            check_mem = checking & ~fast
            if tl.max((draw_mem | check_mem).to(tl.int32), 0) > 0:
                any_draw = tl.max(draw_mem.to(tl.int32), 0) > 0
                any_kmass = tl.max((draw_mem & need_kmass).to(tl.int32), 0) > 0
                any_check = tl.max(check_mem.to(tl.int32), 0) > 0
                rb = tl.full([BLOCK_R, BLOCK_V], float("-inf"), tl.float32)
                ri = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.int32)
                lk = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.float32)
                la = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.float32)
                for start in range(0, V, BLOCK_V):
                    cols, mask, s = _tile(logits_ptr, row_off, rmask, start, V, t, BLOCK_V)
                    in_k = mask & (_ordered_key(s) >= thr[:, None])
                    if any_draw:
                        allowed = in_k & draw_mem[:, None] & (s > pivot[:, None]) & (s >= min_s[:, None])
                        g = tl.where(allowed, _race_key(s, stream, cols), float("-inf"))
                        ri = tl.where(g > rb, cols, ri)
                        rb = tl.maximum(rb, g)
                    if any_kmass:
                        lk += tl.where(in_k & (draw_mem & need_kmass)[:, None], tl.exp(s - m[:, None]), 0.0)
                    if any_check:
                        la += tl.where(mask & check_mem[:, None] & (s > cand_s[:, None]), tl.exp(s - m[:, None]), 0.0)
                best, nxt = _race_best(rb, ri)
                kmass += tl.sum(lk, 1)
                mass_above = tl.sum(la, 1)
            if LANE_TOPK:
                if tl.max(((drawing | checking) & fast).to(tl.int32), 0) > 0:
                    bf, nf, mf = _lane_round(v1, i1, v2, i2, v3, i3, thr, drawing & fast, pivot, min_s, checking & fast,
                                             cand_s, m, stream)
                    best = tl.where(fast, bf, best)
                    nxt = tl.where(fast, nf, nxt)
                    mass_above = tl.where(fast, mf, mass_above)
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
                  max_iters: int = MAX_ITERS, lane_topk: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [R, V] (any float dtype, vocab contiguous), params int64 [R, NUM_PARAMS] on the same device
    -> (token_ids [R] int64, [2, R] float64 of (token id, logprob), lse [R] float32 of s = logits / T).

    ``block_rows`` rows per program (1 on the GPU: batch invariance; more under the interpreter),
    ``block_v`` columns per tile (a power of two >= 16; default BLOCK_V, or on the CPU the vocab's power of two if smaller),
    ``max_iters`` the cap on candidate + check sweeps, ``lane_topk=False`` top-k over the logits only (tests
    lower / set them to reach the fallbacks)."""
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
    if block_v is None:   # on CUDA one tile width for every vocab: one compiled kernel
        block_v = BLOCK_V if logits.is_cuda else min(BLOCK_V, max(16, triton.next_power_of_2(vocab)))
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
        BLOCK_R=block_rows, BLOCK_V=block_v, MAX_ITERS=max_iters, LANE_TOPK=lane_topk,
        USE_PDL=pdl, num_warps=8 if block_v >= 2048 else 4, **launch_options(pdl))
    return token_ids, out, lse


__all__ = ["BLOCK_V", "MAX_ITERS", "NUM_PARAMS", "sample_logits"]
