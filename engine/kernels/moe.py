"""The fused MoE path: tokens sorted by expert and one grouped matrix product per projection, with no host sync.

    ids [T, k] -> the T*k (token, slot) pairs sorted by expert (stable: each expert's rows in token order)
    per expert e: its rows are a run of the sorted list; the run is cut into tiles of block_m rows (16-128, by the
                  mean rows per expert: block_m_for)
    grouped matmul:  for every tile, out[rows] = x[token of each row] @ W[e]^T     (gate_up, then down)
    combine:         out[t] = sum over j of w[t, j] * y[sorted row of slot (t, j)], in slot order, in fp32 (one kernel)

The tile table (expert, first row, end row of each tile) is built on the device from the expert counts, over a fixed
upper bound of tiles (cdiv(T*k, block_m) + E): a program past the real tile count returns at once. Up to
SORT_KERNEL_MAX_SLOTS slots one program does it (a register sort, a histogram, cumsums); beyond, torch's device
sort, a scatter-add, cumsums and a searchsorted (tile_table). So the launch grid depends only on T, k and E, and
nothing waits for the device: the path can be captured in a CUDA graph. The SiLU-and-mul between the two products is ``engine.kernels.elementwise``'s.

Checked against the torch block (``engine.models.moe.SparseMoE``) under TRITON_INTERPRET=1 (tests/engine/
test_moe_kernel.py). The sums differ from the torch block's order (the k slots are combined in fp32 here, by expert
there), so the two agree to rounding, not bitwise.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)

# set by a kernel's first failure (it would not build under this Triton, say): its torch fallback from then on
_route_kernel_failed = False
_sort_kernel_failed = False

BLOCK_M = 16   # the smallest tile (decode); block_m_for picks larger ones as experts get more rows


def block_m_for(num_rows: int, num_experts: int) -> int:
    """Rows per tile for ``num_rows`` (token, slot) pairs over ``num_experts``: a tile reads its expert's whole
    weight slice, so an expert's weights are read once per tile it has. The smallest of 16-128 rows that holds
    twice the mean row count: the counts spread around the mean (at decode batch 256 over 128 experts with top-8,
    a mean of 16, 16-row tiles read the weights ~1.6 times on the H200 run), and prefill chunks would otherwise
    re-read each expert's weights tens of times."""
    mean = num_rows / num_experts
    for bm in (16, 32, 64):
        if 2 * mean <= bm:
            return bm
    return 128


