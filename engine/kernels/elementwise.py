"""Fused elementwise kernels of the decoder layer, rounding exactly where ``engine.models.decoder`` rounds.

    rms_norm:      [residual add ->] x * rsqrt(mean(x^2) + eps) in fp32, cast, times weight (RMSNorm);
                   upcast=True: no cast, fp32 out (the final norm of the fp32 head, Fp32Head.norm)
    silu_and_mul:  silu(gate) * up over x = [gate | up]                       (F.silu(gate) * up)
    apply_rotary_: HF rotate-half rotary, in place on q and k                 (apply_rotary)

Each program handles one token row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import gdc_launch_dependents, gdc_wait, launch_options, use_pdl


# -------------------------------------------------------------------------------------------------- RMSNorm
@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, UPCAST: tl.constexpr, USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    if USE_PDL:  # see engine.kernels.pdl: only the weight is read before the wait
        gdc_launch_dependents()
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    if USE_PDL:
        gdc_wait()
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # the model adds in its dtype (residual + branch output): round the sum before normalizing
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / n_cols + eps)
    y = x32 * inv_rms
    if not UPCAST:
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)  # cast back before the weight multiply, as RMSNorm does
    tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,                        # [..., N]
    weight: torch.Tensor,                   # [N]
    eps: float,
    residual: torch.Tensor | None = None,   # [..., N] like x
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (norm(x [+ residual]), new residual). New residual = x + residual (rounded to x's dtype), or x
    itself when ``residual`` is None, ready to be the next block's residual. ``upcast``: the normalized row
    is not rounded to x's dtype before the weight multiply and the output is float32 (``Fp32Head``)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out_dtype = torch.float32 if upcast else torch.promote_types(x.dtype, weight.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    out2 = out.view(-1, n)
    if residual is not None:
        assert residual.shape == x.shape
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        if residual_out is None:
            residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        ro2 = residual_out.view(-1, n)
    else:
        r2 = ro2 = x2  # unused
        residual_out = x
    if rows > 0:
        pdl = use_pdl(x2)
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, out2, ro2,
            x2.stride(0), r2.stride(0), out2.stride(0), ro2.stride(0), n, eps,
            BLOCK=triton.next_power_of_2(n), HAS_RESIDUAL=residual is not None, UPCAST=upcast, USE_PDL=pdl,
            num_warps=min(16, max(1, triton.next_power_of_2(n) // 256)), **launch_options(pdl),
        )
    return out, residual_out


# --------------------------------------------------------------------------------------------- SiLU-and-mul
@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty)  # F.silu rounds to the dtype here
    tl.store(out_ptr + row * stride_o + cols, (act.to(tl.float32) * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, 2I] = [gate | up] -> silu(gate) * up: [T, I]."""
    num_tokens, two_i = x.shape
    assert two_i % 2 == 0 and x.stride(1) == 1
    inter = two_i // 2
    if out is None:
        out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    assert out.shape == (num_tokens, inter) and out.stride(1) == 1
    block = min(1024, triton.next_power_of_2(inter))
    if num_tokens > 0:
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
            x, out, x.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------------- rotary
@triton.jit
def _rotate_heads(x_ptr, t, stride_t, stride_h, num_heads, cos, sin, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # x[h] = [x1 | x2] -> [x1 cos - x2 sin | x2 cos + x1 sin], in place
    h = tl.arange(0, BLOCK_H)
    c = tl.arange(0, BLOCK_HALF)
    mask = (h[:, None] < num_heads) & (c[None, :] < HALF)
    ptr1 = x_ptr + t * stride_t + h[:, None] * stride_h + c[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr1, (x1 * cos[None, :] - x2 * sin[None, :]).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr1 + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st, num_q_heads, num_k_heads,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + t * stride_ct + c, mask=c < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_st + c, mask=c < HALF, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, t, stride_qt, stride_qh, num_q_heads, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, t, stride_kt, stride_kh, num_k_heads, cos, sin, HALF, BLOCK_HK, BLOCK_HALF)


def apply_rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place on q [T, Hq, D] and k [T, Hkv, D] (views of the fused qkv output are fine);
    cos/sin: [T, D/2], the rows of each token's position."""
    num_tokens, num_q_heads, head_dim = q.shape
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim and head_dim % 2 == 0
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1 and sin.stride(1) == 1
    half = head_dim // 2
    assert cos.shape == (num_tokens, half) and sin.shape == (num_tokens, half)
    if num_tokens == 0:
        return
    _rotary_kernel[(num_tokens,)](
        q, k, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        num_q_heads, k.shape[1],
        HALF=half, BLOCK_HQ=triton.next_power_of_2(num_q_heads), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
    )


__all__ = ["apply_rotary_", "rms_norm", "silu_and_mul"]
