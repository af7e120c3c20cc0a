"""A trainer and a rollout worker on one GPU (skipped without CUDA and Ray): the worker shares the GPU
(``num_gpus_per_worker=0.5``), weights go through CUDA IPC via the pool (``WeightPusher``), bit for bit (the
worker's parameter digest equals a fresh engine's on the same weights, and so do its greedy tokens), the pool's
call carried by the worker's fast channel (rollout.fast_channel) or, with the channel taken away, by Ray;
``sleep(1)`` gives back at least 90% of the KV cache's bytes to the device as the trainer's process sees it
(``torch.cuda.mem_get_info``), ``wake_up`` keeps the CUDA graphs and is followed by the same greedy tokens;
``sleep(2)`` gives back the weights too and serves again after the next push."""
from __future__ import annotations

import asyncio

import pytest
import torch

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from rollout.pool_slots import default_runtime_env  # noqa: E402
from tests.rollout.pool_helpers import tiny_model_pair  # noqa: E402
from weight_sync.digest import digest_of  # noqa: E402

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
PROMPTS = [[(7 * i + j) % 300 + 2 for j in range(3 + i % 5)] for i in range(8)]


def run(coro, timeout=300):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def config(path, **kw):
    return EngineConfig(model=str(path), device="cuda", dtype="bfloat16", block_size=16, max_model_len=256,
                        max_num_seqs=16, fixed_address_memory=True, **kw)


def digest(engine: LLMEngine) -> str:
    return digest_of(engine.model.named_parameters())


def tokens(pool):
    """One prompt at a time, so every run sees the same batches (logits depend on the batch: issue 17)."""
    return [ray.get(pool.generate_refs([p], GREEDY), timeout=120)[0][0].token_ids for p in PROMPTS]


def oracle_tokens(engine):
    return [engine.generate([p], GREEDY)[0].token_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_model_pair(tmp_path_factory.mktemp("colocated"))


@pytest.fixture(scope="module")
def pool(models):
    from rollout.pool import RolloutPool
    ray.shutdown()     # the session's CPU-only local Ray (tests/rollout/pool_helpers.py), if an earlier test started it
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env=default_runtime_env())
    try:
        # a KV cache large enough that its release is measurable beyond allocator noise
        p = RolloutPool(config(models[0], num_kv_blocks=4096), 1, num_cpus_per_worker=1, num_gpus_per_worker=0.5,
                        start_timeout_s=240)
        try:
            yield p
        finally:
            p.close()
    finally:
        ray.shutdown()


def fresh(path) -> LLMEngine:
    return LLMEngine(config(path, num_kv_blocks=64))


def test_ipc_updates_through_the_pool_are_bitwise(pool, models):
    from transformers import AutoModelForCausalLM

    from rollout.weight_push import WeightPusher
    from weight_sync import cuda_ipc
    assert pool.colocated_with(cuda_ipc.gpu_uuid(torch.cuda.current_device()))
    pusher = WeightPusher(pool)
    assert pusher.transport == "cuda_ipc"
    try:
        slot = pool._slots[0]
        info = slot.actor.info
        assert info["fast_address"] and pool._fast.reachable(slot.actor)
        for version, path, channel in ((1, models[1], "fast"), (2, models[0], "ray"), (3, models[1], "fast")):
            trainer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda")   # fp32 master
            # "ray": a worker without a fast channel (the fallback) gets the same handles through a Ray call
            slot.actor.info = info if channel == "fast" else {**info, "fast_address": None}
            try:
                report = pusher.push(trainer.named_parameters(), version=version)
            finally:
                slot.actor.info = info
            assert report.transport == "cuda_ipc" and report.version == version
            assert report.channels == (channel,), report
            base = {"pack", "to_worker", "to_engine_thread", "loader", "apply", "return", "pool"}
            assert base <= set(report.stages) and all(report.stages[k] >= 0 for k in base), report.stages
            assert report.bytes == sum(p.numel() * 2 for p in trainer.parameters())    # sent as bf16
            oracle = fresh(path)                     # fp32 checkpoint -> bf16 on load: the same rounding
            [worker] = run(pool.weights_digests())
            assert (worker["digest"], worker["version"]) == (digest(oracle), version)
            assert tokens(pool) == oracle_tokens(oracle)
            del oracle, trainer
            torch.cuda.empty_cache()
    finally:
        pusher.close()


def test_sleep_gives_back_the_kv_cache_and_wake_serves_the_same_tokens(pool, models):
    before = tokens(pool)
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info()[0]
    [report] = run(pool.sleep(1))
    free1 = torch.cuda.mem_get_info()[0]
    assert report["kv_bytes"] > 0
    assert free1 - free0 >= 0.9 * report["kv_bytes"], (free1 - free0, report)
    [woke] = run(pool.wake_up())
    # the KV cache was re-mapped at its addresses (fixed-address memory): the CUDA graphs were kept
    assert woke["graphs_kept"] is True and woke["graphs_captured"] is False, woke
    assert tokens(pool) == before


def test_sleep_level_2_gives_back_the_weights_and_serves_after_the_next_push(pool, models):
    from transformers import AutoModelForCausalLM

    from rollout.weight_push import WeightPusher
    free0 = torch.cuda.mem_get_info()[0]
    [report] = run(pool.sleep(2))
    assert report["weight_bytes"] > 0
    assert torch.cuda.mem_get_info()[0] - free0 >= 0.9 * (report["kv_bytes"] + report["weight_bytes"])
    run(pool.wake_up())
    trainer = AutoModelForCausalLM.from_pretrained(models[0], dtype=torch.float32).to("cuda")
    pusher = WeightPusher(pool)
    try:
        pusher.push(trainer.named_parameters(), version=pool.version + 1)
    finally:
        pusher.close()
    assert tokens(pool) == oracle_tokens(fresh(models[0]))
