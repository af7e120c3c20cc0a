"""Sampler semantics against independent float64 references.

The statistical tests draw N samples in one batch (N identical rows) with a fixed seed, so they are
deterministic; the bounds are still set at ~5 standard errors so that any correct sampler passes for
any seed, while a wrong filter or temperature (differences of several percent) fails.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

from engine.sampling import SamplerOutput, Sampler, SamplingParams, SamplingRow, mix64

# A small vocabulary with distinct, untied logits (no filter boundary sits on a tie or near a
# threshold used below).
LOGITS = torch.tensor([2.0, 1.3, 0.9, 0.4, 0.0, -0.5, -1.2, -2.5])
V = LOGITS.numel()


def row(temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0, seed=None, sample_index=0, step=0,
        num_logprobs=None) -> SamplingRow:
    return SamplingRow(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                       sample_index=sample_index, step=step, num_logprobs=num_logprobs)


# ---------------------------------------------------------------- float64 reference


def reference_distribution(logits, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0) -> np.ndarray:
    """temperature -> top_k -> top_p -> min_p, written directly from the definitions, in float64."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    keep = np.ones(len(x), dtype=bool)
    if top_k > 0:
        kth = np.sort(x)[::-1][top_k - 1]
        keep &= x >= kth
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        cumulative = 0.0
        nucleus = np.zeros(len(x), dtype=bool)
        for i in order:  # smallest prefix whose mass reaches top_p
            nucleus[i] = True
            cumulative += p[i]
            if cumulative >= top_p:
                break
        nucleus |= p >= p[i]  # and every token tied with the last one (equal logits: equal p)
        keep &= nucleus
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    if min_p > 0.0:
        keep &= p >= min_p * p.max()
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


def reference_log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    x = logits.double() / temperature
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


def empirical(tokens: list[int], vocab: int) -> np.ndarray:
    return np.bincount(np.asarray(tokens), minlength=vocab) / len(tokens)


def assert_matches(tokens: list[int], expected: np.ndarray) -> None:
    n = len(tokens)
    observed = empirical(tokens, len(expected))
    # Filtered tokens never appear.
    assert not np.any(observed[expected == 0.0]), (observed, expected)
    # Per token: within 5 standard errors (plus a hair for p ~ 0).
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(observed - expected) <= 5 * sigma + 1e-9), (observed, expected)
    # Total variation: expected TV for this N and V is ~0.005.
    assert 0.5 * np.abs(observed - expected).sum() < 0.02, (observed, expected)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1), ("temperature", float("inf")), ("temperature", float("nan")),
        ("temperature", "1"), ("temperature", True),
        ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.2), ("top_p", None),
        ("top_k", 0), ("top_k", -2), ("top_k", 2.0), ("top_k", True),
        ("min_p", -0.1), ("min_p", 1.01), ("min_p", "0"),
        ("max_tokens", 0), ("max_tokens", 1.0), ("max_tokens", True), ("max_tokens", None),
        ("n", 0), ("n", 2.5), ("n", False),
        ("seed", 1.0), ("seed", "3"), ("seed", True),
        ("stop_token_ids", [1, -1]), ("stop_token_ids", [1.0]), ("stop_token_ids", "12"),
        ("stop_token_ids", 5), ("stop_token_ids", [True]),
        ("ignore_eos", 1), ("ignore_eos", None),
        ("logprobs", -1), ("logprobs", 1.0), ("logprobs", True),
    ],
)
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}\b"):
        SamplingParams(**{field: value})


def test_valid_params_are_normalised():
    p = SamplingParams(temperature=1, top_k=np.int64(5), stop_token_ids=[2, 7], seed=-3, logprobs=0)
    assert p.stop_token_ids == (2, 7) and isinstance(p.stop_token_ids, tuple)
    assert type(p.temperature) is float and type(p.top_k) is int
    assert not p.is_greedy and SamplingParams().is_greedy and SamplingParams(temperature=1e-6).is_greedy
    with pytest.raises(AttributeError):
        p.top_k = 3  # frozen
    r = SamplingRow.from_params(p, sample_index=2, step=5)
    assert (r.temperature, r.top_k, r.top_p, r.min_p, r.seed, r.sample_index, r.step, r.num_logprobs) == \
        (1.0, 5, 1.0, 0.0, -3, 2, 5, 0)


# ---------------------------------------------------------------- greedy and logprobs


def test_greedy_is_argmax_with_plain_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(7, 1000) * 4
    logits[3, 10] = logits[3, 20] = logits[3].max() + 1  # tie -> lowest id
    rows = [row(temperature=0.0, top_k=2, top_p=0.5, min_p=0.5, seed=s) for s in (None, 1, 2, 3, 4, 5, 6)]
    out = Sampler(seed=1)(logits, rows)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.token_ids[3] == 10
    ref = reference_log_softmax(logits, 1.0)
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(ref[i, tok].item(), abs=1e-5)
    assert out.top_logprobs is None


