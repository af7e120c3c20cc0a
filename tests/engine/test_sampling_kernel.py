"""The sort-free sampling kernel (engine.kernels.sampling, through engine.sampling_triton.TritonSampler)
against the reference sampler's semantics: float64 reference distributions, logprobs and seeds.

On the CPU the kernel runs under ``TRITON_INTERPRET=1`` with many rows a program (the interpreter pays per
operation); ``test_rows_per_program_do_not_change_results`` pins that this gives what the GPU's one row a
program gives. The statistical tests are deterministic (fixed seeds) with ~5-sigma bounds, as in
test_sampling.py. On CUDA the same tests run natively, and the gpu-marked ones check the 151,936-token
vocabulary and CUDA-graph capture.
"""
from __future__ import annotations

import importlib
import math
import os
import sys

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # NOTE: must precede the first import of triton and of the kernel module (jit reads it at decoration).
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

if not torch.cuda.is_available() and "engine.kernels.sampling" in sys.modules:
    # imported earlier in this process without the interpreter: re-decorate the kernel
    importlib.reload(sys.modules["engine.kernels.sampling"])
    if "engine.sampling_triton" in sys.modules:
        importlib.reload(sys.modules["engine.sampling_triton"])

import triton.language as tl  # noqa: E402

from engine.kernels.sampling import BLOCK_V, NUM_PARAMS, _chain, _race_key, sample_logits  # noqa: E402
from engine.sampling import Sampler  # noqa: E402
from engine.sampling_triton import TritonSampler, pack_rows  # noqa: E402
from tests.engine.test_sampling import (CASES, LOGITS, TIED_AT_TOP_P, TOP_P_AT_TIE, empirical,  # noqa: E402
                                        reference_distribution, reference_log_softmax, row)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Rows a program: the GPU's 1, or many under the interpreter (same results, see below). Small tiles for many of
# them on small vocabularies under the interpreter; on CUDA the launcher's own (every variant is a compile).
BLOCK_ROWS = 1 if CUDA else 4096
SMALL_TILE = None if CUDA else 16
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the interpreter's numpy on -inf lanes


def _tiling(kw: dict) -> dict:
    """The tiling a test asks for under the interpreter; the GPU's on CUDA."""
    if CUDA:
        return {k: v for k, v in kw.items() if k not in ("block_rows", "block_v")} | {"block_rows": 1}
    return {"block_rows": BLOCK_ROWS, **kw}


def kernel_sampler(seed: int = 0, **kw) -> TritonSampler:
    return TritonSampler(seed, **_tiling(kw))


def draw(logits: torch.Tensor, kw: dict, n: int, seed: int = 1234, **sampler_kw) -> list[int]:
    """n unseeded draws of one row (n identical rows in one batch: a stride-0 view, read n times)."""
    batch = logits.to(DEVICE).expand(n, logits.numel())
    return kernel_sampler(seed, **sampler_kw)(batch, [row(**kw) for _ in range(n)]).token_ids


# ---------------------------------------------------------------- the noise, bit for bit


@triton.jit
def _noise_probe(words_ptr, race_ptr, key_ptr, N: tl.constexpr):
    """-log(E) at columns 0..N-1 of the stream keyed by the 4 words (round 0), and the words' key."""
    h = tl.zeros([1], dtype=tl.uint64)
    for w in tl.static_range(4):
        h = _chain(h, tl.load(words_ptr + w + tl.zeros([1], dtype=tl.int32)).to(tl.uint64, bitcast=True))
    stream = _chain(h, tl.zeros([1], dtype=tl.uint64))
    tl.store(key_ptr + tl.arange(0, 1), h.to(tl.int64, bitcast=True))
    cols = tl.arange(0, N)[None, :]
    tl.store(race_ptr + cols, _race_key(tl.zeros([1, N], dtype=tl.float32), stream[:, None], cols))


