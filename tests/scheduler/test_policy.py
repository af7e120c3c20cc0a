"""Preemption policies (scheduler.policy, scheduler.recompute): strict reservation never moves a running
sequence; swap mode admits by an expected length and, when blocks run out, swaps the youngest running
sequence to the host pool and resumes it from there (exact outputs, nothing recomputed); the recompute
baseline evicts and recomputes."""
import random

import pytest

from scheduler import Scheduler, SchedulerConfig, StopCondition
from tests.scheduler.fake_engine import FakeKVEngine, reference_output

VOCAB = 40
EOS = frozenset({3, 7})          # the fake model samples one of these every ~20 tokens: lengths vary widely


def make(preemption, **kw):
    cfg = dict(num_blocks=40, block_size=4, max_num_seqs=16, max_num_batched_tokens=48, max_model_len=512,
               num_host_blocks=200, preemption=preemption, expected_output_tokens=16)
    cfg.update(kw)
    return Scheduler(SchedulerConfig(**cfg), clock=lambda: 0.0)


def long_cot(s, rng, n=24, max_tokens=120):
    expected = {}
    for i in range(n):
        prompt = [rng.randrange(10, VOCAB) for _ in range(rng.randint(4, 12))]
        stop = StopCondition(max_tokens=max_tokens, eos_token_ids=EOS)
        s.add_request(f"r{i}", prompt, stop)
        expected[f"r{i}"] = reference_output(prompt, max_tokens, VOCAB, eos=EOS)
    return expected


@pytest.mark.parametrize("delay", [0, 2])
def test_swap_mode_resumes_from_the_host_exactly(delay):
    rng = random.Random(2)
    s = make("swap")
    expected = long_cot(s, rng)
    assert max(len(v) for v in expected.values()) > 4 * min(len(v) for v in expected.values())   # heavy spread
    fin = FakeKVEngine(s, VOCAB, landing_delay=delay).run(check=True)
    assert {f.request_id: f.output_token_ids for f in fin} == expected
    assert s.stats.swapped_out > 0 and s.stats.preemptions == 0 and s.stats.recomputed_tokens == 0
    assert s.stats.restored_blocks > 0 and s.host.num_free == s.host.num_blocks
    assert s.pool.num_in_use == 0 and s.kv.num_reserved == 0


def test_swap_mode_runs_more_sequences_at_once_than_strict_reservation():
    peaks = {}
    for policy in ("never", "swap"):
        s = make(policy)
        expected = long_cot(s, random.Random(2))
        fin = FakeKVEngine(s, VOCAB).run(check=True)
        assert {f.request_id: f.output_token_ids for f in fin} == expected
        peaks[policy] = s.stats.peak_running
        if policy == "never":
            assert s.stats.swapped_out == 0 and s.stats.offloaded_blocks == 0
    assert peaks["swap"] >= 2 * peaks["never"], peaks


def test_swap_mode_with_a_host_pool_too_small_recomputes_and_counts_it():
    s = make("swap", num_host_blocks=6)
    expected = long_cot(s, random.Random(4))
    fin = FakeKVEngine(s, VOCAB).run(check=True)
    assert {f.request_id: f.output_token_ids for f in fin} == expected
    assert s.stats.preemptions > 0 and s.stats.recomputed_tokens > 0    # honest: counted, never silent


def test_swap_mode_needs_a_host_pool():
    with pytest.raises(ValueError, match="host pool"):
        SchedulerConfig(num_blocks=8, preemption="swap", num_host_blocks=0)
    with pytest.raises(ValueError, match="expected_output_tokens"):
        SchedulerConfig(num_blocks=8, preemption="swap", num_host_blocks=8, expected_output_tokens=0)


def test_swap_mode_with_sessions_and_n_samples():
    rng = random.Random(9)
    s = make("swap", num_blocks=48)
    eng = FakeKVEngine(s, VOCAB, landing_delay=1)
    prompt = [rng.randrange(10, VOCAB) for _ in range(10)]
    s.add_request("g", prompt, StopCondition(max_tokens=80, eos_token_ids=EOS), n=4)
    s.open_session("a")
    s.submit_turn("a", "a1", [11, 12, 13], StopCondition(max_tokens=60, eos_token_ids=EOS))
    fin = {(f.request_id, f.sample_index): f for f in eng.run(check=True)}
    for i in range(4):
        assert fin[("g", i)].output_token_ids == reference_output(prompt, 80, VOCAB, eos=EOS, sample_index=i)
    assert fin[("a1", 0)].output_token_ids == reference_output([11, 12, 13], 60, VOCAB, eos=EOS)
    assert s.stats.preemptions == 0


def test_strict_reservation_never_moves_a_running_sequence():
    s = make("never", num_blocks=40)
    expected = long_cot(s, random.Random(2))
    eng = FakeKVEngine(s, VOCAB)
    while s.has_unfinished():
        running = set(s.running)
        out, fin = eng.step()
        ended = {r.seq_id for r in fin}
        assert running - ended <= set(s.running)    # every running sequence still runs unless it finished
    assert s.stats.swapped_out == s.stats.preemptions == 0
    del expected


def test_recompute_baseline_preempts_and_still_matches():
    s = make("recompute", num_blocks=10, enable_prefix_caching=False, num_host_blocks=0,
             max_num_batched_tokens=64)
    eng = FakeKVEngine(s, VOCAB)
    prompts = [[i + 10] * 6 for i in range(5)]
    for i, p in enumerate(prompts):
        s.add_request(f"r{i}", p, StopCondition(max_tokens=20))
    fin = {f.request_id: f for f in eng.run()}
    for i, p in enumerate(prompts):
        assert fin[f"r{i}"].output_token_ids == reference_output(p, 20, VOCAB)
    assert s.stats.preemptions > 0 and s.stats.recomputed_tokens > 0