@pytest.mark.parametrize("temperature", [0.0, 0.3, 1.0, 1.7])
def test_logprob_is_full_vocab_scaled_log_softmax_before_filters(temperature):
    torch.manual_seed(1)
    logits = torch.randn(16, 5000) * 3
    rows = [row(temperature=temperature, top_k=[-1, 3, 50, 1][i % 4], top_p=[1.0, 0.8, 0.5, 0.95][i % 4],
                min_p=[0.0, 0.1, 0.0, 0.3][i % 4], seed=i if i % 2 else None, num_logprobs=[None, 0, 3, 8][i % 4])
            for i in range(16)]
    out = Sampler(seed=2)(logits, rows)
    ref = reference_log_softmax(logits, temperature if temperature > 0 else 1.0)
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(ref[i, tok].item(), abs=1e-4)
        want = rows[i].num_logprobs or 0
        top = out.top_logprobs[i]
        assert len(top) == want
        expect_vals, expect_ids = ref[i].topk(want) if want else (torch.empty(0), torch.empty(0))
        assert [t for t, _ in top] == expect_ids.tolist()
        assert [lp for _, lp in top] == pytest.approx(expect_vals.tolist(), abs=1e-4)
    # Filtered rows sample only survivors: top_k=1 (every 4th row from 3) is the argmax.
    for i in range(3, 16, 4):
        if temperature > 0:
            assert out.token_ids[i] == logits[i].argmax().item()


def test_top_logprobs_none_only_when_no_row_asked():
    logits = torch.randn(3, 20)
    assert Sampler()(logits, [row(), row(), row()]).top_logprobs is None
    out = Sampler()(logits, [row(), row(num_logprobs=0), row(num_logprobs=2)])
    assert out.top_logprobs[0] == [] and out.top_logprobs[1] == [] and len(out.top_logprobs[2]) == 2
    assert isinstance(out, SamplerOutput) and Sampler()(logits[:0], []).token_ids == []


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="len\\(rows\\)"):
        Sampler()(torch.randn(2, 5), [row()])


# ---------------------------------------------------------------- statistics


N = 40_000

CASES = {
    "temperature 1": dict(temperature=1.0),
    "temperature 0.5": dict(temperature=0.5),
    "temperature 2": dict(temperature=2.0),
    "top_k 3": dict(temperature=1.0, top_k=3),
    "top_p 0.7": dict(temperature=1.0, top_p=0.7),
    "top_p 0.9 at T 1.5": dict(temperature=1.5, top_p=0.9),
    "min_p 0.15": dict(temperature=1.0, min_p=0.15),
    # Each filter binds: top_k drops 1 token, top_p 2 more, min_p 1 more (4 survive).
    "combined": dict(temperature=1.3, top_k=7, top_p=0.9, min_p=0.25),
}


@pytest.mark.parametrize("case", list(CASES))
def test_empirical_distribution_matches_reference(case):
    kw = CASES[case]
    expected = reference_distribution(LOGITS.numpy(), **kw)
    logits = LOGITS.expand(N, V).contiguous()
    out = Sampler(seed=1234)(logits, [row(**kw) for _ in range(N)])
    assert_matches(out.token_ids, expected)


def test_reference_filters_really_filter():
    # Guard against a vacuous statistical test: each filter case removes tokens.
    for case in ("top_k 3", "top_p 0.7", "min_p 0.15", "combined"):
        assert (reference_distribution(LOGITS.numpy(), **CASES[case]) == 0).sum() >= 2, case


# Two tokens tied where the top-p prefix ends: p = softmax(TIED_AT_TOP_P); top_p reaches into the first of them.
TIED_AT_TOP_P = torch.tensor([2.0, 1.0, 1.0, 0.0, -1.0])
_P_TIED = TIED_AT_TOP_P.double().softmax(-1)
TOP_P_AT_TIE = float(_P_TIED[0] + 0.5 * _P_TIED[1])


def test_top_p_keeps_every_token_tied_at_its_boundary():
    """A sort puts one of the tied tokens first; which one must not decide whether the other survives (bf16
    logits tie often, and the kernel sampler keeps both)."""
    kw = dict(temperature=1.0, top_p=TOP_P_AT_TIE)
    expected = reference_distribution(TIED_AT_TOP_P.numpy(), **kw)
    assert (expected > 0).tolist() == [True, True, True, False, False]
    logits = TIED_AT_TOP_P.expand(N, 5).contiguous()
    out = Sampler(seed=99)(logits, [row(**kw) for _ in range(N)])
    assert_matches(out.token_ids, expected)


