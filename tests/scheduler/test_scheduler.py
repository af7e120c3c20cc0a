import random

import pytest

from scheduler import Scheduler, SchedulerConfig, StopCondition
from tests.scheduler.fake_engine import FakeKVEngine, reference_output

VOCAB = 50


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, max_model_len=256, prefix=True):
    return Scheduler(SchedulerConfig(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                                     max_num_batched_tokens=budget, max_model_len=max_model_len,
                                     enable_prefix_caching=prefix))


def test_single_request_matches_reference_and_frees_everything():
    s = make()
    s.add_request("a", [1, 2, 3, 4, 5], StopCondition(max_tokens=10))
    fin = FakeKVEngine(s, VOCAB).run()
    assert len(fin) == 1 and fin[0].output_token_ids == reference_output([1, 2, 3, 4, 5], 10, VOCAB)
    assert fin[0].finish_reason == "length"
    assert s.pool.num_in_use == 0 and s.kv.num_reserved == 0


def test_stop_and_eos():
    prompt = [3, 1, 4]
    ref = reference_output(prompt, 20, VOCAB)
    s = make()
    s.add_request("stop", prompt, StopCondition(max_tokens=20, stop_token_ids=frozenset({ref[4]})))
    s.add_request("eos", prompt, StopCondition(max_tokens=20, eos_token_ids=frozenset({ref[2]})))
    s.add_request("ign", prompt, StopCondition(max_tokens=20, eos_token_ids=frozenset({ref[2]}), ignore_eos=True))
    fin = {f.request_id: f for f in FakeKVEngine(s, VOCAB).run()}
    first_stop = ref.index(ref[4]) + 1
    assert fin["stop"].output_token_ids == ref[:first_stop] and fin["stop"].finish_reason == "stop"
    assert fin["eos"].output_token_ids == ref[:ref.index(ref[2]) + 1]
    assert fin["ign"].output_token_ids == ref and fin["ign"].finish_reason == "length"


def test_chunked_prefill_respects_budget():
    s = make(budget=5)
    s.add_request("a", list(range(1, 23)), StopCondition(max_tokens=3))
    eng = FakeKVEngine(s, VOCAB)
    out = s.schedule()
    assert out.num_batched_tokens == 5 and not out.scheduled[0].sample
    s.update(out, eng.execute(out))
    fin = eng.run()
    assert fin[0].output_token_ids == reference_output(list(range(1, 23)), 3, VOCAB)


def test_prefix_cache_hit_on_second_request():
    s = make(block_size=4)
    prompt = list(range(10, 30))                     # 20 tokens = 5 full blocks
    eng = FakeKVEngine(s, VOCAB)
    s.add_request("a", prompt, StopCondition(max_tokens=4))
    eng.run()
    computed = s.stats.prefill_tokens
    s.add_request("b", prompt + [7, 8], StopCondition(max_tokens=4))
    fin = eng.run()
    assert fin[0].num_cached_tokens == 20
    assert s.stats.prefill_tokens - computed == 2
    assert fin[0].output_token_ids == reference_output(prompt + [7, 8], 4, VOCAB)


def test_full_prompt_hit_still_recomputes_last_block():
    s = make(block_size=4)
    prompt = list(range(10, 26))                     # exactly 4 blocks
    eng = FakeKVEngine(s, VOCAB)
    s.add_request("a", prompt, StopCondition(max_tokens=2))
    eng.run()
    s.add_request("b", prompt, StopCondition(max_tokens=2))
    fin = eng.run()
    assert fin[0].num_cached_tokens == 12
    assert fin[0].output_token_ids == reference_output(prompt, 2, VOCAB)


