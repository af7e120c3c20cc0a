"""Sleep and wake (engine.sleep): the KV cache (level 1) and the weights (level 2) are released and taken
again; outputs after wake equal those before (level 1) or a fresh engine on the updated weights (level 2);
queued work waits while asleep, parked sessions keep their history (KV on the host, or re-prefilled)."""
import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.sleep import EngineAsleep
from engine.tiny_models import make_tiny_model
from weight_sync import StateDictLoader

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("sleep"), seed=4)


def engine(path, **kw):
    return LLMEngine(EngineConfig(model=str(path), block_size=4, num_kv_blocks=48, **kw))


def test_sleep_level_1_frees_the_kv_cache_and_outputs_are_unchanged_after_wake(tiny):
    e = engine(tiny, host_kv_cache_bytes=1 << 20)
    prompt = [5, 6, 7, 8, 9]
    before = e.generate([prompt], GREEDY)[0].token_ids
    sid = e.open_session("s")
    first = e.run_turn(sid, [11, 12, 13], GREEDY)
    report = e.sleep(1)
    assert e.asleep == 1 and e.kv_caches is None and e.runner.kv_caches is None
    assert report.kv_bytes > 0 and report.freed_bytes >= report.kv_bytes and report.weight_bytes == 0
    assert report.offloaded_sessions == 1 and report.dropped_sessions == 0   # the session's KV went to the host
    rid = e.add_request(prompt, GREEDY)                         # accepted while asleep, waits
    assert not e.has_unfinished() and e.step() == []
    with pytest.raises(EngineAsleep, match="wake_up"):
        e.generate([prompt], GREEDY)
    with pytest.raises(EngineAsleep, match="wake_up"):
        e.update_weights(StateDictLoader({}), partial=True)
    with pytest.raises(EngineAsleep, match="already asleep"):
        e.sleep(1)
    woken = e.wake_up()
    assert e.asleep == 0 and e.kv_caches is not None and woken.level == 1
    done = []
    while e.has_unfinished():
        done += e.step()
    assert [c.token_ids for c in done if c.request_id == rid] == [before]
    second = e.run_turn(sid, [14, 15], GREEDY)                  # restored from the host, exact
    fresh = engine(tiny)
    ref_sid = fresh.open_session("s")
    fresh.run_turn(ref_sid, [11, 12, 13], GREEDY)
    assert second.token_ids == fresh.run_turn(ref_sid, [14, 15], GREEDY).token_ids
    assert second.num_prefill_tokens == 2 and first.token_ids
    e.check_integrity()


def _live_storages() -> set[tuple[int, int]]:
    """(data pointer, bytes) of the storage of every live CPU tensor."""
    import gc
    gc.collect()
    return {(o.untyped_storage().data_ptr(), o.untyped_storage().nbytes()) for o in gc.get_objects()
            if isinstance(o, torch.Tensor) and o.device.type == "cpu"}


def _live_tensors_on(storage_ptr: int, nbytes: int) -> int:
    return int((storage_ptr, nbytes) in _live_storages())


@pytest.mark.parametrize("host_bytes", [0, 1 << 20])
def test_sleep_keeps_no_reference_to_the_released_kv_cache(tiny, host_bytes):
    """freed_bytes on CPU is counted, not measured: check that no tensor still holds the KV storage (with a host
    pool, the offload side held it, so on CUDA nothing was given back)."""
    e = engine(tiny, host_kv_cache_bytes=host_bytes)
    e.generate([[5, 6, 7]], GREEDY)
    storage = e.kv_caches[0][0].untyped_storage()
    ptr, nbytes = storage.data_ptr(), storage.nbytes()
    del storage
    assert _live_tensors_on(ptr, nbytes) > 0
    e.sleep(1)
    assert _live_tensors_on(ptr, nbytes) == 0
    e.wake_up()
    assert e.generate([[5, 6, 7]], GREEDY)[0].token_ids == engine(tiny).generate([[5, 6, 7]], GREEDY)[0].token_ids
    weights = [(p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) for p in e.model.parameters()]
    assert set(weights) <= _live_storages()
    e.sleep(2)
    assert set(weights) & _live_storages() == set()     # level 2: no weight storage kept either


def test_sleep_level_2_releases_the_weights_until_an_update_lands(tiny, tmp_path):
    e = engine(tiny)
    weight_bytes = sum(p.numel() * p.element_size() for p in e.updater.params.values())
    report = e.sleep(2)
    assert report.weight_bytes == weight_bytes > 0
    assert report.freed_bytes == report.kv_bytes + weight_bytes                   # CPU: the tensors' bytes
    assert all(p.numel() == 0 for p in e.updater.params.values())
    sid = e.open_session("s")                                    # sessions can open while asleep
    e.wake_up()
    with pytest.raises(RuntimeError, match="sleep"):
        e.generate([[5, 6, 7]], GREEDY)                          # weights undefined until an update
    with pytest.raises(ValueError, match="complete update"):
        e.update_weights(StateDictLoader({}), partial=True)
    other = make_tiny_model("qwen2", tmp_path / "other", seed=9)  # new weights, as a trainer would send
    from safetensors.torch import load_file
    state = {}
    for f in sorted(other.glob("*.safetensors")):
        state.update(load_file(str(f)))
    e.update_weights(StateDictLoader(state))
    got = e.generate([[5, 6, 7, 8]], GREEDY)[0].token_ids
    assert got == engine(other).generate([[5, 6, 7, 8]], GREEDY)[0].token_ids
    assert e.run_turn(sid, [1, 2, 3], GREEDY).token_ids


def test_sleep_waits_for_running_work_and_keeps_queued_work(tiny):
    e = engine(tiny, max_num_seqs=1)
    a = e.add_request([3, 4, 5], SamplingParams(max_tokens=6, ignore_eos=True))
    b = e.add_request([6, 7, 8], SamplingParams(max_tokens=6, ignore_eos=True))
    e.step()                                                     # a runs, b waits (one sequence at a time)
    e.sleep(1)
    finished = e.step() + e.step()                               # a's completion was kept for the next step
    assert [c.request_id for c in finished] == [a] and len(finished[0].token_ids) == 6
    assert e.scheduler.has_request(b)
    e.wake_up()
    done = []
    while e.has_unfinished():
        done += e.step()
    assert [c.request_id for c in done] == [b]
    with pytest.raises(ValueError, match="level"):
        e.sleep(3)
    with pytest.raises(ValueError, match="not asleep"):
        e.wake_up()
