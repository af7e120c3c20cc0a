"""Sleep and wake (engine.sleep): the KV cache (level 1) and the weights (level 2) are released and taken
again; outputs after wake equal those before (level 1) or a fresh engine on the updated weights (level 2);
queued work waits while asleep, parked sessions keep their history (KV on the host, or re-prefilled)."""
import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.device_memory import FixedAddresses
from engine.kv_cache import kv_storage
from engine.sleep import EngineAsleep
from engine.tiny_models import make_tiny_model
from tests.engine.cpu_regions import CpuFixedAddresses
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


def _addresses(e) -> list[int]:
    """The KV storage's and every parameter's (and float32 head copy's) device address."""
    head = e.model.fp32_head
    return [kv_storage(e.kv_caches).data_ptr()] + [p.data_ptr() for p in e.updater.params.values()] \
        + [b.data_ptr() for b in (head.buffers() if head is not None else ())]


def _state(path) -> dict:
    from safetensors.torch import load_file
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


@pytest.fixture
def cpu_regions(monkeypatch):
    """Engines built in the test place their weights, fp32 head copies and KV in ``CpuRegion``s: the fixed-address
    sleep path, on CPU (a release turns the bytes to NaN, as a real one loses them)."""
    made = []

    def open_regions(cls, device):
        made.append(CpuFixedAddresses())
        return made[-1]
    monkeypatch.setattr(FixedAddresses, "open", classmethod(open_regions))
    return made


@pytest.mark.parametrize("dtype,fp32_head", [("float32", False), ("bfloat16", True)], ids=["fp32", "bf16-fp32head"])
def test_fixed_address_sleep_unmaps_and_remaps_at_the_same_addresses(tiny, cpu_regions, dtype, fp32_head):
    e = engine(tiny, host_kv_cache_bytes=1 << 20, dtype=dtype, fp32_lm_head=fp32_head, fixed_address_memory=True)
    [fixed] = cpu_regions
    regions = fixed.regions
    assert set(regions) == {"weights", "kv"} | ({"fp32 head"} if fp32_head else set())
    addresses = _addresses(e)
    prompt = [5, 6, 7, 8, 9]
    before = e.generate([prompt], GREEDY)[0]
    sid = e.open_session("s")
    e.run_turn(sid, [11, 12, 13], GREEDY)
    report = e.sleep(1)
    assert not regions["kv"].mapped and regions["weights"].mapped and report.offloaded_sessions == 1
    assert e.kv_caches is None and e.runner.kv_caches is None and e.host_cache.storage is None   # hidden
    woke = e.wake_up()
    assert woke.remapped_bytes == regions["kv"].nbytes and not woke.graphs_captured   # (no graphs on CPU)
    assert _addresses(e) == addresses and e.runner.kv_caches is e.kv_caches
    assert int(torch.count_nonzero(kv_storage(e.kv_caches))) == 0        # the released bytes were NaN: zeroed
    after = e.generate([prompt], GREEDY)[0]
    assert (after.token_ids, after.logprobs) == (before.token_ids, before.logprobs)
    second = e.run_turn(sid, [14, 15], GREEDY)                             # restored from the host
    assert second.num_prefill_tokens == 2

    report = e.sleep(2)
    assert not any(r.mapped for r in regions.values()) and report.weight_bytes > 0
    assert all(p.numel() == 0 for p in e.updater.params.values())
    assert e.model.fp32_head is None or e.model.fp32_head.lm_head_weight.numel() == 0
    woke = e.wake_up()
    assert woke.remapped_bytes == sum(r.nbytes for r in regions.values())
    assert _addresses(e) == addresses
    with pytest.raises(RuntimeError, match="sleep"):
        e.generate([prompt], GREEDY)                                       # the weights are NaN bytes now
    e.update_weights(StateDictLoader(_state(tiny)))
    again = e.generate([prompt], GREEDY)[0]
    assert (again.token_ids, again.logprobs) == (before.token_ids, before.logprobs)
    e.check_integrity()


