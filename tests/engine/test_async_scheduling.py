"""Async scheduling (decode step N+1 queued before step N's tokens are read): same outputs as the synchronous
engine under stop tokens, aborts, waiting requests, small pools and multi-turn sessions; the scheduler stays
consistent after every step; rows of sequences that ended meanwhile are dropped."""
import random

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.tiny_models import make_tiny_model
from scheduler.scheduler import cdiv


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("qwen2_async"), seed=5)


def make(model_path, async_scheduling, **kw):
    cfg = dict(model=str(model_path), block_size=4, num_kv_blocks=64, max_num_seqs=6)
    cfg.update(kw)
    return LLMEngine(EngineConfig(async_scheduling=async_scheduling, **cfg))


def drive(engine, abort_at=None):
    """Step to the end, checking integrity after every step; abort_at: {step index: request id}."""
    done, i = [], 0
    while engine.has_unfinished():
        done += engine.step()
        engine.check_integrity()
        if abort_at and i in abort_at:
            done += engine.abort(abort_at[i])
            engine.check_integrity()
        i += 1
        assert i < 2000
    stats = engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    return {(c.request_id, c.sample_index): c for c in done}


def same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].token_ids == b[k].token_ids, k
        assert a[k].finish_reason == b[k].finish_reason, k
        assert len(a[k].logprobs) == len(a[k].token_ids) == len(a[k].versions)
        assert max((abs(x - y) for x, y in zip(a[k].logprobs, b[k].logprobs)), default=0.0) < 1e-4


def workload(seed, vocab, stop_from=None):
    rng = random.Random(seed)
    reqs = []
    for i in range(14):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randrange(1, 30))]
        stop = ()
        if stop_from is not None and i % 3 == 0:
            out = stop_from[(f"r{i}", 0)].token_ids
            stop = (out[min(len(out) - 1, rng.randrange(1, 8))],)   # a token this request really samples
        reqs.append((f"r{i}", prompt, SamplingParams(max_tokens=rng.randrange(1, 24), stop_token_ids=stop,
                                                     ignore_eos=True)))
    return reqs


def submit(engine, reqs):
    for rid, prompt, params in reqs:
        engine.add_request(prompt, params, request_id=rid)


@pytest.mark.parametrize("seed, after_prefill, admissions", [(seed, after, False) for after in (False, True)
                                                             for seed in (0, 1, 2)] + [(0, True, True)])
def test_stop_tokens_waiting_and_small_pool_same_as_sync(model_path, seed, after_prefill, admissions):
    probe = make(model_path, False)
    vocab = probe.vocab_size
    submit(probe, workload(seed, vocab))
    plain = drive(probe)
    results = {}
    for mode in (False, True):
        # small pool: requests wait for blocks; after_prefill: steps after prefill steps are planned ahead too;
        # admissions: waiting requests are admitted in steps planned ahead
        e = make(model_path, mode, num_kv_blocks=40, async_after_prefill=after_prefill, async_admissions=admissions)
        submit(e, workload(seed, vocab, stop_from=plain))
        results[mode] = drive(e)
        ahead = e.stats()["steps_ahead"]
        assert (ahead > 0) if mode else ahead == 0
        assert e.stats()["preemptions"] == 0
    same(results[True], results[False])
    assert any(c.finish_reason == "stop" for c in results[True].values())


def test_abort_with_a_step_queued_ahead(model_path):
    reqs = [(f"a{i}", [3 + i, 9, 27, 4 + i], SamplingParams(max_tokens=30, ignore_eos=True)) for i in range(4)]
    results = {}
    for mode in (False, True):
        e = make(model_path, mode)
        submit(e, reqs)
        results[mode] = drive(e, abort_at={5: "a1", 9: "a3"})
    same(results[True], results[False])
    assert results[True][("a1", 0)].finish_reason == "aborted"
    assert 0 < len(results[True][("a1", 0)].token_ids) < 30


