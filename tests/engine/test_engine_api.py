"""Engine behaviour beyond exactness: n-sample prefix sharing, prefix reuse, seeded sampling
independent of batch composition, abort, bad input, the step API and stats."""
import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("qwen2"), seed=3)


@pytest.fixture()
def engine(model_path):
    e = LLMEngine(EngineConfig(model=str(model_path), block_size=16, num_kv_blocks=128))
    yield e
    e.check_integrity()
    stats = e.stats()
    assert not e.has_unfinished()
    assert stats["num_free_blocks"] == stats["num_total_blocks"], "every block is free once all requests finish"


PROMPT = list(range(10, 50))   # 40 tokens: 2 full blocks of 16 + 8


def test_n_samples_compute_the_prompt_once(engine):
    outs = engine.generate([PROMPT], SamplingParams(n=8, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True))
    assert [c.sample_index for c in outs] == list(range(8))
    assert all(len(c.token_ids) == 8 for c in outs)
    stats = engine.stats()
    # the leader computes the 40 prompt tokens; the 7 siblings share its 2 full blocks, copy its partial
    # third and sample their first tokens from its last row: nothing recomputed
    assert stats["prefill_tokens"] == 40
    assert stats["cached_prompt_tokens"] == 7 * 40
    assert len({tuple(c.token_ids) for c in outs}) > 1, "different samples should differ at T=1"
    # a later request with the same prefix reuses the cached full blocks
    later = engine.generate([PROMPT + [7, 7, 7]], SamplingParams(max_tokens=4))
    assert later[0].num_cached_tokens == 32
    assert engine.stats()["prefill_tokens"] == 40 + 11


def test_seeded_sampling_independent_of_batch(engine, model_path):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    alone = engine.generate([PROMPT], params)[0].token_ids
    others = [[3, 4, 5], list(range(100, 170)), [9] * 20]
    noise = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    crowded = engine.generate(others[:2] + [PROMPT] + others[2:], [noise, noise, params, noise])
    assert crowded[2].token_ids == alone
    # a different engine with a different batch order and a small token budget: same tokens
    other = LLMEngine(EngineConfig(model=str(model_path), max_num_batched_tokens=7, seed=99))
    assert other.generate([others[1], PROMPT], [noise, params])[1].token_ids == alone
    # a different seed gives a different stream
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=4321, max_tokens=24, ignore_eos=True)
    assert engine.generate([PROMPT], other_seed)[0].token_ids != alone


def test_step_api_and_abort(engine):
    rid = engine.add_request(PROMPT, SamplingParams(max_tokens=50, ignore_eos=True))
    other = engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    finished = []
    for _ in range(4):
        finished += engine.step()
    assert [c.request_id for c in finished] == [other] and finished[0].finish_reason == "length"
    aborted = engine.abort(rid)
    assert len(aborted) == 1 and aborted[0].finish_reason == "aborted"
    assert 0 < len(aborted[0].token_ids) == len(aborted[0].logprobs) < 50
    assert engine.abort(rid) == [] and engine.abort("nope") == []
    assert not engine.has_unfinished()


def test_stop_token_and_eos(engine):
    free = engine.generate([PROMPT], SamplingParams(max_tokens=20, ignore_eos=True))[0].token_ids
    stop_at = free[5]
    out = engine.generate([PROMPT], SamplingParams(max_tokens=20, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == free[:free.index(stop_at) + 1] and out.finish_reason == "stop"


def test_top_logprobs(engine):
    out = engine.generate([PROMPT], SamplingParams(max_tokens=3, logprobs=4))[0]
    assert len(out.top_logprobs) == 3
    for tok, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        assert len(top) == 4 and top[0][0] == tok and abs(top[0][1] - lp) < 1e-6  # greedy: best first


@pytest.mark.parametrize("prompt, params, field", [
    ([], SamplingParams(), "prompt_token_ids"),
    ([1, 2, 10**6], SamplingParams(), "prompt_token_ids"),
    ([1, -1], SamplingParams(), "prompt_token_ids"),
    ([1, "a"], SamplingParams(), "prompt_token_ids"),
    (list(range(2, 1100)), SamplingParams(), "prompt_token_ids"),   # longer than the 1024 context
])
def test_bad_prompts_raise_and_engine_keeps_serving(engine, prompt, params, field):
    running = engine.add_request(PROMPT, SamplingParams(max_tokens=5))
    with pytest.raises(ValueError, match=field):
        engine.add_request(prompt, params)
    with pytest.raises(ValueError, match=field):
        engine.generate([PROMPT, prompt], params)
    done = []
    while engine.has_unfinished():
        done += engine.step()
    assert [c.request_id for c in done] == [running] and len(done[0].token_ids) == 5


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-3), "max_tokens"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature"), (dict(n=0), "n"), (dict(top_k=0), "top_k"),
    (dict(min_p=2.0), "min_p"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_engine_config(tmp_path, model_path):
    with pytest.raises(ValueError, match="model"):
        LLMEngine(EngineConfig(model=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        LLMEngine(EngineConfig(model=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(model=str(model_path), dtype="int8")
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(model=str(model_path), block_size=0)


def test_unknown_architecture_and_missing_weights(tmp_path, model_path):
    import json
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(model_path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="architecture"):
        LLMEngine(EngineConfig(model=str(bad)))
    noweights = tmp_path / "noweights"
    shutil.copytree(model_path, noweights)
    for f in noweights.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match="safetensors"):
        LLMEngine(EngineConfig(model=str(noweights)))


def test_request_larger_than_pool_rejected(model_path):
    e = LLMEngine(EngineConfig(model=str(model_path), num_kv_blocks=4, block_size=16))
    with pytest.raises(ValueError, match="KV blocks"):
        e.add_request(PROMPT, SamplingParams(max_tokens=100))
    assert e.generate([PROMPT], SamplingParams(max_tokens=8))[0].finish_reason in ("length", "stop")


def test_output_length_reports_progress_of_a_running_request(tmp_path):
    path = make_tiny_model("qwen2", tmp_path / "m", seed=3)
    engine = LLMEngine(EngineConfig(model=str(path), block_size=4, num_kv_blocks=32))
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=10, ignore_eos=True))
    assert engine.output_length(rid) == 0 and engine.output_length("unknown") == 0
    lengths = []
    while engine.has_unfinished():
        done = engine.step()
        lengths.append(engine.output_length(rid) if not done else len(done[0].token_ids))
    assert lengths == sorted(lengths) and lengths[-1] == 10 and engine.output_length(rid) == 0


def test_host_kv_pool_size_defaults():
    import torch
    from engine.memory import host_kv_bytes
    cfg = EngineConfig(model="unused")
    assert host_kv_bytes(cfg, torch.device("cpu"), 1 << 30) == 0            # CPU: no host pool by default
    assert host_kv_bytes(EngineConfig(model="unused", host_kv_cache_bytes=123), torch.device("cpu"), 1 << 30) == 123
    with pytest.raises(ValueError, match="host_kv_cache_bytes"):
        EngineConfig(model="unused", host_kv_cache_bytes=-1)
