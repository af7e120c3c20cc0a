"""Matrix-vector products for decode batches of a few rows: y = x @ W.T (+ bias), W in nn.Linear's [N, K].

At batch 1-4 a decode step is latency-bound: each projection of a 0.5B model moves 1.6-17 MB, which HBM
streams in 0.5-6 us, and cuBLAS's GEMM kernels take 4-8 us for it (tiles built for tensor cores, split-K
with a second reduce kernel for long K). These kernels stream W once with plain vector loads:

    program p owns output columns n in [p * BLOCK_N, (p + 1) * BLOCK_N) for all M rows;
    it walks K in BLOCK_K chunks, multiplying the W tile [BLOCK_N, BLOCK_K] (rows contiguous along K, so
    loads are 16-byte vectors) by each row's x chunk, and keeps an fp32 partial sum [BLOCK_M, BLOCK_N, BLOCK_K]
    that is reduced over K once at the end (or [BLOCK_M, BLOCK_N], reduced every step, for big tiles).
    The next W tile is loaded while the current one is multiplied; the first one before the kernel waits
    for its predecessor (programmatic dependent launch, ``engine.kernels.pdl``).

The grid has cdiv(N, BLOCK_N) programs: with BLOCK_N = 4 (``default_config``) that is hundreds to
thousands of programs, enough loads in flight to cover HBM latency without a split-K reduction.

Fused prologues (each saves a kernel launch per use):
  - ``norm_gemv``: x = RMSNorm(x + residual) computed by every program (1/rms over the whole row first: K is a
    hidden size, a few KB from L2), program 0 also writing the new residual; the qkv and gate_up projections.
  - ``silu_mul_gemv``: x = silu(gate) * up computed from the gate_up output [M, 2K] while it is loaded; the
    down projection.
Both round where ``rms_norm`` / ``silu_and_mul`` do.

Whether these beat cuBLAS depends on the card and the shape; ``engine.cuda_graphs`` measures both inside the
captured decode graph and keeps the faster (``DecoderLayer.gemv_rows``). ``benchmarks/kernels_gpu.py --only gemv``
times each projection shape both ways.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import gdc_launch_dependents, gdc_wait, launch_options, use_pdl

MAX_ROWS = 4  # the largest M these kernels take (decode batches up to 4)


@triton.jit
def _load_rows(x_ptr, res_ptr, res_out_ptr, offs, mask, STORE_RESIDUAL: tl.constexpr,
               HAS_RESIDUAL: tl.constexpr):
    """x chunk [BM, BK] in x's dtype, with the residual added (and rounded) when HAS_RESIDUAL; the sum is
    written to res_out when STORE_RESIDUAL (one program does it)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        if STORE_RESIDUAL:
            tl.store(res_out_ptr + offs, x, mask=mask)
    return x


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, res_ptr, res_out_ptr, norm_w_ptr,
    M, N, K, stride_xm, stride_wn, stride_om, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    REDUCE_EACH: tl.constexpr, USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    if USE_PDL:
        gdc_launch_dependents()
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)            # [BN]
    m = tl.arange(0, BLOCK_M)                            # [BM]
    n_mask = n < N
    m_mask = m < M
    w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_wn  # [BN, 1]
    x_rows = m[:, None] * stride_xm                      # [BM, 1] element offsets (x, residual, res_out)
    # W tiles are loaded one step ahead: the first before waiting for the previous kernel (weights are
    # not written during a step), each next one while the current one is multiplied.
    k = tl.arange(0, BLOCK_K)
    w_next = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & (k[None, :] < K), other=0.0)
    if USE_PDL:
        gdc_wait()
    if NORM:
        # RMSNorm prologue: every program computes the rows' 1/rms itself (K is a hidden size: a few KB
        # from L2), so no separate norm kernel runs; program 0 also writes the new residual stream.
        sq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xk = _load_rows(x_ptr, res_ptr, res_out_ptr, x_rows + k[None, :], m_mask[:, None] & (k[None, :] < K),
                            False, HAS_RESIDUAL).to(tl.float32)
            sq += xk * xk
        inv_rms = 1.0 / tl.sqrt(tl.sum(sq, 1) / K + eps)   # [BM]
    if REDUCE_EACH:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)                   # [BK]
        w = w_next                                       # [BN, BK]
        kn = k + BLOCK_K
        w_next = tl.load(w_rows + kn[None, :], mask=n_mask[:, None] & (kn[None, :] < K), other=0.0)
        x_mask = m_mask[:, None] & (k[None, :] < K)
        if SILU_MUL:
            # x row = [gate | up], each K wide: silu(gate) rounded to the dtype, times up, rounded again
            gate = tl.load(x_ptr + x_rows + k[None, :], mask=x_mask, other=0.0).to(tl.float32)
            up = tl.load(x_ptr + x_rows + K + k[None, :], mask=x_mask, other=0.0).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
            x = (act * up).to(x_ptr.dtype.element_ty)
        elif NORM:
            xk = _load_rows(x_ptr, res_ptr, res_out_ptr, x_rows + k[None, :], x_mask, pid == 0, HAS_RESIDUAL)
            # as RMSNorm: normalize in fp32, round, multiply by the weight, round
            y = (xk.to(tl.float32) * inv_rms[:, None]).to(x_ptr.dtype.element_ty)
            g = tl.load(norm_w_ptr + k, mask=k < K, other=0.0)
            x = (g.to(tl.float32)[None, :] * y.to(tl.float32)).to(x_ptr.dtype.element_ty)
        else:
            x = tl.load(x_ptr + x_rows + k[None, :], mask=x_mask, other=0.0)  # [BM, BK]
        prod = w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]   # [BM, BN, BK]
        if REDUCE_EACH:
            acc += tl.sum(prod, 2)
        else:
            acc += prod
    if REDUCE_EACH:
        out = acc
    else:
        out = tl.sum(acc, 2)                                                  # [BM, BN]
    if HAS_BIAS:
        out += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    reduce_each: bool = False  # reduce over K every step (small accumulator) instead of once at the end