# ----------------------------------------------------------------------------------------------------- GPU
def _gpu_engine(path, dtype, **kw):
    """Decode graphs (batch 1-8, matrix-vector kernels on: no timing at capture) and mixed-step graphs (16-64
    tokens); a KV cache large enough that its release is measurable; no prefix cache, so every run computes
    the same steps."""
    return LLMEngine(EngineConfig(model=str(path), device="cuda", dtype=dtype, block_size=16,
                                  num_kv_blocks=kw.pop("num_kv_blocks", 32768), max_model_len=256, max_num_seqs=8,
                                  max_num_batched_tokens=64, cuda_graph_max_batch=8, cuda_graph_max_tokens=64,
                                  decode_gemv="on", enable_prefix_caching=False, **kw))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch,dtype,fp32_head", [("qwen2", "float32", False), ("llama", "bfloat16", True)],
                         ids=["fp32", "bf16-tied-fp32head"])
def test_gpu_sleep_keeps_the_cuda_graphs_and_serves_the_same_tokens_bitwise(arch, dtype, fp32_head, tmp_path):
    path = make_tiny_model(arch, tmp_path / arch, seed=5)
    e = _gpu_engine(path, dtype, fp32_lm_head=fp32_head, fixed_address_memory=True)
    assert e.fixed_memory is not None
    assert set(e.fixed_memory.regions) == {"weights", "kv"} | ({"fp32 head"} if fp32_head else set())
    runner = e.runner
    graphs, mixed, captures = runner.graphs, runner.mixed_graphs, runner.graph_captures
    assert graphs is not None and mixed is not None
    addresses = _addresses(e)
    # the last prompt is longer than a step (64 tokens): two prefill chunks, each a mixed-step graph
    prompts = [[3, 4, 5], list(range(10, 40)), [(7 * i) % 500 + 2 for i in range(100)]]
    params = SamplingParams(max_tokens=12, ignore_eos=True)

    def run():
        start = dict(runner.step_counts)
        out = [e.generate([p], params)[0] for p in prompts]     # one at a time: the same batches every run
        assert runner.step_counts["graph"] > start["graph"] and runner.step_counts["mixed graph"] > start["mixed graph"]
        return [(c.token_ids, c.logprobs) for c in out]

    before = run()
    # the weights were placed in the region and loaded right (ties kept): the torch-allocated engine agrees
    ref = _gpu_engine(path, dtype, fp32_lm_head=fp32_head, fixed_address_memory=False, num_kv_blocks=256)
    assert ref.fixed_memory is None
    assert [ref.generate([p], params)[0].token_ids for p in prompts] == [t for t, _ in before]
    del ref
    torch.cuda.empty_cache()

    def sleep_and_wake(level):
        torch.cuda.synchronize()
        free0 = torch.cuda.mem_get_info()[0]
        report = e.sleep(level)
        gained = torch.cuda.mem_get_info()[0] - free0
        assert gained >= 0.9 * (report.kv_bytes + report.weight_bytes), (gained, report)
        assert report.graph_pool_bytes is None or report.graph_pool_bytes > 0      # the pools are kept
        assert e.kv_caches is None and runner.kv_caches is None
        woke = e.wake_up()
        assert woke.graphs_kept and not woke.graphs_captured, woke
        assert woke.remapped_bytes >= report.kv_bytes + report.weight_bytes
        assert runner.graphs is graphs and runner.mixed_graphs is mixed and runner.graph_captures == captures
        assert _addresses(e) == addresses and runner.kv_caches is e.kv_caches
        assert int(torch.count_nonzero(kv_storage(e.kv_caches))) == 0                # zeros right after wake
        return report

    sleep_and_wake(1)
    assert run() == before                                       # tokens and logprobs, bitwise

    report = sleep_and_wake(2)
    assert report.weight_bytes > 0
    with pytest.raises(RuntimeError, match="sleep"):
        e.generate([[5, 6, 7]], params)                          # weights undefined until an update
    e.update_weights(StateDictLoader(_state(path)))               # the same weights again
    assert run() == before
    e.check_integrity()
