"""The ops of the batch-invariant mode (``EngineConfig.batch_invariant``) and the decoder layer written once over
them, for the engine's forward and the trainer's (``engine.models.invariant_policy``).

A token's result must not depend on what else is computed with it. Two implementations of the same five ops:

  - ``TritonInvariantOps`` (CUDA; the kernels of ``engine.kernels.invariant`` and the per-row kernels of
    ``engine.kernels.elementwise`` / ``kv_store``, which already handle each row in one program);
  - ``RowOps`` (CPU, torch): every op whose kernel could depend on the tensor's size (a GEMM, a reduction, a
    transcendental function: vectorized and scalar tails differ in the last bit) runs one row at a time on a
    fresh contiguous copy of the row, so each call has the same shape and alignment whatever the batch.
    Elementwise + and * run on whole tensors (correctly rounded either way). Every op runs on one torch thread
    (the thread count changes some CPU kernels' sums: seen with a Ray worker's OMP_NUM_THREADS=1 against a
    trainer's 2 threads, 1.9e-6 in a logprob), so the engine and the trainer agree whatever their thread counts.

They agree with each other and with the default path to rounding only: the guarantee is within one
implementation, between the engine and a trainer that uses the same one.

The layer (``layer_forward``) keeps transformers' structure: ``residual + branch`` summed in the model dtype,
RMSNorm rounding to the model dtype before its weight multiply, SiLU rounded before the up multiply.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Protocol

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionMetadata

if TYPE_CHECKING:
    from engine.model_config import ModelConfig


class InvariantOps(Protocol):
    name: str

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor: ...
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, upcast: bool = False) -> torch.Tensor: ...
    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor: ...
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float) -> torch.Tensor: ...
    def logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor: ...


# ------------------------------------------------------------------------------------------------------ CPU
# ------------------------------------------------------------------------------------------- torch references
def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, upcast: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim as the decoder computes it (float32 inside; rounded to x's dtype before the
    weight multiply unless ``upcast``, which returns float32)."""
    x32 = x.to(torch.float32)
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(torch.float32) * y if upcast else weight * y.to(x.dtype)


def reference_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] = [gate | up] -> silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _one_thread(op):
    """Run ``op`` on one torch thread (restored after)."""
    import functools

    @functools.wraps(op)
    def run(*args, **kwargs):
        threads = torch.get_num_threads()
        if threads == 1:
            return op(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return op(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return run


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself when it is contiguous and starts on a 64-byte boundary, else such a copy (torch's CPU allocator
    aligns to 64 bytes)."""
    if t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    out.copy_(t)
    assert out.data_ptr() % 64 == 0 or out.numel() == 0, "the CPU allocator's alignment is 64 bytes"
    return out


def _rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn over each row of x [M, ...] as a [1, ...] contiguous copy (one shape and alignment per call)."""
    if x.shape[0] == 0:
        return fn(x.contiguous())
    return torch.cat([fn(x[i:i + 1].clone()) for i in range(x.shape[0])])


class RowOps:
    """The CPU implementation: torch ops, one row at a time where size could change the result."""

    name = "rows"

    @_one_thread
    def linear(self, x, weight, bias=None, out_dtype=None):
        # the CPU BLAS sums a row's products in an order that depends on the weight's address alignment (seen on an
        # AMD EPYC: a weight 4 or 8 bytes off a 64-byte boundary moved results by 1e-6), and a trainer's parameters
        # can be views at any offset of a loaded buffer: read misaligned weights from an aligned copy
        weight, bias = _aligned(weight), (_aligned(bias) if bias is not None else None)
        out = _rows(lambda r: F.linear(r, weight, bias), x)         # [M, N]
        return out if out_dtype is None else out.to(out_dtype)

    @_one_thread
    def rms_norm(self, x, weight, eps, upcast=False):
        shape = x.shape
        return _rows(lambda r: reference_rms_norm(r, weight, eps, upcast), x.reshape(-1, shape[-1])).reshape(shape)

    @_one_thread
    def silu_mul(self, gate_up):
        return _rows(reference_silu_mul, gate_up)

    @_one_thread
    def attention(self, q, k, v, cos, sin, k_cache, v_cache, meta, scale):
        from engine.attention.reference import store_new_kv
        from engine.models.rotary import apply_rotary

        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)   # elementwise * and -: whole tensors
        store_new_kv(q, k, v, k_cache, v_cache, meta)
        _, block_size, num_kv_heads, head_dim = k_cache.shape
        num_tokens, num_heads, _ = q.shape
        group = num_heads // num_kv_heads
        out = torch.empty_like(q)
        t = 0
        for i, query_len in enumerate(meta.query_lens):
            seq_len = meta.seq_lens[i]
            blocks = meta.block_tables[i, :-(-seq_len // block_size)].to(torch.long)
            keys = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)
            values = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)
            for j in range(query_len):
                ctx = seq_len - query_len + j + 1
                kk = keys[:ctx].to(torch.float32).permute(1, 2, 0).contiguous()        # [Hkv, D, ctx]
                vv = values[:ctx].to(torch.float32).permute(1, 0, 2).contiguous()      # [Hkv, ctx, D]
                qq = q[t].to(torch.float32).reshape(num_kv_heads, group, head_dim).contiguous()
                probs = torch.softmax(torch.bmm(qq, kk) * scale, dim=-1)               # [Hkv, G, ctx]
                out[t] = torch.bmm(probs, vv).reshape(num_heads, head_dim).to(q.dtype)
                t += 1
        assert t == num_tokens, "the metadata's query lengths cover the step's tokens"
        return out

    @_one_thread
    def logprobs(self, logits, tokens, temperatures):
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for i in range(logits.shape[0]):
            row = logits[i:i + 1].to(torch.float32).clone() / temperatures[i:i + 1, None].to(torch.float32)
            out[i] = row[0, int(tokens[i])] - torch.logsumexp(row, dim=-1)[0]
        return out


# ----------------------------------------------------------------------------------------------------- CUDA
class TritonInvariantOps:
    """The CUDA implementation (also runs under TRITON_INTERPRET=1 on CPU tensors: the kernel tests)."""

    name = "triton"

    def __init__(self) -> None:
        from engine import kernels
        from engine.kernels import invariant
        self._k = kernels
        self._inv = invariant

    def linear(self, x, weight, bias=None, out_dtype=None):
        return self._inv.matmul(x, weight, bias, out_dtype)

    def rms_norm(self, x, weight, eps, upcast=False):
        return self._k.rms_norm(x, weight, eps, upcast=upcast)[0]

    def silu_mul(self, gate_up):
        return self._k.silu_and_mul(gate_up.contiguous())

    def attention(self, q, k, v, cos, sin, k_cache, v_cache, meta, scale):
        # q rotated in place, k rotated into the cache (one kernel per token), then the invariant attention
        self._k.rotary_store_kv(q, k, v, cos, sin, k_cache, v_cache, meta.slot_mapping)
        return self._inv.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens_tensor,
                                         meta.query_start_loc, scale)

    def logprobs(self, logits, tokens, temperatures):
        return self._inv.token_logprobs(logits.contiguous(), tokens.to(torch.int64).contiguous(),
                                        temperatures.to(torch.float32).contiguous())


