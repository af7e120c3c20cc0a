"""The pure-torch paged backend against dense causal attention written independently (SDPA per
sequence on the un-paged K/V), plus the metadata builder's slot arithmetic."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.attention import (AttentionMetadata, CpuBatchedBackend, TorchReferenceBackend, build_metadata,
                              build_positions, choose_backend, get_backend)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


def dense_causal(q, k, v, scale):
    """q: [S, Hq, D] for positions [0, S); k, v: [S, Hkv, D] -> [S, Hq, D] (float32)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1).float(), k.transpose(0, 1).float(),
                                         v.transpose(0, 1).float(), is_causal=True, scale=scale)
    return out.transpose(0, 1)


def test_get_backend():
    assert isinstance(get_backend("reference"), TorchReferenceBackend)
    assert get_backend("reference").name == "reference"
    with pytest.raises(ValueError, match="triton-nope"):
        get_backend("triton-nope")


def test_build_metadata_slots_and_positions():
    block_size = 4
    tables = [[7, 2, 9], [5], [3, 0, 8, 1]]
    query_lens, seq_lens = [3, 1, 13], [10, 2, 13]
    meta = build_metadata(query_lens, seq_lens, tables, block_size)
    expected_slots, expected_pos = [], []
    for table, ql, sl in zip(tables, query_lens, seq_lens):
        for p in range(sl - ql, sl):
            expected_pos.append(p)
            expected_slots.append(table[p // block_size] * block_size + p % block_size)
    assert meta.slot_mapping.dtype == torch.int64
    assert meta.slot_mapping.tolist() == expected_slots
    assert build_positions(query_lens, seq_lens).tolist() == expected_pos
    assert meta.query_start_loc.tolist() == [0, 3, 4, 17]
    assert meta.query_start_loc.dtype == meta.seq_lens_tensor.dtype == meta.block_tables.dtype == torch.int32
    assert meta.seq_lens_tensor.tolist() == seq_lens
    assert meta.block_tables.shape == (3, 4)
    assert meta.block_tables[2].tolist() == tables[2]
    assert meta.num_tokens == 17 and meta.num_seqs == 3


def test_build_metadata_rejects_bad_input():
    with pytest.raises(ValueError, match="needs 3 blocks"):
        build_metadata([1], [9], [[0, 1]], 4)
    with pytest.raises(ValueError, match="query_len"):
        build_metadata([5], [4], [[0, 1]], 4)
    with pytest.raises(ValueError, match="one entry per sequence"):
        build_metadata([1, 1], [1], [[0]], 4)


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2), (8, 1)])
def test_paged_attention_matches_dense(dtype, num_heads, num_kv_heads, backend_name):
    """Fill prefixes in one step, then a mixed step (chunk over cached prefix, decode, fresh prefill)."""
    torch.manual_seed(0)
    head_dim, block_size, num_blocks = 16, 4, 40
    scale = head_dim ** -0.5
    lengths = [19, 6, 11, 1]
    cached = [8, 5, 0, 0]  # tokens already in the cache before step 2
    full_q = [torch.randn(n, num_heads, head_dim).to(dtype) for n in lengths]
    full_k = [torch.randn(n, num_kv_heads, head_dim).to(dtype) for n in lengths]
    full_v = [torch.randn(n, num_kv_heads, head_dim).to(dtype) for n in lengths]
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    pool = list(range(num_blocks))
    random.Random(1).shuffle(pool)
    tables = [[pool.pop() for _ in range(-(-n // block_size))] for n in lengths]
    backend = get_backend(backend_name)   # "cpu": the mixed step's two decode rows (lengths 6 and 1) batched

    def run(seq_ids, lo, hi):
        meta = build_metadata([h - a for a, h in zip(lo, hi)], hi, [tables[i] for i in seq_ids], block_size)

        def cat(xs):
            return torch.cat([xs[i][a:h] for i, a, h in zip(seq_ids, lo, hi)])
        out = backend.forward(cat(full_q), cat(full_k), cat(full_v), k_cache, v_cache, meta, scale)
        return out.split(meta.query_lens)

    prefix_ids = [i for i, c in enumerate(cached) if c > 0]
    run(prefix_ids, [0] * len(prefix_ids), [cached[i] for i in prefix_ids])
    seq_ids = list(range(len(lengths)))
    outs = run(seq_ids, cached, lengths)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for i, out in enumerate(outs):
        assert out.dtype == dtype and out.shape == (lengths[i] - cached[i], num_heads, head_dim)
        expected = dense_causal(full_q[i], full_k[i], full_v[i], scale)[cached[i]:]
        torch.testing.assert_close(out.float(), expected, **tol)
        # the cache holds every token's K/V at its slot
        slots = [tables[i][p // block_size] * block_size + p % block_size for p in range(lengths[i])]
        assert torch.equal(k_cache.view(-1, num_kv_heads, head_dim)[slots], full_k[i])
        assert torch.equal(v_cache.view(-1, num_kv_heads, head_dim)[slots], full_v[i])


def test_cpu_is_the_default_off_cuda_and_keeps_the_reference_on_request():
    assert choose_backend(None, torch.device("cpu")) == "cpu"
    assert choose_backend("reference", torch.device("cpu")) == "reference"
    assert isinstance(get_backend("cpu"), CpuBatchedBackend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_backend_equals_the_reference_on_decode_and_mixed_steps(dtype):
    """Many decode rows of different lengths (one past a block boundary, one of a single token), alone and
    mixed with prefill chunks in any order: the same outputs as the reference's loop to float32 rounding, the same
    cache contents bitwise. bf16: the reference's own loop, so bitwise."""
    gen = torch.Generator().manual_seed(3)
    num_heads, num_kv_heads, head_dim, block_size, num_blocks = 6, 2, 16, 4, 96
    scale = head_dim ** -0.5
    for step in ("decode", "mixed"):
        seq_lens = [1, 4, 5, 17, 33, 2, 9, 40, 12]
        query_lens = [1] * len(seq_lens)
        if step == "mixed":
            query_lens[2], query_lens[5], query_lens[7] = 5, 2, 7     # chunks among the decode rows
        pool = torch.randperm(num_blocks, generator=gen).tolist()
        tables = [[pool.pop() for _ in range(-(-n // block_size) + 1)] for n in seq_lens]  # one spare block each
        caches = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
        meta = build_metadata(query_lens, seq_lens, tables, block_size)
        t = sum(query_lens)
        q = torch.randn(t, num_heads, head_dim, generator=gen).to(dtype)
        k = torch.randn(t, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(t, num_kv_heads, head_dim, generator=gen).to(dtype)
        ref_k, ref_v = caches[0].clone(), caches[1].clone()
        expected = TorchReferenceBackend().forward(q, k, v, ref_k, ref_v, meta, scale)
        k_cache, v_cache = caches[0].clone(), caches[1].clone()
        out = CpuBatchedBackend().forward(q, k, v, k_cache, v_cache, meta, scale)
        if dtype == torch.float32:
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(out, expected)
        assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_metadata_is_exported():
    assert AttentionMetadata is build_metadata([1], [1], [[0]], 16).__class__
    assert np.array_equal(build_positions([], []), np.zeros(0, np.int64))