def _splitmix64(x: int) -> int:
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def test_noise_is_splitmix64_and_exponential_to_float_precision():
    """The key chain is engine.sampling.mix64's; token i's uniform is SplitMix64 at position i + 1 of the round's
    stream (23 bits, open interval); E = -log(1 - u) to ~1e-6 relative, small E included (where a race is won)."""
    words = [123456789, -3, 2 ** 63 - 7, 1]
    n = 1 << 16
    race = torch.empty(n, dtype=torch.float32, device=DEVICE)
    key = torch.empty(1, dtype=torch.int64, device=DEVICE)
    _noise_probe[(1,)](torch.tensor(words, dtype=torch.int64, device=DEVICE), race, key, N=n)
    h = 0
    for w in words:
        h = _splitmix64(h ^ (w & ((1 << 64) - 1)))
    assert key.item() & ((1 << 64) - 1) == h
    stream = _splitmix64(h ^ 0)
    i = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(stream) + i * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = ((z >> np.uint64(41)).astype(np.float64) + 0.5) / 2 ** 23
    expected = -np.log1p(-u)
    got = np.exp(-race.double().cpu().numpy())
    np.testing.assert_allclose(got, expected, rtol=5e-5, atol=0)
    assert expected.min() < 1e-4 and abs(expected.mean() - 1) < 0.02      # the small tail is in the check


# ---------------------------------------------------------------- distributions


def assert_distribution(tokens: list[int], expected: np.ndarray) -> None:
    """Filtered tokens never drawn; each token within 5 standard errors; Pearson's chi-square below its
    1e-6 upper quantile (Wilson-Hilferty), so a correct sampler passes for any seed."""
    n = len(tokens)
    observed = empirical(tokens, len(expected))
    assert not np.any(observed[expected == 0.0]), (observed, expected)
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(observed - expected) <= 5 * sigma + 1e-9), (observed, expected)
    kept = expected > 0
    chi2 = n * float((((observed - expected)[kept]) ** 2 / expected[kept]).sum())
    df = int(kept.sum()) - 1
    if df > 0:
        z = 4.753  # standard normal 1 - 1e-6 quantile
        assert chi2 < df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3, (chi2, df, observed, expected)


def assert_grouped(tokens: list[int], expected: np.ndarray, singles: int = 100, groups: int = 20) -> None:
    """For a large vocabulary: filtered tokens never drawn; the ``singles`` likeliest tokens one by one and the
    rest of the support in ``groups`` runs of consecutive ranks, each within 5 standard errors."""
    n = len(tokens)
    observed = empirical(tokens, len(expected))
    assert not np.any(observed[expected == 0.0]), "a filtered token was drawn"
    support = np.argsort(-expected, kind="stable")[:int((expected > 0).sum())]
    parts = [support[i:i + 1] for i in range(min(singles, len(support)))]
    parts += [g for g in np.array_split(support[singles:], groups) if len(g)]
    for g in parts:
        e, o = expected[g].sum(), observed[g].sum()
        assert abs(o - e) <= 5 * math.sqrt(e * (1 - e) / n) + 1e-9, (len(g), o, e)


N = 12_000
# Ties at the top-k boundary (kept, as the reference keeps them) and a bf16 row: at T = 1 its keys have
# zero low bits, the radix select's early exit.
TIED = torch.tensor([2.0, 1.25, 0.75, 0.75, 0.75, -0.5, -1.25, -2.5])
KERNEL_CASES = {
    **{name: (LOGITS, kw) for name, kw in CASES.items()},
    "top_k 3, tied k-th (5 kept)": (TIED, dict(temperature=1.0, top_k=3)),
    "bf16, top_k 4 + top_p 0.9": (TIED.bfloat16(), dict(temperature=1.0, top_k=4, top_p=0.9)),
    "top_p ending in a tie (both kept)": (TIED_AT_TOP_P, dict(temperature=1.0, top_p=TOP_P_AT_TIE)),
}


# On the CPU the paths the other cases take already (temperature 1: the first-pass race as at 0.5 and 2;
# top_p 0.7: the rejection rounds over the logits as at T 1.5) are left to the GPU run, for time.
CPU_CASES = [c for c in KERNEL_CASES if CUDA or c not in ("temperature 1", "top_p 0.7")]


@pytest.mark.parametrize("case", CPU_CASES)
def test_kernel_distribution_matches_reference(case):
    logits, kw = KERNEL_CASES[case]
    expected = reference_distribution(logits.double().numpy(), **kw)
    assert_distribution(draw(logits, kw, N), expected)