@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("prompt_len,copies", [(18, 7), (16, 0)], ids=["partial-tail", "aligned"])
def test_n_samples_compute_the_prompt_once(prefix, prompt_len, copies):
    s = make(block_size=4, num_blocks=64, max_num_seqs=8)
    prompt = list(range(1, prompt_len + 1))
    ids = s.add_request("g", prompt, StopCondition(max_tokens=5), n=8)
    assert len(ids) == 8
    eng = FakeKVEngine(s, VOCAB)
    outputs = []
    while s.has_unfinished():
        out = s.schedule()
        outputs.append(out)
        s.update(out, eng.execute(out))
        s.check_integrity()
    # the step completing the prompt samples all 8 first tokens from the leader's row
    leaders = [it for out in outputs for it in out.scheduled if it.fork_samples]
    assert len(leaders) == 1 and [sid for sid, _ in leaders[0].fork_samples] == ids[1:]
    assert [idx for _, idx in leaders[0].fork_samples] == list(range(1, 8))
    # a partial last prompt block is copied once per sibling, before the next forward; full blocks are shared
    all_copies = [c for out in outputs for c in out.block_copies]
    assert len(all_copies) == copies and len({dst for _, dst in all_copies}) == copies
    assert s.stats.prefill_tokens == prompt_len                  # the prompt once for the group
    assert s.stats.cached_prompt_tokens == 7 * prompt_len
    assert s.stats.decode_tokens == 8 * 4                        # tokens 2..5 of each sample
    assert s.pool.num_in_use == 0 and s.kv.num_reserved == 0


def test_n_samples_outputs_equal_reference_after_the_block_copy():
    """The fake engine stores (position, token) per slot and asserts every read: a sibling reading a block
    its copy did not fill fails. Each sample's tokens depend on its index, so a sibling that wrote into its
    leader's partial block (or read another's) would change the outputs; each equals its own reference."""
    s = make(block_size=4, num_blocks=64, max_num_seqs=8)
    prompt = list(range(1, 19))
    s.add_request("g", prompt, StopCondition(max_tokens=9), n=8)
    fin = FakeKVEngine(s, VOCAB).run()
    assert sorted(f.sample_index for f in fin) == list(range(8))
    refs = [reference_output(prompt, 9, VOCAB, sample_index=i) for i in range(8)]
    assert len({tuple(r) for r in refs}) == 8                 # the samples really differ
    assert all(f.output_token_ids == refs[f.sample_index] for f in fin)
    assert all(f.num_cached_tokens == 18 for f in fin if f.sample_index > 0)
    assert s.pool.num_in_use == 0


@pytest.mark.parametrize("case", ["max_tokens_1", "eos_first"])
def test_n_samples_that_finish_on_their_first_token(case):
    s = make(block_size=4, num_blocks=64, max_num_seqs=8)
    prompt = list(range(1, 19))
    firsts = [reference_output(prompt, 1, VOCAB, sample_index=i)[0] for i in range(4)]
    stop = StopCondition(max_tokens=1) if case == "max_tokens_1" else \
        StopCondition(max_tokens=6, eos_token_ids=frozenset(firsts))
    s.add_request("g", prompt, stop, n=4)
    eng = FakeKVEngine(s, VOCAB)
    out = s.schedule()
    fin = s.update(out, eng.execute(out))
    s.check_integrity()
    assert len(fin) == 4 and all(f.output_token_ids == [firsts[f.sample_index]] for f in fin)
    assert not s.has_unfinished()
    assert s.schedule().block_copies == []      # finished siblings never get a tail copy
    assert s.pool.num_in_use == 0 and s.kv.num_reserved == 0


def test_recompute_baseline_recomputes_the_last_prompt_block_per_sibling():
    s = Scheduler(SchedulerConfig(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=32,
                                  max_model_len=256, preemption="recompute"))
    prompt = list(range(1, 19))
    s.add_request("g", prompt, StopCondition(max_tokens=5), n=8)
    fin = FakeKVEngine(s, VOCAB).run()
    assert s.stats.prefill_tokens == 18 + 7 * 2    # as vLLM: each sibling recomputes 18 - 16 tokens
    assert all(f.output_token_ids == reference_output(prompt, 5, VOCAB, sample_index=f.sample_index) for f in fin)


