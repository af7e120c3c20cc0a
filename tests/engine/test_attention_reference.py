"""The pure-torch paged backend against dense causal attention written independently (SDPA per
sequence on the un-paged K/V), plus the metadata builder's slot arithmetic."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.attention import (AttentionMetadata, TorchReferenceBackend, build_metadata, build_positions,
                              get_backend)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2), (8, 1)])
def test_paged_attention_matches_dense(dtype, num_heads, num_kv_heads):
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
    backend = TorchReferenceBackend()

    def run(seq_ids, lo, hi):
        meta = build_metadata([h - l for l, h in zip(lo, hi)], hi, [tables[i] for i in seq_ids], block_size)

        def cat(xs):
            return torch.cat([xs[i][l:h] for i, l, h in zip(seq_ids, lo, hi)])
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


def test_metadata_is_exported():
    assert AttentionMetadata is build_metadata([1], [1], [[0]], 16).__class__
    assert np.array_equal(build_positions([], []), np.zeros(0, np.int64))