def test_tied_case_really_keeps_the_ties():
    assert (reference_distribution(TIED.numpy(), temperature=1.0, top_k=3) > 0).sum() == 5


def test_many_tiles_and_a_ragged_last_one():
    # 40 tokens in tiles of 16: the running max, argmax ties, sums and histograms cross tiles
    torch.manual_seed(0)
    logits = torch.randn(40) * 1.5
    logits[37] = logits[5] = logits.max() + 0.5                         # top token twice, in two tiles
    kw = dict(temperature=0.8, top_k=9, top_p=0.8, min_p=0.05)
    expected = reference_distribution(logits.numpy(), **kw)
    assert 3 <= (expected > 0).sum() < 9
    assert_distribution(draw(logits, kw, 4_000, block_v=SMALL_TILE), expected)
    greedy = kernel_sampler(block_v=SMALL_TILE)(logits[None].to(DEVICE), [row(temperature=0.0)])
    assert greedy.token_ids == [5]


def _kernel_tokens(logits: torch.Tensor, rows, **kw) -> tuple[list[int], list[float]]:
    params = torch.from_numpy(pack_rows(rows, logits.shape[1], 0, 0)).to(DEVICE)
    tokens, packed, _ = sample_logits(logits, params, **_tiling(kw))
    return tokens.tolist(), packed[1].tolist()


