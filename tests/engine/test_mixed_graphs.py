"""Mixed-step CUDA graphs (engine.mixed_graphs): the extend kernel over a device work list, the static inputs,
and the forward over them.

CPU (Triton under TRITON_INTERPRET=1): the tiled extend kernel equals the reference backend whatever the order
of the work list and its padding; a forward over the padded static inputs of a bucket equals the eager forward
of the same step (hidden rows and the whole KV cache). GPU (marked): an engine replaying mixed-step graphs
gives the tokens and logprobs of one that runs those steps eagerly, across prefill chunks, prefix-cache hits,
sessions and n > 1.
"""
import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is first imported

from engine.attention import build_metadata, get_backend  # noqa: E402
from engine.mixed_graphs import mixed_graph_sizes  # noqa: E402
from engine.step_inputs import MixedGraphInputs, StepInputs, extend_tiles  # noqa: E402
from scheduler import ScheduledSequence  # noqa: E402

BS = 4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_bucket_sizes_cover_every_step_with_bounded_padding():
    for max_tokens in (16, 100, 512, 2048, 3000):
        sizes = mixed_graph_sizes(max_tokens)
        assert sizes == sorted(set(sizes)) and sizes[0] == 16 and sizes[-1] == max_tokens
        for t in range(1, max_tokens + 1):
            bucket = next(s for s in sizes if s >= t)
            assert bucket - t < 16 or (bucket - t) / t <= 0.125 or bucket == max_tokens, (t, bucket)
    assert mixed_graph_sizes(15) == []