@pytest.mark.parametrize("pressure", [False, True])
def test_sessions_stopping_mid_batch_same_as_sync(model_path, pressure):
    """Turns end on a stop token while a decode step is queued ahead; the next turn is submitted at once. Under
    pressure: a pool too small for every session (idle ones go to the host pool and come back), with the next
    turns admitted and the landed restores scheduled in steps planned ahead."""
    outs = {}
    kw = dict(num_kv_blocks=96)
    if pressure:
        kw = dict(num_kv_blocks=24, host_kv_cache_bytes=8 << 20, async_after_prefill=True, async_admissions=True)
    for mode in (False, True):
        e = make(model_path, mode, max_num_seqs=4, **kw)
        sessions = [e.open_session(f"s{i}") for i in range(3)]
        history = {s: [] for s in sessions}
        filler = e.add_request([5, 6, 7], SamplingParams(max_tokens=60, ignore_eos=True), request_id="filler")
        assert filler == "filler"
        turns = {s: 0 for s in sessions}
        rng = random.Random(7)
        pending = {}
        for s in sessions:
            pending[e.submit_turn(s, [11 + turns[s], 12, 13], SamplingParams(max_tokens=12, ignore_eos=True,
                                                                               stop_token_ids=(17, 23, 31)))] = s
        steps = 0
        while e.has_unfinished():
            for c in e.step():
                if c.session_id is None:
                    history.setdefault("filler", []).append(c.token_ids)
                    continue
                s = pending.pop(c.request_id)
                history[s].append((c.token_ids, c.finish_reason))
                seq = e.scheduler.sessions[s]
                assert len(seq.block_ids) == cdiv(seq.num_computed_tokens, 4) or not seq.block_ids
                turns[s] += 1
                if turns[s] < 3:   # next turn right away, while other work is queued ahead
                    obs = [rng.randrange(2, e.vocab_size) for _ in range(3)]
                    pending[e.submit_turn(s, obs, SamplingParams(max_tokens=12, ignore_eos=True,
                                                                 stop_token_ids=(17, 23, 31)))] = s
            e.check_integrity()
            steps += 1
            assert steps < 2000
        for s in sessions:
            history[s].append(e.session_tokens(s))
            e.close_session(s)
        outs[mode] = history
        if mode:
            assert e.stats()["steps_ahead"] > 0
        if pressure:
            assert e.stats()["restored_sessions"] > 0 and e.stats()["preemptions"] == 0
    assert outs[True] == outs[False]


def test_seeded_sampling_and_top_logprobs_same_as_sync(model_path):
    """Sampled rows are queued ahead too (sampling runs on the device, read later); seeded draws depend on
    (seed, sample index, step) only, so the outputs equal the synchronous engine's."""
    reqs = [(f"s{i}", [5 + i, 40, 41, 42 + i], SamplingParams(
        n=2 if i % 2 else 1, temperature=0.8 + 0.1 * i, top_k=[-1, 20, 50][i % 3], top_p=[1.0, 0.9][i % 2],
        min_p=0.02 * (i % 3), seed=100 + i, logprobs=[None, 3, 0][i % 3], max_tokens=10 + 3 * i,
        stop_token_ids=(7, 19), ignore_eos=True)) for i in range(5)]
    results = {}
    for mode in (False, True):
        e = make(model_path, mode)
        submit(e, reqs)
        results[mode] = drive(e)
        ahead = e.stats()["steps_ahead"]
        assert (ahead > 0) if mode else ahead == 0
    same(results[True], results[False])
    for k, c in results[True].items():
        other = results[False][k]
        assert (c.top_logprobs is None) == (other.top_logprobs is None)
        if c.top_logprobs is not None:
            assert [[t for t, _ in step] for step in c.top_logprobs] == \
                [[t for t, _ in step] for step in other.top_logprobs]
            assert len(c.top_logprobs) == len(c.token_ids)
    assert any(c.top_logprobs and c.top_logprobs[0] for c in results[True].values())
