"""Triton kernels against their oracles: the reference attention backend and the model's torch ops.

On the CPU the kernels run under ``TRITON_INTERPRET=1`` (small shapes); on CUDA they run natively. Every
check draws fresh random inputs, poisons outputs (and the unused cache slots) with NaN so that an unwritten
element or a read past the context fails, and compares in float32 tightly, in bf16 loosely.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    # NOTE: must precede the first import of triton *and* of the kernel modules (jit reads it at decoration).
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

import importlib  # noqa: E402
import sys  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from engine.attention import TorchReferenceBackend, build_metadata, get_backend  # noqa: E402

if not torch.cuda.is_available() and "engine.kernels" in sys.modules:
    # imported earlier in this process without the interpreter: re-decorate the kernels
    for name in ("engine.kernels.kv_store", "engine.kernels.attention", "engine.kernels.extend_attention",
                 "engine.kernels.elementwise", "engine.kernels.gemv", "engine.kernels"):
        importlib.reload(sys.modules[name])

from engine.attention import triton_backend  # noqa: E402
from engine.kernels import (apply_rotary_, gemv, greedy_sample, norm_gemv, paged_decode_attention,  # noqa: E402
                            paged_extend_attention, rms_norm, rotary_store_kv, silu_and_mul, silu_mul_gemv,
                            store_kv)
from engine.kernels.gemv import GemvConfig, default_config  # noqa: E402
from engine.models.decoder import RMSNorm, apply_rotary  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _seed(request):
    # fresh inputs per test, reproducible per test id
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _random_norm(size: int, eps: float, dtype) -> RMSNorm:
    """The model's RMSNorm (the oracle) with a random weight."""
    norm = RMSNorm(size, eps, dtype).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(size, device=DEVICE))
    return norm


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