def test_abort_waiting_running_and_unforked_siblings():
    s = make(num_blocks=8, block_size=4, budget=4)
    s.add_request("run", list(range(1, 9)), StopCondition(max_tokens=8), n=2)
    s.add_request("wait", list(range(1, 9)), StopCondition(max_tokens=8))
    eng = FakeKVEngine(s, VOCAB)
    out = s.schedule()
    s.update(out, eng.execute(out))
    fin = s.abort("run")
    assert sorted(f.sample_index for f in fin) == [0, 1] and all(f.finish_reason == "aborted" for f in fin)
    fin = s.abort("wait")
    assert len(fin) == 1 and fin[0].output_token_ids == []
    assert s.abort("unknown") == []
    s.check_integrity()
    assert not s.has_unfinished() and s.pool.num_in_use == 0 and s.kv.num_reserved == 0


def test_bad_requests_leave_scheduler_unchanged():
    s = make(num_blocks=4, block_size=4, max_model_len=32)
    s.add_request("ok", [1, 2], StopCondition(max_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        s.add_request("e", [], StopCondition(max_tokens=2))
    with pytest.raises(ValueError, match="max_model_len"):
        s.add_request("long", list(range(32)), StopCondition(max_tokens=2))
    with pytest.raises(ValueError, match="KV blocks"):
        s.add_request("big", list(range(20)), StopCondition(max_tokens=10))
    with pytest.raises(ValueError, match="already in use"):
        s.add_request("ok", [1], StopCondition(max_tokens=1))
    fin = FakeKVEngine(s, VOCAB).run()
    assert [f.request_id for f in fin] == ["ok"]


def test_max_tokens_clamped_to_context():
    s = make(max_model_len=12, block_size=4)
    s.add_request("a", list(range(1, 9)), StopCondition(max_tokens=100))
    fin = FakeKVEngine(s, VOCAB).run()
    assert len(fin[0].output_token_ids) == 4 and fin[0].finish_reason == "length"


def test_randomized_small_pool_never_preempts_and_matches_reference():
    rng = random.Random(1234)
    scenarios_that_waited = 0
    for scenario in range(200):
        block_size = rng.choice([1, 2, 4, 8])
        num_blocks = rng.randint(8, 40)
        s = make(num_blocks=num_blocks, block_size=block_size, max_num_seqs=rng.randint(1, 8),
                 budget=rng.randint(1, 48), max_model_len=128, prefix=rng.random() < 0.7)
        expected = {}
        shared_prefix = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 12))]
        for r in range(rng.randint(1, 10)):
            prompt = shared_prefix + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))]
            max_tokens = rng.randint(1, 12)
            n = rng.choice([1, 1, 1, 2, 3])
            try:
                s.add_request(f"r{r}", prompt, StopCondition(max_tokens=max_tokens), n=n)
            except ValueError:
                continue  # larger than the whole pool (or n > max_num_seqs): rejected up front
            expected[f"r{r}"] = [reference_output(prompt, min(max_tokens, 128 - len(prompt)), VOCAB, sample_index=i)
                                 for i in range(n)]
        eng = FakeKVEngine(s, VOCAB)
        fin = eng.run(check=True)
        scenarios_that_waited += eng.steps_with_queue > 0
        got = {}
        for f in fin:
            got.setdefault(f.request_id, []).append(f)
        assert set(got) == set(expected), scenario
        for rid, refs in expected.items():
            assert len(got[rid]) == len(refs)
            assert all(f.output_token_ids == refs[f.sample_index] for f in got[rid]), (scenario, rid)
        assert s.stats.preemptions == 0
        assert s.pool.num_in_use == 0 and s.kv.num_reserved == 0, scenario
        assert s.pool.num_free + s.pool.num_evictable == num_blocks
    assert scenarios_that_waited >= 50, scenarios_that_waited  # the pools really were too small