@triton.jit
def _grouped_matmul_kernel(x_ptr, w_ptr, out_ptr, rows_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                           num_tiles_ptr, N, K, stride_xm, stride_we, stride_wn, stride_om,
                           GATHER: tl.constexpr, TOP_K: tl.constexpr, IEEE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    if tile < tl.load(num_tiles_ptr):
        e = tl.load(tile_expert_ptr + tile).to(tl.int64)
        r0 = tl.load(tile_start_ptr + tile)
        r1 = tl.load(tile_end_ptr + tile)
        rm = r0 + tl.arange(0, BLOCK_M)                       # sorted rows of this tile
        mmask = rm < r1
        if GATHER:   # the token each sorted row reads: its slot t*k + j over k
            src = (tl.load(rows_ptr + rm, mask=mmask, other=0) // TOP_K).to(tl.int64)
        else:
            src = rm.to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(x_ptr + src[:, None] * stride_xm + kk[None, :], mask=mmask[:, None] & (kk[None, :] < K),
                        other=0.0)                                                    # [BM, BK]
            b = tl.load(w_ptr + e * stride_we + rn[None, :] * stride_wn + kk[:, None],
                        mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)       # [BK, BN]
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mmask[:, None] & (rn[None, :] < N))


@dataclass(frozen=True)
class TileConfig:
    """The grouped product's tiling: None picks the default (block_m_for's rows; 64 columns, 32 under 64; K steps
    of 64; 4 warps up to 32 rows, else 8; Triton's default pipeline depth). benchmarks/moe_gpu.py --sweep times
    alternatives."""
    block_m: Optional[int] = None
    block_n: Optional[int] = None
    block_k: int = 64
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None


def _grouped_matmul(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, rows, tiles, gather: bool,
                    block_m: int = BLOCK_M, top_k: int = 1, config: TileConfig = TileConfig()) -> None:
    """out[r] = x[rows[r] // top_k if gather else r] @ w[expert of r's tile]^T for every sorted row r (``rows``: the
    sorted slots t*k + j); w [E, N, K]; the tile table was built for ``block_m`` rows per tile."""
    tile_expert, tile_start, tile_end, num_tiles = tiles
    _, n, k = w.shape
    assert w.stride(2) == 1 and x.stride(1) == 1 and out.stride(1) == 1
    block_n = config.block_n or (64 if n >= 64 else 32)
    extra = {"num_stages": config.num_stages} if config.num_stages else {}
    _grouped_matmul_kernel[(tile_expert.shape[0], triton.cdiv(n, block_n))](
        x, w, out, rows if gather else tile_start, tile_expert, tile_start, tile_end, num_tiles, n, k,
        x.stride(0), w.stride(0), w.stride(1), out.stride(0),
        GATHER=gather, TOP_K=top_k, IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=config.block_k, num_warps=config.num_warps or (4 if block_m <= 32 else 8), **extra)


@triton.jit
def _combine_kernel(y_ptr, pos_ptr, w_ptr, out_ptr, H, stride_y, stride_o,
                    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum over j of w[t, j] * y[pos[t*k + j]], in slot order, in float32: one program per (token, block
    of H)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = h < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(pos_ptr + t * TOP_K + j).to(tl.int64)
        wj = tl.load(w_ptr + t * TOP_K + j).to(tl.float32)
        acc += wj * tl.load(y_ptr + row * stride_y + h, mask=hmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + h, acc.to(out_ptr.dtype.element_ty), mask=hmask)


def tile_table(ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M):
    """ids [T, k] -> (order [T*k]: sorted slot indices, (tile_expert, tile_start, tile_end) [max_tiles] int32 each,
    num_tiles [1] int32), all on ids' device, without a host read."""
    flat = ids.reshape(-1)
    n = flat.shape[0]
    order = torch.argsort(flat, stable=True)                                         # slot t*k + j, by expert
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).index_add_(
        0, flat, torch.ones_like(flat))                                              # [E] (no bincount: it syncs)
    tiles = (counts + block_m - 1) // block_m
    tiles_end = torch.cumsum(tiles, 0)
    rows_start = torch.cumsum(counts, 0) - counts
    max_tiles = -(-n // block_m) + num_experts                                      # a bound from shapes alone
    i = torch.arange(max_tiles, device=ids.device)
    e = torch.searchsorted(tiles_end, i, right=True).clamp_max(num_experts - 1)     # the expert of tile i
    start = rows_start[e] + (i - (tiles_end[e] - tiles[e])) * block_m
    end = rows_start[e] + counts[e]
    table = (e.to(torch.int32), start.to(torch.int32), end.to(torch.int32))
    return order, table, tiles_end[-1:].to(torch.int32)


@triton.jit
def _route_kernel(logits_ptr, stride_l, E, weights_ptr, ids_ptr, slots_ptr, table_ptr, stride_table, scratch,
                  TOP_K: tl.constexpr, K_PAD: tl.constexpr, NORM: tl.constexpr, E_PAD: tl.constexpr,
                  RECORD: tl.constexpr):
    """One token: p = softmax(logits) in float32; its top_k by descending p (the lowest expert first among equal p);
    the k weights renormalised to sum 1 when NORM; weights in the logits' dtype, ids int64. RECORD: the ids also go
    to the routing table's row of the token's slot as int16 (the scratch row for slot < 0)."""
    t = tl.program_id(0).to(tl.int64)
    ex = tl.arange(0, E_PAD)
    logits = tl.load(logits_ptr + t * stride_l + ex, mask=ex < E, other=-float("inf")).to(tl.float32)
    num = tl.exp(logits - tl.max(logits, axis=0))
    p = num / tl.sum(num, axis=0)                                  # [E_PAD]; padding 0
    p = tl.where(ex < E, p, -1.0)
    kr = tl.arange(0, K_PAD)
    vals = tl.zeros((K_PAD,), dtype=tl.float32)
    ids = tl.zeros((K_PAD,), dtype=tl.int64)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, axis=0)
        idx = tl.min(tl.where(p == best, ex, E_PAD), axis=0)      # the lowest expert holding the maximum
        idx = tl.minimum(idx, E - 1)                               # (NaN logits match nothing: stay in range)
        vals = tl.where(kr == j, best, vals)
        ids = tl.where(kr == j, idx.to(tl.int64), ids)
        p = tl.where(ex == idx, -1.0, p)
    if NORM:
        vals = vals / tl.sum(tl.where(kr < TOP_K, vals, 0.0), axis=0)
    tl.store(weights_ptr + t * TOP_K + kr, vals.to(weights_ptr.dtype.element_ty), mask=kr < TOP_K)
    tl.store(ids_ptr + t * TOP_K + kr, ids, mask=kr < TOP_K)
    if RECORD:
        slot = tl.load(slots_ptr + t)
        row = tl.where(slot >= 0, slot, scratch).to(tl.int64)
        tl.store(table_ptr + row * stride_table + kr, ids.to(tl.int16), mask=kr < TOP_K)


def fused_route(logits: torch.Tensor, top_k: int, norm_topk_prob: bool, record=None) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """The router's logits [T, E] -> (weights [T, k] in the logits' dtype, expert ids [T, k] int64), as
    ``SparseMoE.route`` computes them (softmax in float32, top-k by descending probability, renormalised when
    asked), in one kernel. Among equal probabilities the lowest expert comes first (torch.topk leaves that order
    unspecified). ``record`` (slots [T], (column [S + 1, k] int16, scratch row)): the ids also written to the
    column's row of each token's slot, as ``RoutedExpertStore.writer`` writes them."""
    global _route_kernel_failed
    num_tokens, num_experts = logits.shape
    if _route_kernel_failed:
        return _torch_route(logits, top_k, norm_topk_prob, record)
    weights = torch.empty(num_tokens, top_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    if num_tokens:
        assert logits.stride(1) == 1
        if record is not None:
            slots, (column, scratch) = record
            assert column.dtype == torch.int16 and column.stride(1) == 1 and slots.shape[0] == num_tokens
            rec = (slots, column, column.stride(0), scratch)
        else:
            rec = (ids, ids, 0, 0)   # unused pointers
        try:
            _route_kernel[(num_tokens,)](logits, logits.stride(0), num_experts, weights, ids, *rec, TOP_K=top_k,
                                         K_PAD=triton.next_power_of_2(top_k), NORM=bool(norm_topk_prob),
                                         E_PAD=triton.next_power_of_2(num_experts), RECORD=record is not None,
                                         num_warps=1 if num_experts <= 128 else 4)
        except Exception as e:  # noqa: BLE001 - a compile or launch failure: torch ops (capturable too)
            logger.warning("the MoE routing kernel failed (%s: %s); torch routing from now on", type(e).__name__, e)
            _route_kernel_failed = True
            return _torch_route(logits, top_k, norm_topk_prob, record)
    return weights, ids


def _torch_route(logits, top_k, norm_topk_prob, record):
    """fused_route in torch ops (the torch block's routing and the store writer's recording): the kernel's
    fallback."""
    from engine.models.moe import route_logits
    from engine.routing import write_routing

    weights, ids = route_logits(logits, top_k, norm_topk_prob)
    if record is not None:
        slots, (column, scratch) = record
        write_routing(column, scratch, slots, ids)
    return weights, ids


# the one-program sort (decode batches and small chunks) holds every slot in registers; larger steps (prefill
# chunks, where a few torch kernels more cost nothing) take tile_table's device sort
SORT_KERNEL_MAX_SLOTS = 4096


@triton.jit
def _sort_experts_kernel(ids_ptr, n, order_ptr, pos_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                         num_tiles_ptr, max_tiles, E,
                         N_PAD: tl.constexpr, E_PAD: tl.constexpr, BM: tl.constexpr, BLOCK_T: tl.constexpr):
    """tile_table's results and the inverse order in one program: a stable sort of the n slots by expert (keys
    expert * N_PAD + slot), the expert counts (a histogram; padding slots go to the spare bin E_PAD - 1 >= E), the
    tile table from their cumsums."""
    i = tl.arange(0, N_PAD)
    valid = i < n
    e = tl.load(ids_ptr + i, mask=valid, other=0).to(tl.int32)
    e = tl.where(valid, e, E_PAD - 1)
    keys = tl.sort(e * N_PAD + i)                        # padding sorts last: its expert E_PAD - 1 is the largest
    slot = keys % N_PAD                                  # [N_PAD] the slot of sorted row i
    tl.store(order_ptr + i, slot, mask=valid)
    tl.store(pos_ptr + slot, i, mask=valid)
    ex = tl.arange(0, E_PAD)
    counts = tl.where(ex < E, tl.histogram(e, E_PAD), 0)                                # [E_PAD]
    tiles = (counts + BM - 1) // BM
    tiles_end = tl.cumsum(tiles, 0)
    tiles_start = tiles_end - tiles
    rows_start = tl.cumsum(counts, 0) - counts
    tl.store(num_tiles_ptr, tl.sum(tiles, 0))
    for t0 in range(0, max_tiles, BLOCK_T):
        ti = t0 + tl.arange(0, BLOCK_T)
        # the expert of tile ti: how many real experts' tiles end at or before it (searchsorted, right)
        before = (tiles_end[None, :] <= ti[:, None]) & (ex[None, :] < E)                # [BLOCK_T, E_PAD]
        e_of = tl.minimum(tl.sum(before.to(tl.int32), axis=1), E - 1)
        sel = e_of[:, None] == ex[None, :]
        rs = tl.sum(tl.where(sel, rows_start[None, :], 0), axis=1)
        ts = tl.sum(tl.where(sel, tiles_start[None, :], 0), axis=1)
        cnt = tl.sum(tl.where(sel, counts[None, :], 0), axis=1)
        m = ti < max_tiles
        tl.store(tile_expert_ptr + ti, e_of, mask=m)
        tl.store(tile_start_ptr + ti, rs + (ti - ts) * BM, mask=m)
        tl.store(tile_end_ptr + ti, rs + cnt, mask=m)


def sort_by_expert(ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M):
    """ids [T, k] -> (order [T*k], pos [T*k] (the sorted row of each slot: order's inverse), tile table,
    num_tiles), as ``tile_table``: one kernel up to SORT_KERNEL_MAX_SLOTS slots, the torch device sort above."""
    global _sort_kernel_failed
    n = ids.numel()
    if n > SORT_KERNEL_MAX_SLOTS or _sort_kernel_failed:
        order, table, num_tiles = tile_table(ids, num_experts, block_m)
        pos = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=ids.device))
        return order, pos, table, num_tiles
    dev = ids.device
    max_tiles = -(-n // block_m) + num_experts                                      # as tile_table's bound
    order = torch.empty(n, dtype=torch.int32, device=dev)
    pos = torch.empty(n, dtype=torch.int32, device=dev)
    table = tuple(torch.empty(max_tiles, dtype=torch.int32, device=dev) for _ in range(3))
    num_tiles = torch.empty(1, dtype=torch.int32, device=dev)
    e_pad = triton.next_power_of_2(num_experts + 1)
    try:
        _sort_experts_kernel[(1,)](
            ids.reshape(-1), n, order, pos, *table, num_tiles, max_tiles, num_experts,
            N_PAD=max(16, triton.next_power_of_2(n)), E_PAD=e_pad, BM=block_m, BLOCK_T=max(16, 8192 // e_pad),
            num_warps=8)
    except Exception as e:  # noqa: BLE001 - a compile or launch failure: the torch sort (capturable too)
        logger.warning("the MoE sort kernel failed (%s: %s); the torch device sort from now on", type(e).__name__, e)
        _sort_kernel_failed = True
        return sort_by_expert(ids, num_experts, block_m)
    return order, pos, table, num_tiles


def fused_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor, silu_and_mul, config: TileConfig = TileConfig()) -> torch.Tensor:
    """x [T, H], gate_up [E, 2I, H], down [E, H, I], weights / ids [T, k] -> [T, H] (see the module docstring);
    ``config``: the grouped products' tiling (the default's otherwise)."""
    num_tokens, hidden = x.shape
    top_k = ids.shape[1]
    if num_tokens == 0:
        return torch.zeros_like(x)
    x = x.contiguous()
    bm = config.block_m or block_m_for(num_tokens * top_k, gate_up.shape[0])
    order, pos, table, num_tiles = sort_by_expert(ids, gate_up.shape[0], bm)   # order [T*k]: each sorted row's slot
    tiles = (*table, num_tiles)
    h = torch.empty(order.shape[0], gate_up.shape[1], dtype=x.dtype, device=x.device)
    _grouped_matmul(x, gate_up, h, order, tiles, gather=True, block_m=bm, top_k=top_k, config=config)  # [T*k, 2I]
    act = silu_and_mul(h)                                                            # [T*k, I]
    y = torch.empty(order.shape[0], hidden, dtype=x.dtype, device=x.device)
    _grouped_matmul(act, down, y, None, tiles, gather=False, block_m=bm, config=config)    # [T*k, H] sorted
    # each token's k rows (at pos, the sorted row of each slot), weighted and summed
    out = torch.empty_like(x)
    block_h = min(1024, triton.next_power_of_2(hidden))
    _combine_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        y, pos, weights.contiguous(), out, hidden, y.stride(0), out.stride(0), TOP_K=top_k, BLOCK_H=block_h,
        num_warps=4)
    return out


__all__ = ["BLOCK_M", "SORT_KERNEL_MAX_SLOTS", "TileConfig", "block_m_for", "fused_moe", "fused_route", "sort_by_expert",
           "tile_table"]
