"""Step inputs (pinned buffer, one copy), the fused decoder path, the greedy fast path and decode CUDA graphs.

CPU: the step tensors equal ``build_metadata`` (eager and graph layouts, incremental block tables); the
fused decoder path (Triton under TRITON_INTERPRET=1) equals the torch path; greedy sampling equals Sampler.
GPU (marked): graph decode == eager decode, greedy tokens == the reference backend in fp32, graphs stay
valid after in-place weight updates.
"""
import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is first imported

from engine.attention import build_metadata, build_positions, get_backend  # noqa: E402
from engine.cuda_graphs import decode_splits, graph_batch_sizes  # noqa: E402
from engine.model_runner import ModelRunner  # noqa: E402
from engine.sampling import Sampler, SamplingRow  # noqa: E402
from engine.step_inputs import GraphInputs, Layout, StepInputs  # noqa: E402
from scheduler import ScheduledSequence  # noqa: E402

BS = 4


def _item(seq_id, start, n, blocks, sample=True, out=1, rng=None):
    rng = rng or random.Random(seq_id)
    return ScheduledSequence(seq_id=seq_id, request_id=f"r{seq_id}", sample_index=0,
                             token_ids=[rng.randrange(1000) for _ in range(n)], start_pos=start,
                             block_ids=list(blocks), sample=sample, num_output_tokens=out)