def default_config(n: int, k: int, rows: int) -> GemvConfig:
    """Tile sizes by shape, from sweeps on an H100 (0.5B-8B projection shapes, 1-2 rows, plain and fused
    variants, inside CUDA graphs over distinct weights so that every read comes from HBM): 4 output columns
    per program, K steps of up to 2048 (one or two steps for a hidden-size K), 4 warps. The fp32 accumulator
    is reduced over K every step (a [rows, 4] accumulator instead of [rows, 4, BLOCK_K]) when the grid is
    large (> 1024 programs: fewer registers, more programs resident per SM; the 0.5B gate_up with its norm
    prologue took 11.2 us instead of 8.6 us without it), when K takes more than 4 steps (the 8B down
    projection: 52 vs 45 us), or when the full accumulator would pass 64 registers per thread.
    ``benchmarks/kernels_gpu.py --only gemv`` measures the result against cuBLAS."""
    block_n, num_warps = 4, 4
    block_k = min(2048, triton.next_power_of_2(k))
    reduce_each = (triton.cdiv(n, block_n) > 1024 or triton.cdiv(k, block_k) > 4
                   or rows * block_n * block_k > 64 * 32 * num_warps)
    return GemvConfig(block_n, block_k, num_warps, reduce_each)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None,
            k: int, config: GemvConfig | None, *, silu_mul: bool = False, norm_weight: torch.Tensor | None = None,
            residual: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
            eps: float = 0.0) -> torch.Tensor:
    m = x.shape[0]
    n, kw = weight.shape
    assert kw == k, f"weight is [{n}, {kw}] but the input has K = {k}"
    assert 0 < m <= MAX_ROWS, f"gemv takes 1-{MAX_ROWS} rows, got {m}"
    assert x.stride(1) == 1 and weight.stride(1) == 1, "K must be contiguous"
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    assert out.shape == (m, n) and out.stride(1) == 1
    if residual is not None:
        assert residual.shape == x.shape and residual.stride() == x.stride()
        assert residual_out is not None and residual_out.stride() == x.stride()
    cfg = config or default_config(n, k, m)
    pdl = use_pdl(x)
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, weight, bias if bias is not None else weight, out,
        residual if residual is not None else x, residual_out if residual_out is not None else x,
        norm_weight if norm_weight is not None else weight,
        m, n, k, x.stride(0), weight.stride(0), out.stride(0), eps,
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        HAS_BIAS=bias is not None, SILU_MUL=silu_mul, NORM=norm_weight is not None,
        HAS_RESIDUAL=residual is not None, REDUCE_EACH=cfg.reduce_each, USE_PDL=pdl,
        num_warps=cfg.num_warps, **launch_options(pdl),
    )
    return out


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         out: torch.Tensor | None = None, config: GemvConfig | None = None) -> torch.Tensor:
    """x [M, K] (M <= 4), weight [N, K], bias [N] -> x @ weight.T + bias: [M, N] (F.linear)."""
    return _launch(x, weight, bias, out, x.shape[1], config)


def norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
              weight: torch.Tensor, bias: torch.Tensor | None = None, *,
              config: GemvConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused ``rms_norm`` then ``F.linear``: x, residual [M, K] -> (norm(x + residual) @ weight.T + bias
    [M, N], new residual x + residual [M, K]); with residual None the new residual is x itself."""
    residual_out = torch.empty_like(x) if residual is not None else None
    out = _launch(x, weight, bias, None, x.shape[1], config, norm_weight=norm_weight, residual=residual,
                  residual_out=residual_out, eps=eps)
    return out, (residual_out if residual is not None else x)


def silu_mul_gemv(gate_up: torch.Tensor, weight: torch.Tensor, *, out: torch.Tensor | None = None,
                  config: GemvConfig | None = None) -> torch.Tensor:
    """gate_up [M, 2K] = [gate | up], weight [N, K] -> (silu(gate) * up) @ weight.T: [M, N]
    (= F.linear(silu_and_mul(gate_up), weight))."""
    assert gate_up.shape[1] % 2 == 0
    return _launch(gate_up, weight, None, out, gate_up.shape[1] // 2, config, silu_mul=True)


__all__ = ["GemvConfig", "MAX_ROWS", "default_config", "gemv", "norm_gemv", "silu_mul_gemv"]