def test_seeded_rows_follow_the_same_distribution():
    kw = CASES["combined"]
    n = 10_000
    rows = [row(**kw, seed=7, sample_index=i % 10, step=i // 10) for i in range(n)]
    out = Sampler()(LOGITS.expand(n, V).contiguous(), rows)
    assert len(set(out.token_ids)) > 1
    # Looser than assert_matches (fewer draws): 5 sigma per token, filtered never drawn.
    expected = reference_distribution(LOGITS.numpy(), **kw)
    observed = empirical(out.token_ids, V)
    assert not np.any(observed[expected == 0.0])
    assert np.all(np.abs(observed - expected) <= 5 * np.sqrt(expected * (1 - expected) / n) + 1e-9)


# ---------------------------------------------------------------- reproducibility


def _seeded_batch():
    torch.manual_seed(3)
    logits = torch.randn(12, 3000)
    rows = [row(temperature=1.0, top_p=0.95, seed=100 + i // 3, sample_index=i % 3, step=i) for i in range(12)]
    return logits, rows


def test_seeded_rows_ignore_batch_composition_and_order():
    logits, rows = _seeded_batch()
    base = Sampler(seed=0)(logits, rows).token_ids

    # Reverse the order and interleave unseeded, greedy and differently filtered rows.
    torch.manual_seed(4)
    noise_logits = torch.randn(5, 3000)
    noise_rows = [row(), row(temperature=0.0), row(top_k=5), row(min_p=0.2, seed=None), row(top_p=0.3)]
    mixed_logits, mixed_rows, where = [], [], {}
    for i in reversed(range(12)):
        if i % 3 == 0:
            j = i // 3
            mixed_logits.append(noise_logits[j])
            mixed_rows.append(noise_rows[j])
        where[i] = len(mixed_rows)
        mixed_logits.append(logits[i])
        mixed_rows.append(rows[i])
    out = Sampler(seed=99)(torch.stack(mixed_logits), mixed_rows).token_ids
    assert [out[where[i]] for i in range(12)] == base

    # Alone, one row at a time.
    for i in range(12):
        assert Sampler(seed=5)(logits[i:i + 1], [rows[i]]).token_ids == [base[i]]


def test_different_seeds_or_sample_indices_give_different_streams():
    logits = torch.zeros(1, 1000)  # uniform: streams differ unless the noise is shared

    def stream(seed, sample_index):
        return [Sampler()(logits, [row(seed=seed, sample_index=sample_index, step=s)]).token_ids[0]
                for s in range(20)]

    a = stream(1, 0)
    assert a == stream(1, 0)
    assert a != stream(2, 0)
    assert a != stream(1, 1)
    assert len(set(a)) > 10  # the step moves the stream too


def test_unseeded_rows_follow_the_sampler_seed():
    logits = torch.zeros(4, 1000)
    rows = [row() for _ in range(4)]
    s1, s2 = Sampler(seed=11), Sampler(seed=11)
    first = s1(logits, rows).token_ids
    assert first == s2(logits, rows).token_ids
    assert first != s1(logits, rows).token_ids  # the generator advances
    assert first != Sampler(seed=12)(logits, rows).token_ids


@pytest.mark.parametrize("u", [0.0, 1.0])
def test_uniforms_at_the_ends_of_the_interval_give_finite_noise(monkeypatch, u):
    """U == 0 (2**-24 a draw: about one a step at [256, 49152]) and U == 1 (outside [0, 1), one rounding away):
    unguarded, E = -log U is inf or 0, a -inf key for a lone survivor or inf / NaN keys. Guarded, the top_k = 1
    rows (their survivor is the last token) still draw it, with a finite logprob."""
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, *args, **kwargs: self.fill_(u))
    log_e = Sampler()._log_exponential_(torch.empty(3, V), [row(), row(seed=1), row()])
    assert bool(torch.isfinite(log_e).all())
    out = Sampler()(LOGITS.flip(0).expand(3, V).contiguous(), [row(top_k=1), row(top_k=1, seed=3), row()])
    assert out.token_ids[:2] == [V - 1, V - 1] and all(np.isfinite(out.logprobs))


def test_the_callers_logits_are_left_as_they_were():
    """At T = 1 without filters the sampler reads the caller's logits in place of a scaled copy."""
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    before = logits.clone()
    for rows in ([row(), row(), row(seed=2), row()], [row(), row(top_k=3), row(temperature=0.0), row(top_p=0.5)]):
        Sampler()(logits, rows)
        assert torch.equal(logits, before)


def test_mix64_is_stable_and_in_range():
    assert mix64(1, 0, 0) == mix64(1, 0, 0)
    values = {mix64(s, i, t) for s in range(4) for i in range(4) for t in range(4)}
    assert len(values) == 64 and all(0 <= v < 2**63 for v in values)
    assert 0 <= mix64(-1, 2**70) < 2**63


def test_runner_falls_back_to_the_reference_when_the_kernel_fails(caplog):
    """A sampling kernel that fails (e.g. will not build under the installed Triton) costs no batch: the
    reference sampler takes this batch and every later one, with a WARNING."""
    import logging
    from types import SimpleNamespace

    from engine.model_runner import ModelRunner
    from engine.sampling import Sampler, SamplingRow

    class Broken:
        def sample(self, logits, rows):
            raise RuntimeError("no such instruction")
    runner = SimpleNamespace(kernel_sampler=Broken(), sampler=Sampler(0))
    rows = [SamplingRow(1.0, -1, 1.0, 0.0, 7, 0, 0, None)]
    logits = torch.randn(1, 32, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="engine.model_runner"):
        out = ModelRunner._sample_rows(runner, logits, rows)
    assert runner.kernel_sampler is None and "sampling kernel failed" in caplog.text
    assert out.token_ids == Sampler(0).sample(logits.float(), rows).token_ids
