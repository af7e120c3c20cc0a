"""Sessions through the engine on a tiny model: each turn equals a from-scratch greedy generation
over the whole history (transformers as the oracle), turns prefill only their new tokens,
offload/restore is bitwise exact, dropping re-prefills correctly, TTL and errors."""
import time

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.tiny_models import make_tiny_model
from scheduler import KVLocation, SessionError

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3"), seed=21)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    return path, hf


def hf_greedy(hf, context, n):
    ids = torch.tensor([context])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(context):].tolist()


def test_three_turns_equal_from_scratch_and_prefill_only_new(tiny):
    path, hf = tiny
    engine = LLMEngine(EngineConfig(model=str(path), block_size=8))
    sid = engine.open_session()
    observations = [list(range(5, 40)), [7, 8, 9, 10, 11], [300, 301]]
    for k, obs in enumerate(observations):
        context = engine.session_tokens(sid) + obs
        c = engine.run_turn(sid, obs, GREEDY)
        assert c.token_ids == hf_greedy(hf, context, 12), f"turn {k}"
        assert c.session_id == sid and c.finish_reason == "length"
        assert c.num_prefill_tokens == len(obs)                 # only the new tokens
        if k:
            assert c.num_cached_tokens == len(context) - len(obs) - 1   # all but the last sampled token
    assert engine.stats()["preemptions"] == 0
    engine.close_session(sid)
    engine.check_integrity()
    assert engine.stats()["num_free_blocks"] == engine.stats()["num_total_blocks"]


def _kv_of(engine, seq):
    """K/V of a session's computed tokens, read through its current block table."""
    bs = engine.config.block_size
    n = seq.num_computed_tokens
    slots = torch.tensor([seq.block_ids[p // bs] * bs + p % bs for p in range(n)])
    return [(k.view(-1, *k.shape[2:])[slots].clone(), v.view(-1, *v.shape[2:])[slots].clone())
            for k, v in engine.kv_caches]


def test_offload_restore_bitwise_and_drop_reprefill(tiny):
    path, hf = tiny
    # 10 blocks of 8 tokens; each session below needs ~6 blocks, so one must leave the device.
    host = LLMEngine(EngineConfig(model=str(path), block_size=8, num_kv_blocks=10, host_kv_cache_bytes=1 << 20))
    a, b = host.open_session("a"), host.open_session("b")
    host.run_turn(a, list(range(2, 40)), GREEDY)
    seq_a = host.scheduler.get_session(a)
    before = _kv_of(host, seq_a)
    host.run_turn(b, list(range(100, 140)), GREEDY)
    assert seq_a.kv is KVLocation.HOST and host.stats()["offloaded_blocks"] > 0
    context = host.session_tokens(a) + [9, 9]
    c = host.run_turn(a, [9, 9], GREEDY)
    stats = host.stats()
    assert stats["restored_sessions"] == 1 and stats["restored_bytes"] > 0 and stats["dropped_sessions"] == 0
    assert c.num_prefill_tokens == 2 and c.token_ids == hf_greedy(hf, context, 12)
    after = _kv_of(host, seq_a)
    for (k0, v0), (k1, v1) in zip(before, after):           # restored KV is bitwise the original
        n = k0.shape[0]
        assert torch.equal(k0, k1[:n]) and torch.equal(v0, v1[:n])

    # No host pool: the idle session's KV is dropped and its next turn re-prefills, still exact.
    drop = LLMEngine(EngineConfig(model=str(path), block_size=8, num_kv_blocks=10, enable_prefix_caching=False))
    a, b = drop.open_session("a"), drop.open_session("b")
    drop.run_turn(a, list(range(2, 40)), GREEDY)
    drop.run_turn(b, list(range(100, 140)), GREEDY)
    assert drop.stats()["dropped_sessions"] == 1
    context = drop.session_tokens(a) + [9, 9]
    c = drop.run_turn(a, [9, 9], GREEDY)
    assert c.token_ids == hf_greedy(hf, context, 12)
    assert c.num_prefill_tokens == 38 + 2
    for e in (host, drop):
        assert e.stats()["preemptions"] == 0 and e.stats()["recomputed_tokens"] == 0
        e.check_integrity()


def test_ttl_and_errors(tiny):
    path, _ = tiny
    engine = LLMEngine(EngineConfig(model=str(path), block_size=8))
    short = engine.open_session(ttl_s=0.05)
    keep = engine.open_session()
    engine.run_turn(short, [3, 4, 5], GREEDY)
    with pytest.raises(SessionError, match="unknown"):
        engine.submit_turn("nope", [1], GREEDY)
    with pytest.raises(ValueError, match="new_token_ids"):
        engine.submit_turn(keep, [1, 10**7], GREEDY)
    with pytest.raises(ValueError, match="n must be 1"):
        engine.submit_turn(keep, [1], SamplingParams(n=2))
    engine.submit_turn(keep, [6, 7, 8], SamplingParams(max_tokens=30, ignore_eos=True))
    with pytest.raises(SessionError, match="in progress"):
        engine.submit_turn(keep, [1], GREEDY)
    time.sleep(0.1)
    done = []
    while engine.has_unfinished():
        done += engine.step()
    assert [len(c.token_ids) for c in done] == [30]
    assert engine.stats()["expired_sessions"] == 1
    with pytest.raises(SessionError, match="closed"):
        engine.submit_turn(short, [1], GREEDY)
    engine.close_session(keep)
    stats = engine.stats()
    assert stats["open_sessions"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"]
    engine.check_integrity()