def test_top_k_from_the_lanes_equals_top_k_over_the_logits():
    """The lanes' three largest values give the same K as the radix select over the logits (so the same token
    from the same noise), fp32 and bf16, k from 1 to 200, with top_p and min_p on top."""
    torch.manual_seed(2)
    logits = torch.randn(24, 3000).to(DEVICE) * 2
    logits[12:] = logits[12:].bfloat16().float()                       # ties: bf16 values, at T = 1
    rows = [row(temperature=[1.0, 0.8][i % 2], top_k=[1, 5, 50, 200][i % 4], top_p=[1.0, 0.9, 0.6][i % 3],
                min_p=[0.0, 0.05][i // 12], seed=i) for i in range(24)]
    lanes = _kernel_tokens(logits, rows)
    memory = _kernel_tokens(logits, rows, lane_topk=False)
    assert lanes[0] == memory[0]
    np.testing.assert_allclose(lanes[1], memory[1], rtol=0, atol=1e-6)
    for i, tok in enumerate(lanes[0]):                                  # and inside the reference's K
        kth = logits[i].float().div(rows[i].temperature).topk(rows[i].top_k).values[-1]
        assert logits[i, tok].item() / rows[i].temperature >= kth.item()


def test_lane_that_dropped_a_top_k_value_falls_back_to_the_logits():
    # 4 tiles: lane 0 holds columns 0, B, 2B, 3B -- made the 4 largest, so it drops one of the top 6 and the
    # lanes cannot decide K
    lanes = SMALL_TILE or BLOCK_V
    torch.manual_seed(3)
    logits = torch.randn(4 * lanes) * 0.5
    logits[[0, lanes, 2 * lanes, 3 * lanes]] = torch.tensor([3.0, 2.9, 2.8, 2.7])
    kw = dict(temperature=1.0, top_k=6, top_p=0.97)
    expected = reference_distribution(logits.numpy(), **kw)
    assert expected[3 * lanes] > 0.1 and 5 <= (expected > 0).sum() <= 6   # the dropped value is in the support
    batch = logits.to(DEVICE).expand(4_000, 4 * lanes)
    rows = [row(**kw, seed=i) for i in range(4_000)]
    tokens, _ = _kernel_tokens(batch, rows, block_v=SMALL_TILE)
    assert_distribution(tokens, expected)
    assert tokens[:500] == _kernel_tokens(batch[:500], rows[:500], block_v=SMALL_TILE, lane_topk=False)[0]


# ---------------------------------------------------------------- logprobs, greedy, top logprobs


def test_greedy_is_argmax_with_plain_log_softmax():
    torch.manual_seed(0)
    logits = (torch.randn(7, 5000) * 4).to(DEVICE)
    logits[3, 10] = logits[3, 4100] = logits[3].max() + 1              # tie across tiles -> lowest id
    rows = [row(temperature=0.0, top_k=2, top_p=0.5, min_p=0.5, seed=s) for s in (None, 1, 2, 3, 4, 5, 6)]
    out = kernel_sampler(block_rows=8)(logits, rows)
    assert out.token_ids == logits.argmax(dim=-1).tolist() and out.token_ids[3] == 10
    ref = reference_log_softmax(logits.cpu(), 1.0)
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(ref[i, tok].item(), abs=1e-5)
    assert out.top_logprobs is None


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.6])
def test_logprob_is_full_vocab_scaled_log_softmax_before_filters(temperature):
    torch.manual_seed(1)
    logits = (torch.randn(16, 3000) * 3).to(DEVICE)
    rows = [row(temperature=temperature, top_k=[-1, 3, 50, 1][i % 4], top_p=[1.0, 0.8, 0.5, 0.95][i % 4],
                min_p=[0.0, 0.1, 0.0, 0.3][i % 4], seed=i if i % 2 else None, num_logprobs=[None, 0, 3, 8][i % 4])
            for i in range(16)]
    out = kernel_sampler(block_rows=16)(logits, rows)
    ref = reference_log_softmax(logits.cpu(), temperature if temperature > 0 else 1.0)
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(ref[i, tok].item(), abs=1e-4)
        want = rows[i].num_logprobs or 0
        top = out.top_logprobs[i]
        expect_vals, expect_ids = ref[i].topk(want) if want else (torch.empty(0), torch.empty(0))
        assert [t for t, _ in top] == expect_ids.tolist()
        assert [lp for _, lp in top] == pytest.approx(expect_vals.tolist(), abs=1e-4)
        if temperature > 0 and rows[i].top_k == 1:
            assert tok == logits[i].argmax().item()
        if temperature > 0 and rows[i].top_k == 3:      # only the 3 largest can come out
            assert tok in logits[i].topk(3).indices.tolist()


def test_packed_pair_is_token_and_logprob():
    logits = torch.randn(3, 100, device=DEVICE)
    sample = kernel_sampler(block_rows=4).sample(logits, [row(), row(temperature=0.0), row(top_p=0.5, seed=3)])
    assert sample.packed.dtype == torch.float64 and tuple(sample.packed.shape) == (2, 3)
    assert sample.packed[0].long().tolist() == sample.token_ids.tolist()
    assert sample.packed[1].tolist() == sample.logprobs.tolist()


# ---------------------------------------------------------------- seeds and batch invariance


def _seeded_batch():
    torch.manual_seed(3)
    logits = torch.randn(12, 300).to(DEVICE)
    rows = [row(temperature=1.0, top_p=0.9, top_k=[-1, 40][i % 2], seed=100 + i // 3, sample_index=i % 3, step=i)
            for i in range(12)]
    return logits, rows


def test_seeded_rows_ignore_batch_composition_and_order():
    logits, rows = _seeded_batch()
    base = kernel_sampler(0, block_rows=16)(logits, rows).token_ids
    torch.manual_seed(4)
    noise_logits = torch.randn(4, 300).to(DEVICE)
    noise_rows = [row(), row(temperature=0.0), row(top_k=5), row(min_p=0.2)]
    mixed_logits, mixed_rows, where = [], [], {}
    for i in reversed(range(12)):
        if i % 3 == 0:
            mixed_logits.append(noise_logits[i // 3])
            mixed_rows.append(noise_rows[i // 3])
        where[i] = len(mixed_rows)
        mixed_logits.append(logits[i])
        mixed_rows.append(rows[i])
    out = kernel_sampler(99, block_rows=32)(torch.stack(mixed_logits), mixed_rows).token_ids
    assert [out[where[i]] for i in range(12)] == base
    for i in (0, 5, 11):                                                # alone, the GPU's one row a program
        assert kernel_sampler(5, block_rows=1)(logits[i:i + 1], [rows[i]]).token_ids == [base[i]]


@pytest.mark.skipif(CUDA, reason="the interpreter's tiling against the GPU's; on CUDA every tiling is a compile")
def test_rows_per_program_do_not_change_results():
    torch.manual_seed(5)
    logits = torch.randn(4, 200).to(DEVICE).bfloat16()
    rows = [row(temperature=t, top_k=k, top_p=p, min_p=mp, seed=7, step=i)
            for i, (t, k, p, mp) in enumerate([(0.0, -1, 1.0, 0.0), (0.7, 20, 1.0, 0.0), (1.0, -1, 0.6, 0.0),
                                               (1.3, 30, 0.8, 0.1)])]
    params = torch.from_numpy(pack_rows(rows, 200, 0, 0)).to(DEVICE)
    results = [sample_logits(logits, params, block_rows=br, block_v=bv) for br, bv in ((1, 256), (4, 64))]
    for tokens, packed, lse in results[1:]:
        assert torch.equal(tokens, results[0][0])
        torch.testing.assert_close(packed, results[0][1], rtol=0, atol=1e-6)
        torch.testing.assert_close(lse, results[0][2], rtol=0, atol=1e-6)


def test_different_seeds_or_sample_indices_give_different_streams():
    logits = torch.zeros(20, 1000, device=DEVICE)                     # uniform: streams differ unless shared

    def stream(seed, sample_index):
        return kernel_sampler(block_rows=32)(logits, [row(seed=seed, sample_index=sample_index, step=s)
                                                      for s in range(20)]).token_ids

    a = stream(1, 0)
    assert a == stream(1, 0)
    assert a != stream(2, 0) and a != stream(1, 1)
    assert len(set(a)) > 10                                             # the step moves the stream too


def test_unseeded_rows_follow_the_sampler_seed():
    logits = torch.zeros(4, 1000, device=DEVICE)
    rows = [row() for _ in range(4)]
    s1, s2 = kernel_sampler(11), kernel_sampler(11)
    first = s1(logits, rows).token_ids
    assert first == s2(logits, rows).token_ids
    assert first != s1(logits, rows).token_ids                          # every call draws afresh
    assert first != kernel_sampler(12)(logits, rows).token_ids
    assert len(set(first)) > 1                                          # rows of one call differ too


def test_big_and_negative_seeds_are_reduced_mod_2_64():
    logits = torch.zeros(2, 1000, device=DEVICE)
    out = kernel_sampler(block_rows=2)(logits, [row(seed=-1), row(seed=2 ** 64 - 1)]).token_ids
    assert out[0] == out[1]


# ---------------------------------------------------------------- input checks and the round cap


def test_bad_inputs_name_what_is_wrong():
    logits = torch.randn(2, 50, device=DEVICE)
    params = torch.from_numpy(pack_rows([row(), row()], 50, 0, 0)).to(DEVICE)
    with pytest.raises(ValueError, match=r"params must be int64 \[2, 8\]"):
        sample_logits(logits, params[:1])
    with pytest.raises(ValueError, match="params must be int64"):
        sample_logits(logits, params.int())
    with pytest.raises(ValueError, match="vocab dimension must be contiguous"):
        sample_logits(torch.randn(50, 2, device=DEVICE).t(), params)
    with pytest.raises(ValueError, match="float"):
        sample_logits(logits.long(), params)
    with pytest.raises(ValueError, match="powers of two"):
        sample_logits(logits, params, block_v=24)
    with pytest.raises(ValueError, match=r"len\(rows\)"):
        kernel_sampler()(logits, [row()])
    assert NUM_PARAMS == params.shape[1]


def test_row_still_undecided_at_the_cap_takes_the_argmax():
    torch.manual_seed(6)
    logits = torch.randn(64, 100, device=DEVICE)
    rows = [row(top_p=0.3, seed=i) for i in range(64)]
    params = torch.from_numpy(pack_rows(rows, 100, 0, 0)).to(DEVICE)
    capped, _, _ = sample_logits(logits, params, **_tiling(dict(block_rows=64)), max_iters=0)
    assert capped.tolist() == logits.argmax(-1).tolist()
    free, _, _ = sample_logits(logits, params, **_tiling(dict(block_rows=64)))
    assert free.tolist() != capped.tolist()


def test_empty_batch():
    out = kernel_sampler()(torch.zeros(0, 10, device=DEVICE), [])
    assert out.token_ids == [] and out.logprobs == [] and out.top_logprobs is None


# ---------------------------------------------------------------- the GPU: real vocabulary, graphs


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_cuda_distribution_matches_reference_100k_draws(case):
    logits, kw = KERNEL_CASES[case]
    expected = reference_distribution(logits.double().numpy(), **kw)
    tokens = draw(logits, kw, 100_000, seed=7)
    assert_distribution(tokens, expected)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(temperature=1.0, top_k=50, top_p=0.95), dict(temperature=0.7, top_p=0.9),
                                dict(temperature=1.0, min_p=0.2), dict(temperature=1.0)])
def test_cuda_real_vocabulary_bf16(kw):
    """151,936 bf16 logits shaped like a real model's (a few likely tokens over a long tail)."""
    vocab, n = 151_936, 200_000
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(vocab, generator=gen) * 2.0
    logits[torch.randperm(vocab, generator=gen)[:40]] += 9.0
    logits = logits.bfloat16()
    expected = reference_distribution(logits.double().numpy(), **kw)
    tokens = draw(logits, kw, n, seed=3)
    assert_grouped(tokens, expected)
    # the sampled tokens' logprobs: full-vocabulary log_softmax(logits / T)
    sample = kernel_sampler(3)(logits.cuda()[None], [row(**kw)])
    t = kw["temperature"]
    ref = reference_log_softmax(logits.float()[None], t)[0, sample.token_ids[0]].item()
    assert sample.logprobs[0] == pytest.approx(ref, abs=1e-4)


@gpu
@pytest.mark.gpu
def test_cuda_graph_capture_replays_new_parameters():
    torch.manual_seed(8)
    logits = (torch.randn(64, 32_000, device="cuda") * 2).bfloat16()
    rows_a = [row(temperature=1.0, top_k=50, top_p=0.95, seed=i, step=1) for i in range(64)]
    rows_b = [row(temperature=0.8, top_p=0.9, min_p=0.05, seed=i, step=2) for i in range(64)]
    params = torch.from_numpy(pack_rows(rows_a, 32_000, 0, 0)).cuda()
    eager = {name: sample_logits(logits, torch.from_numpy(pack_rows(rs, 32_000, 0, 0)).cuda())
             for name, rs in (("a", rows_a), ("b", rows_b))}
    sample_logits(logits, params)                                       # compiled before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, packed, lse = sample_logits(logits, params)
    for name, rs in (("b", rows_b), ("a", rows_a)):
        params.copy_(torch.from_numpy(pack_rows(rs, 32_000, 0, 0)))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(tokens, eager[name][0]) and torch.equal(packed, eager[name][1])


@gpu
@pytest.mark.gpu
def test_cuda_kernel_agrees_with_reference_sampler_in_distribution_on_a_batch():
    """The torch reference on the GPU and the kernel, the same 4,000-row batch of varied rows: per-token counts
    pooled over rows agree within 5 sigma of their difference."""
    torch.manual_seed(9)
    logits = torch.randn(8, 64, device="cuda") * 2
    kws = [dict(temperature=1.0), dict(temperature=0.6, top_k=5), dict(temperature=1.2, top_p=0.7),
           dict(temperature=1.0, min_p=0.1), dict(temperature=1.0, top_k=10, top_p=0.9, min_p=0.05),
           dict(temperature=0.0), dict(temperature=2.0, top_k=3), dict(temperature=1.0, top_p=0.5)]
    reps = 4000
    batch = logits.repeat(reps, 1)
    rows = [row(**kws[i % 8]) for i in range(8 * reps)]
    ours = np.asarray(kernel_sampler(1)(batch, rows).token_ids).reshape(reps, 8)
    ref = np.asarray(Sampler(1)(batch, rows).token_ids).reshape(reps, 8)
    for j in range(8):
        a, b = np.bincount(ours[:, j], minlength=64) / reps, np.bincount(ref[:, j], minlength=64) / reps
        p = (a + b) / 2
        assert np.all(np.abs(a - b) <= 5 * np.sqrt(2 * p * (1 - p) / reps) + 1e-9), (j, a, b)


def test_packed_parameters():
    params = pack_rows([row(min_p=0.25, top_k=10), row(top_k=9), row(temperature=0.0, top_k=3)], 10, 0, 0)
    floats = params[:, :3].view(np.float64)
    assert floats[0, 2] == math.log(0.25) and floats[1, 2] == -math.inf and floats[2, 0] == 0.0
    assert params[:, 3].tolist() == [0, 9, 0]          # top_k >= vocab disables it; greedy rows ignore it