def invariant_ops_for(device: torch.device) -> InvariantOps:
    """Triton on CUDA, row-wise torch elsewhere."""
    return TritonInvariantOps() if torch.device(device).type == "cuda" else RowOps()


# ---------------------------------------------------------------------------------------------------- layer
@dataclass
class LayerWeights:
    """One decoder layer's weights in the engine's fused layout (rows q | k | v, gate | up), in the model dtype."""
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: Optional[torch.Tensor]
    o: torch.Tensor
    o_bias: Optional[torch.Tensor]
    q_norm: Optional[torch.Tensor]
    k_norm: Optional[torch.Tensor]
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


def layer_forward(hidden: torch.Tensor, w: LayerWeights, s: "ModelConfig", ops: InvariantOps,
                  attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """hidden [T, H] -> [T, H] for a layer of shape ``s``. ``attend(q, k, v)`` (pre-rotary, [T, H*, D]) -> [T, Hq, D]:
    the engine's paged cache, or a trainer's packed trajectories."""
    T = hidden.shape[0]
    x = ops.rms_norm(hidden, w.input_norm, s.rms_norm_eps)
    qkv = ops.linear(x, w.qkv, w.qkv_bias)                                          # [T, q + 2 kv]
    q, k, v = qkv.split([s.q_size, s.kv_size, s.kv_size], dim=-1)
    q = q.reshape(T, s.num_heads, s.head_dim)
    k = k.reshape(T, s.num_kv_heads, s.head_dim)
    v = v.reshape(T, s.num_kv_heads, s.head_dim)
    if w.q_norm is not None:
        q, k = ops.rms_norm(q, w.q_norm, s.rms_norm_eps), ops.rms_norm(k, w.k_norm, s.rms_norm_eps)
    attn = attend(q, k, v)                                                          # [T, Hq, D]
    hidden = hidden + ops.linear(attn.reshape(T, s.q_size), w.o, w.o_bias)
    x = ops.rms_norm(hidden, w.post_norm, s.rms_norm_eps)
    return hidden + ops.linear(ops.silu_mul(ops.linear(x, w.gate_up)), w.down)


__all__ = ["InvariantOps", "LayerWeights", "RowOps", "TritonInvariantOps", "invariant_ops_for",
           "layer_forward"]
