"""Episodes started ahead by a batch call (``RolloutWorker.start_episodes``) and collected by their own calls: each
runs exactly once whichever call comes first, a collected episode equals one run plainly, and entries nobody
collects are dropped after ``max_age_s`` (a started one cancelled)."""
import asyncio
from concurrent.futures import Future

import pytest

from engine import EngineConfig, SamplingParams
from engine.tiny_models import make_tiny_model
from rollout.prestarts import Prestarts

GREEDY = SamplingParams(max_tokens=5, ignore_eos=True)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_batch_first_then_the_own_call_takes_it():
    table, runs = Prestarts(), []
    table.start("a", lambda: runs.append("a") or Future())
    fut = table.take("a")
    assert fut is not None and runs == ["a"] and len(table) == 0


def test_own_call_first_claims_the_key_and_the_batch_skips_it():
    table, runs = Prestarts(), []
    assert table.take("a") is None                # the caller starts it itself
    table.start("a", lambda: runs.append("a") or Future())
    assert runs == [] and len(table) == 0         # both seen: nothing left behind


def test_uncollected_entries_are_dropped_after_max_age():
    clock = Clock()
    table = Prestarts(max_age_s=10.0, clock=clock)
    orphan: Future = Future()
    table.start("orphan", lambda: orphan)
    assert table.take("claimed-only") is None     # a claim whose batch never comes
    clock.now = 11.0
    table.start("fresh", Future)
    assert orphan.cancelled() and len(table) == 1 and table.take("fresh") is not None


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    from rollout.worker import RolloutWorker
    path = make_tiny_model("qwen2", tmp_path_factory.mktemp("prestart") / "m", seed=3)
    w = RolloutWorker(EngineConfig(model=str(path), num_kv_blocks=256, block_size=8, max_model_len=128), 0,
                      fast_channel=False)
    yield w
    w.loop.shutdown()


def episode_kwargs(i):
    return {"seed": i, "prompt_len": 4 + i, "obs_len": 2, "num_steps": 2}


def test_worker_runs_each_episode_once_in_either_order(worker):
    """The actor's methods, called in process: a batch then its own calls, and own calls before their batch
    (an async actor need not run calls in submission order), give what plain run_episode calls give."""
    async def scenario():
        plain = await asyncio.gather(*[worker.run_episode("echo_test", episode_kwargs(i), GREEDY, 3)
                                       for i in range(4)])
        before = (await worker.stats())["episodes"]
        keyed = [(f"b-{i}", episode_kwargs(i)) for i in range(4)]
        await worker.start_episodes("echo_test", keyed[:2], GREEDY, 3)
        late = [worker.run_episode("echo_test", kw, GREEDY, 3, key) for key, kw in keyed]
        tasks = [asyncio.ensure_future(c) for c in late]
        await asyncio.sleep(0)                              # calls 2 and 3 start their episodes themselves
        await worker.start_episodes("echo_test", keyed[2:], GREEDY, 3)
        got = await asyncio.gather(*tasks)
        assert (await worker.stats())["episodes"] == before + 4, "each episode ran exactly once"
        assert len(worker._prestarts) == 0
        for a, b in zip(plain, got):
            assert (a.prompt_ids, a.token_ids, a.loss_mask, a.versions, a.reward, a.turns) == \
                (b.prompt_ids, b.token_ids, b.loss_mask, b.versions, b.reward, b.turns)
            assert b.logprobs == pytest.approx(a.logprobs, abs=1e-5)   # other batch mixes: fp32 rounding only
            assert b.metrics["worker"] == 0
    asyncio.run(scenario())