class Batch:
    """A paged batch: shuffled block tables (with spare entries that must never be read), caches holding
    random K/V at every position before this step's new tokens, NaN everywhere else."""

    def __init__(self, query_lens, seq_lens, block_size, num_heads, num_kv_heads, head_dim, dtype,
                 spare_blocks=3):
        needed = [-(-s // block_size) for s in seq_lens]
        num_blocks = sum(needed) + spare_blocks * len(seq_lens) + 2
        perm = torch.randperm(num_blocks).tolist()
        tables, i = [], 0
        for n in needed:
            tables.append(perm[i:i + n + spare_blocks])  # spare entries point at NaN blocks
            i += n + spare_blocks
        self.meta = build_metadata(query_lens, seq_lens, tables, block_size, DEVICE)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache, self.v_cache = _nan(shape, dtype), _nan(shape, dtype)
        prefix = build_metadata(seq_lens, seq_lens, tables, block_size, DEVICE)  # every position's slot
        for cache in (self.k_cache, self.v_cache):
            flat = cache.view(-1, num_kv_heads, head_dim)
            flat[prefix.slot_mapping] = torch.randn(len(prefix.slot_mapping), num_kv_heads, head_dim,
                                                    device=DEVICE).to(dtype)
        T = sum(query_lens)
        self.q = torch.randn(T, num_heads, head_dim, device=DEVICE).to(dtype)
        self.k = torch.randn(T, num_kv_heads, head_dim, device=DEVICE).to(dtype)
        self.v = torch.randn(T, num_kv_heads, head_dim, device=DEVICE).to(dtype)
        self.scale = head_dim ** -0.5

    def reference(self):
        """-> (out, k_cache, v_cache) of the reference backend, on copies of the caches."""
        kc, vc = self.k_cache.clone(), self.v_cache.clone()
        out = TorchReferenceBackend().forward(self.q, self.k, self.v, kc, vc, self.meta, self.scale)
        return out, kc, vc


# ------------------------------------------------------------------------------------------------ KV store
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_skips_negative_slots(dtype):
    T, Hkv, D, NB, BS = 9, 2, 16, 6, 4
    qkv = torch.randn(T, (4 + 2 * Hkv) * D, device=DEVICE).to(dtype)  # k, v as views of a fused output
    k = qkv[:, 4 * D:(4 + Hkv) * D].view(T, Hkv, D)
    v = qkv[:, (4 + Hkv) * D:].view(T, Hkv, D)
    slots = torch.randperm(NB * BS, device=DEVICE)[:T]
    slots[[2, 5]] = -1  # padded tokens of a CUDA-graph batch
    k_cache, v_cache = _nan((NB, BS, Hkv, D), dtype), _nan((NB, BS, Hkv, D), dtype)
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    k_exp.view(-1, Hkv, D)[slots[keep]] = k[keep]
    v_exp.view(-1, Hkv, D)[slots[keep]] = v[keep]
    store_kv(k, v, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, k_exp, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_exp, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,head_dim", [((4, 2), 16), ((6, 2), 32), ((2, 1), 64)])
def test_rotary_store_kv_equals_rotary_then_store(dtype, heads, head_dim):
    T, (Hq, Hkv), D, NB, BS = 7, heads, head_dim, 5, 4
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, device=DEVICE).to(dtype)
    q = qkv[:, :Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
    angles = torch.rand(T, D // 2, device=DEVICE) * 100
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    slots = torch.randperm(NB * BS, device=DEVICE)[:T]
    slots[[1, 4]] = -1  # padding rows: q is still rotated, nothing reaches the cache
    # oracle: torch rotary, then the cache written at the kept slots
    q_exp, k_rot = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k_before = k.clone()
    k_exp, v_exp = _nan((NB, BS, Hkv, D), dtype), _nan((NB, BS, Hkv, D), dtype)
    keep = slots >= 0
    k_exp.view(-1, Hkv, D)[slots[keep]] = k_rot[keep]
    v_exp.view(-1, Hkv, D)[slots[keep]] = v[keep]
    k_cache, v_cache = _nan((NB, BS, Hkv, D), dtype), _nan((NB, BS, Hkv, D), dtype)
    rotary_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
    torch.testing.assert_close(q, q_exp, **TOL[dtype])
    torch.testing.assert_close(k_cache, k_exp, equal_nan=True, **TOL[dtype])
    torch.testing.assert_close(v_cache, v_exp, atol=0, rtol=0, equal_nan=True)
    assert torch.equal(k, k_before)  # the rotated k goes to the cache only


def test_backend_forward_rotary_equals_rotary_then_forward():
    b = Batch(*MIXED, 4, 4, 2, 32, torch.float32)
    T = b.q.shape[0]
    angles = torch.rand(T, 16, device=DEVICE) * 50
    cos, sin = angles.cos(), angles.sin()
    backend = triton_backend.TritonBackend()
    assert backend.fuses_rotary
    q, k = b.q.clone(), b.k.clone()
    kc, vc = b.k_cache.clone(), b.v_cache.clone()
    out = backend.forward_rotary(q, k, b.v, cos, sin, kc, vc, b.meta, b.scale)
    q_ref, k_ref = apply_rotary(b.q, cos, sin), apply_rotary(b.k, cos, sin)
    ref = TorchReferenceBackend().forward(q_ref, k_ref, b.v, b.k_cache, b.v_cache, b.meta, b.scale)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(kc, b.k_cache, equal_nan=True, **TOL[torch.float32])


# ----------------------------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [(1, 100), (3, 9000), (4, 12289)])
def test_greedy_sample_matches_argmax_and_log_softmax(dtype, rows, vocab):
    logits = (5 * torch.randn(rows, vocab, device=DEVICE)).to(dtype)
    if vocab > 4100:
        # equal maxima in two vocab chunks (4096 wide): the first index wins, as torch.argmax
        logits[0, 4100] = logits[0, 10] = logits[0].max() + 1
        logits[-1, :4096] = float("-inf")   # a whole chunk masked: no NaN from it
    token_ids, pair = greedy_sample(logits)
    oracle = torch.log_softmax(logits.double(), dim=-1)
    expected = oracle.argmax(-1)
    assert torch.equal(token_ids, expected) and token_ids.dtype == torch.int64
    if vocab > 4100:
        assert token_ids[0].item() == 10
    assert torch.equal(pair[0], expected.double())
    torch.testing.assert_close(pair[1], oracle.max(-1).values, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- gemv
GEMV_CONFIGS = [None, GemvConfig(2, 64, 4), GemvConfig(8, 128, 4, reduce_each=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("n,k,bias", [(17, 40, True), (64, 256, False), (33, 300, True)])
def test_gemv_matches_linear(dtype, rows, n, k, bias):
    x = torch.randn(rows, k, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    ref = F.linear(x.double(), w.double(), b.double() if bias else None)
    for config in GEMV_CONFIGS:
        out = _nan((rows, n), dtype)
        assert gemv(x, w, b, out=out, config=config) is out
        torch.testing.assert_close(out.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4])
def test_silu_mul_gemv_matches_silu_and_mul_then_linear(dtype, rows):
    n, inter = 24, 200   # inter not a multiple of the K step: the tail is masked
    gate_up = torch.randn(rows, 2 * inter, device=DEVICE).to(dtype)
    w = (torch.randn(n, inter, device=DEVICE) / inter ** 0.5).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    ref = F.linear((F.silu(gate) * up).double(), w.double())
    tol = TOL[dtype]
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        # the interpreter truncates the two bf16 roundings of each of the 200 products (see test_rms_norm):
        # a bias toward zero that adds up over K (at most ~3e-2 here)
        tol = dict(atol=6e-2, rtol=4e-2)
    for config in GEMV_CONFIGS:
        torch.testing.assert_close(silu_mul_gemv(gate_up, w, config=config).double(), ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("rows", [1, 3])
def test_norm_gemv_matches_rms_norm_then_linear(dtype, with_residual, rows):
    n, k, eps = 40, 96, 1e-6
    norm = _random_norm(k, eps, dtype)
    x = torch.randn(rows, k, device=DEVICE).to(dtype)
    residual = torch.randn(rows, k, device=DEVICE).to(dtype) if with_residual else None
    w = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype)
    summed = residual + x if with_residual else x
    with torch.no_grad():
        ref = F.linear(norm(summed).double(), w.double(), b.double())
    tol = TOL[dtype]
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        tol = dict(atol=6e-2, rtol=4e-2)   # the interpreter truncates the norm's two roundings (see above)
    for config in GEMV_CONFIGS:
        out, new_res = norm_gemv(x, residual, norm.weight, eps, w, b, config=config)
        torch.testing.assert_close(out.double(), ref, **tol)
        exact = DEVICE == "cuda" or dtype == torch.float32  # see test_rms_norm: the interpreter truncates
        torch.testing.assert_close(new_res, summed, atol=0, rtol=0 if exact else 2 ** -7)
        if not with_residual:
            assert new_res is x


def test_gemv_rejects_bad_shapes():
    x, w = torch.randn(5, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE)
    with pytest.raises(AssertionError, match="1-4 rows"):
        gemv(x, w)
    with pytest.raises(AssertionError, match="K = 6"):
        gemv(x[:2, :6], w)


def test_default_gemv_config_keeps_the_accumulator_small():
    for n, k in ((1152, 896), (896, 4864), (28672, 4096), (4096, 14336), (40, 96)):
        for rows in (1, 2, 4):
            c = default_config(n, k, rows)
            assert c.block_k <= max(2048, k) and c.block_k >= min(k, 2048) // 2
            per_thread = (1 if c.reduce_each else rows * c.block_n * c.block_k) / (32 * c.num_warps)
            assert per_thread <= 64
            assert c.reduce_each or -(-n // c.block_n) <= 1024   # big grids keep registers low


# ------------------------------------------------------------------------------------------------ decode
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 2), (6, 2)], ids=lambda h: f"gqa{h[0] // h[1]}")
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_matches_reference(heads, block_size, num_splits):
    # contexts: one token, inside one block, exactly one block, crossing blocks, many tiles
    seq_lens = [1, 5, 16, 17, 70]
    b = Batch([1] * len(seq_lens), seq_lens, block_size, *heads, 32, torch.float32)
    ref, kc_ref, vc_ref = b.reference()
    store_kv(b.k, b.v, b.k_cache, b.v_cache, b.meta.slot_mapping)
    out = _nan(b.q.shape, b.q.dtype)
    paged_decode_attention(b.q, b.k_cache, b.v_cache, b.meta.block_tables, b.meta.seq_lens_tensor, b.scale,
                           num_splits=num_splits, out=out, block_n=16)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(b.k_cache, kc_ref, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("head_dim", [16, 48, 64])
def test_decode_head_dims_bf16(head_dim):
    seq_lens = [3, 33, 50]
    b = Batch([1] * 3, seq_lens, 16, 4, 2, head_dim, torch.bfloat16)
    ref, _, _ = b.reference()
    store_kv(b.k, b.v, b.k_cache, b.v_cache, b.meta.slot_mapping)
    out = _nan(b.q.shape, b.q.dtype)
    paged_decode_attention(b.q, b.k_cache, b.v_cache, b.meta.block_tables, b.meta.seq_lens_tensor, b.scale,
                           num_splits=4, out=out, block_n=16)
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])


def test_decode_padded_rows_give_zeros():
    # CUDA-graph padding: seq_len 0 and slot -1 -> nothing stored, nothing read, zeros out (no NaN)
    b = Batch([1, 1], [9, 20], 4, 4, 2, 16, torch.float32)
    seq_lens = torch.tensor([9, 0], dtype=torch.int32, device=DEVICE)
    store_kv(b.k, b.v, b.k_cache, b.v_cache, b.meta.slot_mapping)
    for num_splits in (1, 4):
        out = _nan(b.q.shape, b.q.dtype)
        paged_decode_attention(b.q, b.k_cache, b.v_cache, b.meta.block_tables, seq_lens, b.scale,
                               num_splits=num_splits, out=out, block_n=16)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert not out[0].isnan().any()


# ------------------------------------------------------------------------------------------------ extend
# (query_lens, seq_lens): fresh prefills, chunks over a cached prefix, decodes, all in one batch
MIXED = ([5, 1, 23, 1, 8, 2], [5, 40, 37, 3, 8, 19])


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 2), (6, 2)], ids=lambda h: f"gqa{h[0] // h[1]}")
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("block_m", [16, 32])
def test_extend_matches_reference(heads, block_size, block_m):
    b = Batch(*MIXED, block_size, *heads, 32, torch.float32)
    ref, kc_ref, vc_ref = b.reference()
    store_kv(b.k, b.v, b.k_cache, b.v_cache, b.meta.slot_mapping)
    out = _nan(b.q.shape, b.q.dtype)
    m = b.meta
    paged_extend_attention(b.q, b.k_cache, b.v_cache, m.block_tables, m.seq_lens_tensor, m.query_start_loc,
                           max(m.query_lens), b.scale, out=out, block_m=block_m, block_n=16)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(b.v_cache, vc_ref, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("head_dim", [16, 48, 64])
def test_extend_head_dims_bf16(head_dim):
    b = Batch(*MIXED, 16, 8, 2, head_dim, torch.bfloat16)
    ref, _, _ = b.reference()
    store_kv(b.k, b.v, b.k_cache, b.v_cache, b.meta.slot_mapping)
    out = _nan(b.q.shape, b.q.dtype)
    m = b.meta
    paged_extend_attention(b.q, b.k_cache, b.v_cache, m.block_tables, m.seq_lens_tensor, m.query_start_loc,
                           max(m.query_lens), b.scale, out=out, block_m=16, block_n=16)
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])


