"""Split-KV of the extend kernel (engine.kernels.extend_attention, ``EngineConfig.extend_kv_splits``): against the
torch reference, the work-list path bit for bit equal to the eager grid, the host shortcut exact, and the
backend passing its setting on. CPU under TRITON_INTERPRET=1 (set up by test_kernels' import), CUDA natively."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.engine.test_kernels import DEVICE, MIXED, TOL, Batch, _nan  # noqa: F401 - sets up the interpreter

from engine.attention import triton_backend  # noqa: E402
from engine.kernels import extend_attention, paged_extend_attention, store_kv  # noqa: E402
from engine.kernels.extend_attention import extend_tile_tokens  # noqa: E402
from engine.step_inputs import extend_tiles  # noqa: E402

# split-KV: contexts long enough (with 16-key tiles and splits of >= 1-2 tiles) that most tiles split
LONG = ([5, 1, 23, 1, 8, 2, 1], [5, 140, 137, 3, 98, 19, 77])


@pytest.mark.parametrize("splits", [(2, 2), (4, 1), (3, 2)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_kv_extend_matches_reference_eager_and_tiled(splits, dtype):
    max_splits, split_tiles = splits
    b = Batch(*LONG, 4, 8, 2, 32, dtype)
    ref, _, _ = b.reference()
    store_kv(b.k, b.v, b.k_cache, b.v_cache, b.meta.slot_mapping)
    m = b.meta
    eager = _nan(b.q.shape, b.q.dtype)
    paged_extend_attention(b.q, b.k_cache, b.v_cache, m.block_tables, m.seq_lens_tensor, m.query_start_loc,
                           max(m.query_lens), b.scale, out=eager, block_n=16, max_splits=max_splits,
                           split_tiles=split_tiles)
    torch.testing.assert_close(eager, ref, **TOL[dtype])
    # the work-list path (mixed-step graphs), tiles in shuffled order, gives the same bits: a tile's split
    # count depends on its own keys only
    toks = extend_tile_tokens(8, 2, 32)
    work = np.full(-(-b.q.shape[0] // toks) + len(LONG[0]) + 3, -1, np.int32)
    extend_tiles(np.array(LONG[0]), toks, work)
    work = np.random.default_rng(5).permutation(work)
    tiled = _nan(b.q.shape, b.q.dtype)
    paged_extend_attention(b.q, b.k_cache, b.v_cache, m.block_tables, m.seq_lens_tensor, m.query_start_loc, 0,
                           b.scale, out=tiled, block_n=16, max_splits=max_splits, split_tiles=split_tiles,
                           tiles=torch.from_numpy(work).to(DEVICE))
    assert torch.equal(tiled, eager)


def test_the_backend_passes_its_split_setting_to_the_kernel(monkeypatch):
    # EngineConfig.extend_kv_splits -> TritonBackend.extend_max_splits -> the kernel's max_splits (steps of up to
    # 1,024 tokens); the call goes through to the real kernel, whose result is checked against the reference
    from engine import EngineConfig
    seen = []
    real = extend_attention.paged_extend_attention

    def recording(*args, **kwargs):
        seen.append(kwargs.get("max_splits"))
        return real(*args, **kwargs)
    monkeypatch.setattr(extend_attention, "paged_extend_attention", recording)
    b = Batch(*LONG, 4, 8, 2, 32, torch.float32)
    ref, _, _ = b.reference()
    for splits in (1, 3):
        out = triton_backend.TritonBackend(extend_max_splits=splits).forward(
            b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, b.scale)
        torch.testing.assert_close(out, ref, **TOL[torch.float32])
    assert seen == [1, 3]
    for bad in (0, 17, 2.0, True):
        with pytest.raises(ValueError, match="extend_kv_splits"):
            EngineConfig(model="unused", extend_kv_splits=bad)


def test_split_kv_is_skipped_exactly_when_no_tile_would_split():
    # the host shortcut (max_seq_len below two splits' keys -> no partials) gives the bits of the split kernel
    b = Batch(*MIXED, 4, 4, 2, 32, torch.float32)
    store_kv(b.k, b.v, b.k_cache, b.v_cache, b.meta.slot_mapping)
    m = b.meta
    outs = []
    for max_seq_len in (None, max(m.seq_lens)):
        out = _nan(b.q.shape, b.q.dtype)
        paged_extend_attention(b.q, b.k_cache, b.v_cache, m.block_tables, m.seq_lens_tensor, m.query_start_loc,
                               max(m.query_lens), b.scale, out=out, block_n=16, max_splits=4, split_tiles=2,
                               max_seq_len=max_seq_len)
        outs.append(out)
    assert max(m.seq_lens) < 2 * 2 * 16 and torch.equal(outs[0], outs[1])
