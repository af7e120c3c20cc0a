"""The engine loop's incremental path (``EngineLoop.generate(on_delta=...)``, ``LocalBackend.generate_stream``): tokens
arrive step by step while the request runs, their concatenation is exactly the engine's own output, and a
consumer that stops reading aborts the request (its KV freed)."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.tiny_models import make_tiny_model
from rollout.local import LocalBackend

PROMPT = [5, 17, 99, 3, 250, 41]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("streams"), seed=3)


def config(path) -> EngineConfig:
    return EngineConfig(model=str(path), num_kv_blocks=256, block_size=8, max_model_len=256)


@pytest.fixture(scope="module")
def backend(model, one_torch_thread):
    b = LocalBackend(config(model))
    yield b
    b.loop.shutdown()


def test_deltas_arrive_per_step_and_add_up_to_the_engine_output(backend, model):
    params = SamplingParams(temperature=0.8, seed=11, n=3, max_tokens=20, ignore_eos=True, logprobs=2)
    deltas, done_when_seen = [], []
    fut = None

    def on_delta(d):   # loop thread
        deltas.append(d)
        done_when_seen.append(fut.done() if fut is not None else False)

    fut = backend.loop.generate(PROMPT, params, on_delta=on_delta)
    trajectories = fut.result(60)
    expected = LLMEngine(config(model)).generate([PROMPT], params)
    for s, (t, c) in enumerate(zip(trajectories, expected)):
        mine = [d for d in deltas if d.sample_index == s]
        assert [d.final is not None for d in mine] == [False] * (len(mine) - 1) + [True]
        assert mine[-1].final.token_ids == t.token_ids == c.token_ids
        assert [tok for d in mine for tok in d.token_ids] == c.token_ids
        assert [lp for d in mine for lp in d.logprobs] == c.logprobs
        assert [v for d in mine for v in d.versions] == c.versions
        assert [row for d in mine for row in d.top_logprobs] == c.top_logprobs
        # one step samples one token per sample: the tokens came while generating, not chopped up at the end
        assert len([d for d in mine if d.token_ids]) >= params.max_tokens // 2
    assert not any(done_when_seen), "every delta is handed over before the request resolves"


def test_a_consumer_that_stops_reading_aborts_the_request(backend):
    stats = backend.loop.stats().result(10)
    aborted, total = stats["aborted_requests"], stats["num_total_blocks"]
    got_two = threading.Event()

    async def read_two():
        stream = backend.generate_stream(PROMPT, SamplingParams(max_tokens=200, ignore_eos=True))
        seen = []
        async for d in stream:
            seen.append(d)
            if len(seen) == 2:
                break
        await stream.aclose()
        got_two.set()
        return seen

    seen = asyncio.run(read_two())
    assert got_two.is_set() and all(d.final is None for d in seen)
    deadline = time.monotonic() + 10
    while True:   # bounded: the abort is a command the loop thread runs next
        s = backend.loop.stats().result(10)
        if s["aborted_requests"] == aborted + 1 and s["pending_requests"] == 0:
            break
        assert time.monotonic() < deadline, f"the request was not aborted: {s}"
        time.sleep(0.005)
    assert s["num_running"] == 0 and s["num_held_blocks"] == 0 and s["num_free_blocks"] == total
    assert s["decode_tokens"] < 200 + stats["decode_tokens"]