# ------------------------------------------------------------------------------------------------ backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [([1, 1, 1], [1, 18, 45]), MIXED], ids=["decode", "mixed"])
def test_backend_matches_reference(dtype, batch):
    triton_backend.register()
    backend = get_backend("triton")
    assert backend.name == "triton"
    b = Batch(*batch, 4, 4, 2, 32, dtype)
    ref, kc_ref, vc_ref = b.reference()
    out = backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, b.scale)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(b.k_cache, kc_ref, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(b.v_cache, vc_ref, atol=0, rtol=0, equal_nan=True)


def test_backend_decode_with_fixed_splits():
    b = Batch([1, 1], [7, 66], 16, 8, 2, 16, torch.float32)
    ref, _, _ = b.reference()
    out = triton_backend.TritonBackend(decode_num_splits=4).forward(
        b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, b.scale)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


# ------------------------------------------------------------------------------------------------ elementwise
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, with_residual):
    T, N, eps = 7, 96, 1e-6
    norm = _random_norm(N, eps, dtype)
    x = torch.randn(T, N, device=DEVICE).to(dtype)
    residual = torch.randn(T, N, device=DEVICE).to(dtype) if with_residual else None
    out, res_out = _nan((T, N), dtype), _nan((T, N), dtype)
    got, new_res = rms_norm(x, norm.weight, eps, residual, out=out,
                            residual_out=res_out if with_residual else None)
    summed = residual + x if with_residual else x
    with torch.no_grad():
        expected = norm(summed)
    assert got is out
    torch.testing.assert_close(got, expected, **TOL[dtype])
    # exact on the GPU; NOTE: the CPU interpreter truncates fp32 -> bf16 instead of rounding (1 ulp)
    exact = DEVICE == "cuda" or dtype == torch.float32
    torch.testing.assert_close(new_res, summed, atol=0, rtol=0 if exact else 2 ** -7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype):
    T, inter = 5, 40
    x = (3 * torch.randn(T, 2 * inter, device=DEVICE)).to(dtype)
    out = _nan((T, inter), dtype)
    silu_and_mul(x, out=out)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(out, F.silu(gate) * up, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,head_dim", [((4, 2), 16), ((6, 2), 32), ((2, 1), 64)])
def test_apply_rotary_in_place(dtype, heads, head_dim):
    T, (Hq, Hkv), D = 6, heads, head_dim
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, device=DEVICE).to(dtype)
    q = qkv[:, :Hq * D].view(T, Hq, D)  # views into the fused projection output, as the layer has them
    k = qkv[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D)
    angles = torch.rand(T, D // 2, device=DEVICE) * 100
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    q_exp, k_exp, v_before = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), qkv[:, (Hq + Hkv) * D:].clone()
    apply_rotary_(q, k, cos, sin)
    torch.testing.assert_close(q, q_exp, **TOL[dtype])
    torch.testing.assert_close(k, k_exp, **TOL[dtype])
    assert torch.equal(qkv[:, (Hq + Hkv) * D:], v_before)  # v untouched


# ------------------------------------------------------------------------------------------------ GPU shapes
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("heads,head_dim", [((14, 2), 64), ((32, 8), 128)], ids=["qwen0.5b", "llama8b"])
@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_real_shapes_bf16_gpu(heads, head_dim, kind):
    if kind == "decode":
        batch = ([1] * 16, torch.randint(1, 3000, (16,)).tolist())
    else:
        batch = ([300, 1, 77, 1, 513], [300, 1200, 2100, 9, 700])
    b = Batch(*batch, 16, *heads, head_dim, torch.bfloat16)
    ref, _, _ = b.reference()
    triton_backend.register()
    for num_splits in (None, 1, 16):
        k_cache, v_cache = b.k_cache.clone(), b.v_cache.clone()
        out = triton_backend.TritonBackend(decode_num_splits=num_splits).forward(
            b.q, b.k, b.v, k_cache, v_cache, b.meta, b.scale)
        torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])