def _random_items(rng, num, decode_only=False):
    items, free = [], list(range(500))
    rng.shuffle(free)
    for sid in range(num):
        n = 1 if decode_only or rng.random() < 0.5 else rng.randrange(1, 30)
        start = rng.randrange(0, 60)
        need = -(-(start + n) // BS) + rng.randrange(0, 2)   # sometimes a spare block
        blocks = [free.pop() for _ in range(need)]
        items.append(_item(sid, start, n, blocks, sample=rng.random() < 0.8 or decode_only,
                           out=1 if n == 1 else 0, rng=rng))
    return items


def _expected(items):
    q = [it.num_tokens for it in items]
    s = [it.seq_len for it in items]
    return build_metadata(q, s, [it.block_ids for it in items], BS, "cpu")


def _assert_meta_equal(meta, ref, width_exact=True):
    assert meta.query_lens == ref.query_lens and meta.seq_lens == ref.seq_lens
    assert torch.equal(meta.query_start_loc, ref.query_start_loc)
    assert torch.equal(meta.seq_lens_tensor, ref.seq_lens_tensor)
    assert torch.equal(meta.slot_mapping, ref.slot_mapping)
    assert meta.slot_mapping.dtype == torch.int64 and meta.block_tables.dtype == torch.int32
    for i, n in enumerate(ref.seq_lens):  # only the blocks a sequence uses are defined
        used = -(-n // BS)
        assert torch.equal(meta.block_tables[i, :used], ref.block_tables[i, :used])
    if width_exact:
        assert meta.block_tables.shape == ref.block_tables.shape


@pytest.mark.parametrize("seed", range(6))
def test_step_inputs_match_build_metadata(seed):
    rng = random.Random(seed)
    inputs = StepInputs(BS, torch.device("cpu"))
    for _ in range(3):  # the buffer is reused (and grown) across steps
        items = _random_items(rng, rng.randrange(1, 12))
        step = inputs.prepare(items, sum(it.num_tokens for it in items))
        ref = _expected(items)
        _assert_meta_equal(step.meta, ref)
        assert step.input_ids.tolist() == [t for it in items for t in it.token_ids]
        assert step.positions.tolist() == build_positions(ref.query_lens, ref.seq_lens).tolist()
        ends = np.cumsum(ref.query_lens) - 1
        assert step.sample_items == [i for i, it in enumerate(items) if it.sample]
        assert step.sample_rows.tolist() == [int(ends[i]) for i in step.sample_items]


def test_incremental_block_tables_follow_growing_decodes():
    rng = random.Random(3)
    inputs = StepInputs(BS, torch.device("cpu"))
    tables = {sid: [rng.randrange(1000) for _ in range(rng.randrange(1, 4))] for sid in range(5)}
    lens = {sid: (len(bt) - 1) * BS + 1 for sid, bt in tables.items()}
    for step_no in range(3 * BS):
        items = []
        for sid in sorted(tables):
            if lens[sid] + 1 > len(tables[sid]) * BS:
                tables[sid].append(rng.randrange(1000, 2000))   # crosses into a new block
            items.append(_item(sid, lens[sid], 1, tables[sid], out=step_no + 1))
            lens[sid] += 1
        _assert_meta_equal(inputs.prepare(items, len(items)).meta, _expected(items))
    # a new turn (num_output_tokens == 0) with different blocks of the same count rebuilds the table
    items = [_item(sid, lens[sid], 1, [b + 5000 for b in tables[sid]], out=0) for sid in sorted(tables)]
    _assert_meta_equal(inputs.prepare(items, len(items)).meta, _expected(items))


@pytest.mark.parametrize("t, b, r, w", [(1, 1, 1, 1), (7, 3, 2, 5), (8193, 255, 17, 33), (21, 2, 1, 2)])
def test_every_staging_section_is_16_byte_aligned(t, b, r, w):
    """Triton compiles a kernel variant per pointer-alignment class: sections whose alignment followed T and B
    made a fresh machine compile attention kernels mid-run."""
    lay = Layout(t, b, r, w)
    offsets = [lay.ids, lay.pos, lay.slots, lay.seq_lens, lay.qsl, lay.rows, lay.tables, lay.nbytes]
    assert all(o % 16 == 0 for o in offsets), offsets
    sizes = [8 * t, 8 * t, 8 * t, 4 * b, 4 * (b + 1), 8 * r, 4 * b * w]
    assert all(offsets[i] + sizes[i] <= offsets[i + 1] for i in range(7))   # sections never overlap


def test_step_inputs_reject_short_block_tables():
    inputs = StepInputs(BS, torch.device("cpu"))
    with pytest.raises(ValueError, match="needs 3 blocks"):
        inputs.prepare([_item(0, 8, 2, [1, 2])], 2)


@pytest.mark.parametrize("num", [1, 3, 8])
def test_graph_inputs_layout(num):
    """The graph path's static buffers (on CPU here) hold exactly the eager metadata, padded."""
    rng = random.Random(num)
    inputs = StepInputs(BS, torch.device("cpu"))
    graph = GraphInputs(8, 32, BS, torch.device("cpu"))
    batch = 8
    for _ in range(2):
        items = _random_items(rng, num, decode_only=True)
        inputs.prepare_graph_decode(items, graph, batch)
        meta, ref = graph.metadata(batch), _expected(items)
        assert torch.equal(meta.seq_lens_tensor[:num], ref.seq_lens_tensor)
        assert meta.seq_lens_tensor[num:].eq(0).all()
        assert torch.equal(meta.slot_mapping[:num], ref.slot_mapping)
        assert meta.slot_mapping[num:].eq(-1).all()
        assert meta.query_start_loc.tolist() == list(range(batch + 1))
        assert graph.input_ids[:num].tolist() == [it.token_ids[0] for it in items]
        assert graph.positions[:num].tolist() == [it.start_pos for it in items]
        for i, n in enumerate(ref.seq_lens):
            used = -(-n // BS)
            assert torch.equal(meta.block_tables[i, :used], ref.block_tables[i, :used])


def test_graph_sizes_and_splits():
    assert graph_batch_sizes(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert graph_batch_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert graph_batch_sizes(1024) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert decode_splits(1, 2, 132) == 16 and decode_splits(256, 2, 132) == 1
    # eager steps also bound the split count by the context: at least two 64-token tiles per split
    from engine.attention.base import decode_split_count
    assert decode_split_count(1, 2, 132, 64, max_seq_len=100) == 1
    assert decode_split_count(1, 2, 132, 64, max_seq_len=4096) == 32
    assert decode_split_count(1, 2, 132, 64, max_seq_len=10 ** 6) == 64      # 2 x 132 / 2 = 132 -> capped
    assert decode_split_count(3, 2, 132, 64, max_seq_len=10 ** 6) == 64      # 44 -> next power of two
    assert all(s & (s - 1) == 0 for s in (decode_splits(b, 8, 132) for b in range(1, 300)))


def _sample(runner, logits, rows):
    """The runner's sampling of one step whose every item samples -> (ids, logprobs, tops) in row order."""
    from scheduler import ScheduledSequence

    items = [ScheduledSequence(seq_id=100 + i, request_id=f"r{i}", sample_index=0, token_ids=[1], start_pos=0,
                               block_ids=[0], sample=True, num_output_tokens=0) for i in range(len(rows))]
    greedy = all(r.is_greedy and r.num_logprobs is None for r in rows)
    pending = runner._sample(logits, items, list(range(len(rows))), rows, greedy)
    out = pending.read()
    res = [out[it.seq_id] for it in items]
    tops = [r.top_logprobs for r in res]
    return pending, [r.token_id for r in res], [r.logprob for r in res], (None if all(t is None for t in tops)
                                                                          else tops)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_greedy_fast_path_equals_sampler(kernel):
    torch.manual_seed(0)
    logits = torch.randn(7, 5000) * 5
    rows = [SamplingRow(0.0, -1, 1.0, 0.0, None, 0, i, None) for i in range(7)]
    runner = ModelRunner.__new__(ModelRunner)
    runner.sampler = Sampler(0)
    runner.device = torch.device("cpu")
    runner._greedy_kernel = None
    runner.kernel_sampler = None   # the torch sampler for non-greedy rows (the sort-free kernel: test_sampling_kernel.py)
    if kernel == "triton":   # the CUDA path's two kernels (interpreted on the CPU)
        from engine.kernels.greedy import greedy_sample
        runner._greedy_kernel = greedy_sample
        if torch.cuda.is_available():
            runner.device = torch.device("cuda")
            logits = logits.cuda()
    pending, ids, lps, tops = _sample(runner, logits, rows)
    assert pending.on_device and pending.token_ids.tolist() == ids  # chainable: ids stay on the device
    # independent oracle: float64 argmax and log_softmax (fp32 reductions differ in the last bits)
    oracle = torch.log_softmax(logits.double(), dim=-1)
    assert ids == oracle.argmax(-1).tolist() and tops is None
    assert max(abs(a - b) for a, b in zip(lps, oracle.max(-1).values.tolist())) < 1e-5
    ref = Sampler(0)(logits, rows)
    assert ids == ref.token_ids
    if kernel == "triton":
        return
    # a non-greedy row (or top logprobs) goes through Sampler
    rows[3] = SamplingRow(0.7, 5, 1.0, 0.0, 42, 0, 0, 2)
    pending, ids, lps, tops = _sample(runner, logits, rows)
    ref = Sampler(0)(logits, rows)
    assert pending.on_device and pending.token_ids.tolist() == ids  # sampled rows stay on the device too
    assert ids == ref.token_ids and lps == ref.logprobs
    assert tops[3] == ref.top_logprobs[3] and all(t is None for i, t in enumerate(tops) if i != 3)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_fused_decoder_path_matches_torch_path(arch, tmp_path):
    """Same model, same paged batch: Triton fused ops (interpreted on CPU) vs torch ops, fp32."""
    pytest.importorskip("triton")
    from engine.kv_cache import allocate_kv_cache
    from engine.tiny_models import make_tiny_model
    from engine.weights import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = make_tiny_model(arch, tmp_path / arch, seed=2)
    model, config = load_model(path, torch.float32, device)
    backend = get_backend("reference")
    q, s = [5, 1, 3], [5, 9, 12]
    tables = [[0, 1], [2, 3, 4], [5, 6, 7]]
    meta = build_metadata(q, s, tables, BS, device)
    ids = torch.randint(0, config.vocab_size, (sum(q),), device=device)
    pos = torch.from_numpy(build_positions(q, s)).to(device)
    outs = []
    for fused in (False, True):
        model.use_fused_ops = fused
        caches = allocate_kv_cache(config, 8, BS, torch.float32, device)
        # fill the prefixes the same way on both paths: prefill every sequence first
        full = build_metadata(s, s, tables, BS, device)
        full_ids = torch.randint(0, config.vocab_size, (sum(s),), generator=torch.Generator().manual_seed(1)).to(device)
        model(full_ids, torch.from_numpy(build_positions(s, s)).to(device), caches, full, backend)
        outs.append(model.compute_logits(model(ids, pos, caches, meta, backend)))
    model.use_fused_ops = None
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("num_seqs", [1, 3])
def test_gemv_decoder_path_matches_torch_path(arch, num_seqs, tmp_path):
    """Decode rows through the matrix-vector path (norm inside the projections, SiLU inside the down
    projection) with the Triton backend (rotary inside the KV store) vs the torch ops and the reference
    backend: the same logits and the same cache contents, fp32."""
    pytest.importorskip("triton")
    from engine.attention import triton_backend
    from engine.kv_cache import allocate_kv_cache
    from engine.tiny_models import make_tiny_model
    from engine.weights import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = make_tiny_model(arch, tmp_path / arch, seed=3)
    model, config = load_model(path, torch.float32, device)
    triton_backend.register()
    s = [5, 9, 12][:num_seqs]
    tables = [[0, 1], [2, 3, 4], [5, 6, 7]][:num_seqs]
    meta = build_metadata([1] * num_seqs, s, tables, BS, device)
    ids = torch.randint(0, config.vocab_size, (num_seqs,), device=device)
    pos = torch.tensor([n - 1 for n in s], device=device)
    prefix = build_metadata([n - 1 for n in s], [n - 1 for n in s], tables, BS, device)
    prefix_ids = torch.randint(0, config.vocab_size, (sum(s) - num_seqs,),
                               generator=torch.Generator().manual_seed(1)).to(device)
    prefix_pos = torch.from_numpy(build_positions([n - 1 for n in s], [n - 1 for n in s])).to(device)
    outs, caches_after = [], []
    for fused, backend_name, rows in ((False, "reference", 0), (True, "triton", 4)):
        model.use_fused_ops = fused
        model.set_gemv_rows(rows)
        assert all(layer.gemv_rows == rows for layer in model.layers)
        backend = get_backend(backend_name)
        caches = allocate_kv_cache(config, 8, BS, torch.float32, device)
        model.use_fused_ops = False
        model(prefix_ids, prefix_pos, caches, prefix, get_backend("reference"))  # the same prefix both ways
        model.use_fused_ops = fused
        outs.append(model.compute_logits(model(ids, pos, caches, meta, backend)))
        caches_after.append(caches)
    model.use_fused_ops = None
    model.set_gemv_rows(0)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    written = meta.slot_mapping
    for (k0, v0), (k1, v1) in zip(*caches_after):
        torch.testing.assert_close(k1.view(-1, *k1.shape[2:])[written], k0.view(-1, *k0.shape[2:])[written],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v1.view(-1, *v1.shape[2:])[written], v0.view(-1, *v0.shape[2:])[written],
                                   rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _assert_same_tokens(got, ref, logprob_tol: float) -> None:
    """Completions of the same prompts: equal token ids, logprobs within ``logprob_tol``."""
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]
    assert max(abs(a - b) for x, y in zip(got, ref) for a, b in zip(x.logprobs, y.logprobs)) < logprob_tol


def _engine(path, dtype, backend=None, **kw):
    from engine import EngineConfig, LLMEngine
    return LLMEngine(EngineConfig(model=str(path), device="cuda", dtype=dtype, attention_backend=backend,
                                  max_model_len=kw.pop("max_model_len", 1024), **kw))


@pytest.mark.gpu
@gpu
def test_graph_decode_equals_eager_bf16_real_shape(tmp_path):
    from engine import SamplingParams
    from engine.tiny_models import write_real_shape_config

    path = write_real_shape_config("qwen2.5-0.5b", tmp_path / "q")
    # no prefix cache: the second pass must compute exactly what the first did, not a cached prefix
    eng = _engine(path, "bfloat16", load_format="dummy", num_kv_blocks=2048, enable_prefix_caching=False)
    assert eng.runner.graphs is not None
    rng = random.Random(0)
    prompts = [[rng.randrange(151000) for _ in range(rng.randrange(5, 300))] for _ in range(37)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    graphed = eng.generate(prompts, params)
    eng.runner.use_cuda_graphs = False
    eager = eng.generate(prompts, params)
    # bf16, and the graphs' split-K count differs from eager's: rounding differs, tokens do not
    _assert_same_tokens(graphed, eager, 5e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("arch", ["qwen2", "llama3"])
def test_graph_greedy_equals_reference_fp32(arch, tmp_path):
    from engine import SamplingParams
    from engine.tiny_models import make_tiny_model

    path = make_tiny_model(arch, tmp_path / arch, seed=11)
    rng = random.Random(1)
    prompts = [[rng.randrange(2, 512) for _ in range(n)] for n in (1, 5, 16, 17, 33, 60, 3, 9, 100)]
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    ref = _engine(path, "float32", "reference").generate(prompts, params)
    fast = _engine(path, "float32")
    assert fast.backend.name == "triton" and fast.runner.graphs is not None
    got = fast.generate(prompts, params)
    _assert_same_tokens(got, ref, 1e-3)
    fast.check_integrity()


@pytest.mark.gpu
@gpu
def test_graphs_valid_after_in_place_weight_update(tmp_path):
    from engine import SamplingParams
    from engine.tiny_models import make_tiny_model

    path = make_tiny_model("qwen2", tmp_path / "m", seed=3)
    eng = _engine(path, "float32")
    prompts = [[3, 4, 5, 6], list(range(10, 40))]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    before = eng.generate(prompts, params)
    with torch.no_grad():
        for p in eng.model.parameters():
            p.mul_(1.5)          # in place: same addresses
    graphed = eng.generate(prompts, params)
    eng.runner.use_cuda_graphs = False
    eager = eng.generate(prompts, params)
    assert [c.token_ids for c in graphed] == [c.token_ids for c in eager]
    assert [c.token_ids for c in graphed] != [c.token_ids for c in before]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama3"])
def test_gemv_graphs_greedy_equal_reference_fp32(arch, tmp_path):
    """Batches of 1-4 rows through graphs captured with the matrix-vector kernels forced on."""
    from engine import SamplingParams
    from engine.tiny_models import make_tiny_model

    path = make_tiny_model(arch, tmp_path / arch, seed=12)
    rng = random.Random(2)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    ref_engine = _engine(path, "float32", "reference")
    fast = _engine(path, "float32", decode_gemv="on")
    assert all(fast.runner.graphs.gemv[bs] for bs in (1, 2, 4)) and not fast.runner.graphs.gemv[8]
    for n in (1, 3, 4):
        prompts = [[rng.randrange(2, 512) for _ in range(rng.randrange(1, 70))] for _ in range(n)]
        ref = ref_engine.generate(prompts, params)
        graphs_before = fast.runner.step_counts["graph"]
        got = fast.generate(prompts, params)
        assert fast.runner.step_counts["graph"] - graphs_before >= 30
        _assert_same_tokens(got, ref, 1e-3)
    fast.check_integrity()


@pytest.mark.gpu
@gpu
def test_gemv_auto_choice_measured_and_equal_bf16_real_shape(tmp_path):
    from engine import SamplingParams
    from engine.tiny_models import write_real_shape_config

    path = write_real_shape_config("qwen2.5-0.5b", tmp_path / "q")
    auto = _engine(path, "bfloat16", load_format="dummy", num_kv_blocks=512, enable_prefix_caching=False,
                   cuda_graph_max_batch=8, seed=5)
    graphs = auto.runner.graphs
    assert set(graphs.timings) == {1, 2, 4}   # measured both ways up to 4 rows, not for 8
    assert all(t["gemv"] > 0 and t["cublas"] > 0 for t in graphs.timings.values())
    for bs, t in graphs.timings.items():
        assert graphs.gemv[bs] == (t["gemv"] < t["cublas"])
    rng = random.Random(3)
    prompts = [[rng.randrange(151000) for _ in range(rng.randrange(5, 200))] for _ in range(3)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    results = {}
    for mode in ("on", "off"):
        eng = _engine(path, "bfloat16", load_format="dummy", num_kv_blocks=512, enable_prefix_caching=False,
                      cuda_graph_max_batch=8, seed=5, decode_gemv=mode)
        results[mode] = eng.generate(prompts, params)
        del eng
    on, off = results["on"], results["off"]
    # The same random weights (seeded). Token 0 comes from the prefill (eager, identical); token 1 from the
    # first decode step, where the two kernel sets round differently in bf16: close logprobs, and the same
    # token unless two logits nearly tie.
    assert [x.token_ids[0] for x in on] == [y.token_ids[0] for y in off]
    same_next = [x.token_ids[1] == y.token_ids[1] for x, y in zip(on, off)]
    assert sum(same_next) >= 2
    for x, y, same in zip(on, off, same_next):
        if same:
            assert abs(x.logprobs[1] - y.logprobs[1]) < 5e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("prompt_len", [37, 32], ids=["partial-last-block", "aligned"])
def test_n_samples_on_the_gpu_match_transformers_fp32(prompt_len, tmp_path):
    """n > 1 on the CUDA path (graphs, block copies on the device, sibling rows from the leader's row):
    every sample's logprobs at T = 1 equal transformers' over its own context (fp32, CPU oracle)."""
    from transformers import AutoModelForCausalLM

    from engine import SamplingParams
    from engine.tiny_models import make_tiny_model
    from tests.engine.test_engine_exactness import _hf_logprobs

    path = make_tiny_model("qwen2", tmp_path / "m", seed=13)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = [(7 * i + 3) % 500 + 2 for i in range(prompt_len)]
    eng = _engine(path, "float32", block_size=16)
    outs = eng.generate([prompt], SamplingParams(n=4, temperature=1.0, seed=9, max_tokens=24, ignore_eos=True))
    assert eng.runner.step_counts["graph"] > 0
    assert len({tuple(c.token_ids) for c in outs}) > 1
    for c in outs:
        ref = _hf_logprobs(hf, prompt, c.token_ids)
        assert (torch.tensor(c.logprobs, dtype=torch.float64) - ref).abs().max().item() < 1e-3
    assert eng.stats()["prefill_tokens"] == prompt_len
    eng.check_integrity()