def test_extend_tiles_list_every_tile_once_in_order():
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = rng.integers(1, 70, size=rng.integers(1, 9))
        toks = int(rng.choice([1, 4, 16]))
        out = np.full(int(-(-q.sum() // toks) + len(q)) + 3, 7, np.int32)
        n = extend_tiles(q, toks, out)
        expected = [(i << 16) | j for i, qi in enumerate(q.tolist()) for j in range(-(-qi // toks))]
        assert n == len(expected) and out[:n].tolist() == expected and (out[n:] == -1).all()
    with pytest.raises(ValueError, match="do not fit"):
        extend_tiles(np.array([40]), 4, np.zeros(9, np.int32))


def _cache(num_blocks, hkv, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_blocks, BS, hkv, d, generator=g).to(DEVICE),
            torch.randn(num_blocks, BS, hkv, d, generator=g).to(DEVICE))


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 2)], ids=lambda h: f"gqa{h[0] // h[1]}")
@pytest.mark.parametrize("order", ["in order", "shuffled"])
def test_tiled_extend_equals_reference(heads, order):
    pytest.importorskip("triton")
    from engine.attention.reference import TorchReferenceBackend
    from engine.kernels import paged_extend_attention, store_kv
    from engine.kernels.extend_attention import extend_tile_tokens

    hq, hkv = heads
    d = 32
    query_lens, seq_lens = [5, 1, 23, 1, 8, 2], [5, 40, 37, 3, 8, 19]
    tables, nxt = [], 0
    for s in seq_lens:
        tables.append(list(range(nxt, nxt + -(-s // BS))))
        nxt += len(tables[-1])
    k_cache, v_cache = _cache(nxt, hkv, d, seed=1)
    meta = build_metadata(query_lens, seq_lens, tables, BS, DEVICE)
    g = torch.Generator().manual_seed(2)
    t = sum(query_lens)
    q, k, v = (torch.randn(t, h, d, generator=g).to(DEVICE) for h in (hq, hkv, hkv))
    scale = d ** -0.5
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    ref = TorchReferenceBackend().forward(q, k, v, kc_ref, vc_ref, meta, scale)   # the oracle: torch ops
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    toks = extend_tile_tokens(hq, hkv, d)
    work = np.empty(-(-t // toks) + len(query_lens) + 5, np.int32)
    n = extend_tiles(np.array(query_lens), toks, work)
    if order == "shuffled":   # the kernel must not depend on where a tile sits in the list
        work = np.random.default_rng(3).permutation(work)
    assert (work >= 0).sum() == n
    out = torch.full_like(q, float("nan"))
    paged_extend_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens_tensor, meta.query_start_loc,
                           0, scale, out=out, tiles=torch.from_numpy(work).to(DEVICE))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _items(rng, num_seqs, num_blocks):
    """A mixed step: prefill chunks over cached prefixes and decodes, each sequence with its own blocks."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    items = []
    for sid in range(num_seqs):
        n = 1 if rng.random() < 0.5 else rng.randrange(2, 25)
        start = rng.randrange(0, 30)
        blocks = [free.pop() for _ in range(-(-(start + n) // BS))]
        items.append(ScheduledSequence(seq_id=sid, request_id=f"r{sid}", sample_index=0,
                                       token_ids=[rng.randrange(3, 200) for _ in range(n)], start_pos=start,
                                       block_ids=blocks, sample=rng.random() < 0.8, num_output_tokens=int(n == 1)))
    return items


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_forward_over_padded_static_inputs_equals_the_eager_forward(arch, tmp_path):
    """What a mixed-step graph replays, run without capture: the same step through a bucket's padded static
    inputs (extra tokens, sequence slots and work-list entries) gives the eager step's hidden rows and leaves
    the KV cache exactly as the eager step does (padding writes nothing)."""
    pytest.importorskip("triton")
    from engine.attention import triton_backend
    from engine.kernels.extend_attention import extend_tile_tokens
    from engine.kv_cache import allocate_kv_cache
    from engine.tiny_models import make_tiny_model
    from engine.weights import load_model

    triton_backend.register()
    backend = get_backend("triton")
    model, mc = load_model(make_tiny_model(arch, tmp_path / arch, seed=4), torch.float32, DEVICE)
    model.use_fused_ops = True
    rng = random.Random(5)
    num_blocks = 120
    base = allocate_kv_cache(mc, num_blocks, BS, torch.float32, DEVICE)
    g = torch.Generator().manual_seed(6)
    for k, v in base:   # a random "cached prefix" everywhere
        k.copy_(torch.randn(k.shape, generator=g))
        v.copy_(torch.randn(v.shape, generator=g))
    graph = MixedGraphInputs(96, 12, 16, BS, extend_tile_tokens(mc.num_heads, mc.num_kv_heads, mc.head_dim),
                             torch.device(DEVICE))
    for step in range(3):   # the static inputs are reused: stale entries of a bigger step must not leak
        items = _items(rng, rng.randrange(1, 9), num_blocks)
        t = sum(it.num_tokens for it in items)
        bucket = t + rng.randrange(0, 96 - t + 1)
        eager_caches = [(k.clone(), v.clone()) for k, v in base]
        graph_caches = [(k.clone(), v.clone()) for k, v in base]
        eager = StepInputs(BS, torch.device(DEVICE)).prepare(items, t)
        ref = model(eager.input_ids, eager.positions, eager_caches, eager.meta, backend)[eager.sample_rows]
        static = StepInputs(BS, torch.device(DEVICE)).prepare_graph_mixed(items, t, graph, bucket)
        assert static.sample_items == eager.sample_items and static.input_ids.shape[0] == bucket
        got = model(static.input_ids, static.positions, graph_caches, static.meta, backend)[static.sample_rows]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        written = eager.meta.slot_mapping
        untouched = torch.ones(num_blocks * BS, dtype=torch.bool, device=DEVICE)
        untouched[written] = False
        for (kb, vb), (k0, v0), (k1, v1) in zip(base, eager_caches, graph_caches):
            for c0, c1, cb in ((k0, k1, kb), (v0, v1, vb)):
                c0, c1, cb = (c.view(-1, *c.shape[2:]) for c in (c0, c1, cb))
                # padding wrote nothing: every slot the step does not own is as it was, bit for bit
                assert torch.equal(c1[untouched], cb[untouched]), f"step {step}: a padding token wrote the cache"
                # the step's own slots: the same K/V (a GEMM of more rows may round differently on the CPU)
                torch.testing.assert_close(c1[written], c0[written], rtol=1e-5, atol=1e-5)
    model.use_fused_ops = None


def test_static_inputs_refuse_a_sequence_wider_than_the_capture():
    graph = MixedGraphInputs(32, 4, 2, BS, 16, torch.device("cpu"))
    item = ScheduledSequence(seq_id=0, request_id="r", sample_index=0, token_ids=[1, 2], start_pos=8,
                             block_ids=[0, 1, 2], sample=True, num_output_tokens=0)
    with pytest.raises(ValueError, match="needs 3 blocks; the graphs were captured for 2"):
        StepInputs(BS, torch.device("cpu")).prepare_graph_mixed([item], 2, graph, 16)


# ----------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mixed_graph_engine_equals_eager_engine(dtype, tmp_path):
    from engine import EngineConfig, LLMEngine, SamplingParams
    from engine.tiny_models import make_tiny_model

    path = make_tiny_model("qwen2", tmp_path / "m", seed=7, max_position_embeddings=2048)
    rng = random.Random(8)
    shared = [rng.randrange(3, 500) for _ in range(40)]          # a shared prefix: prefix-cache hits
    prompts = [shared + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 300))] for _ in range(24)]
    greedy = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=0)
    sampled = SamplingParams(max_tokens=16, ignore_eos=True, temperature=1.0, seed=3, n=3)
    results = []
    for max_tokens in (0, 512):
        eng = LLMEngine(EngineConfig(model=str(path), device="cuda", dtype=dtype, max_model_len=2048,
                                     max_num_batched_tokens=512, cuda_graph_max_tokens=max_tokens, seed=1))
        assert (eng.runner.mixed_graphs is not None) == (max_tokens > 0)
        out = [eng.generate(prompts, greedy), eng.generate(prompts[:6], sampled)]
        sid = eng.open_session("s")
        turns = [eng.run_turn(sid, p[:50], greedy).token_ids for p in prompts[:3]]
        results.append((out, turns, dict(eng.runner.step_counts)))
    (eager, eager_turns, eager_counts), (graphed, graphed_turns, counts) = results
    assert eager_counts["mixed graph"] == 0 and counts["mixed graph"] > 0
    assert graphed_turns == eager_turns
    tol = 1e-4 if dtype == "float32" else 0.05
    for a, b in zip(eager, graphed):
        assert [c.token_ids for c in a] == [c.token_ids for c in b]
        assert max(abs(x - y) for c, d in zip(a, b) for x, y in zip(c.logprobs, d.logprobs)) < tol
