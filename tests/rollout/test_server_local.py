"""The front end over a real LocalBackend (a tiny model) against a direct LLMEngine run, the CLI's graceful
shutdown, batch cancellation, top logprobs and wire-named engine errors. Loopback only; every wait is bounded.
(The front end's protocol behaviour over a stub backend: test_server.py.)"""
from __future__ import annotations

import asyncio
import time

import pytest

from engine.sampling import SamplingParams
from rollout.backend import ErrorCode, RolloutError
from rollout.client import AsyncRolloutClient, RolloutClient
from rollout.server import BackgroundFrontEnd

BIND = "tcp://127.0.0.1:*"


def run(coro, timeout_s: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


# ------------------------------------------------------------------ LocalBackend on a tiny model
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from engine.tiny_models import make_tiny_model
    return str(make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama"))


def test_local_backend_matches_llm_engine(tiny_model):
    local = pytest.importorskip("rollout.local")
    from engine import EngineConfig, LLMEngine

    config = EngineConfig(model=tiny_model, num_kv_blocks=128, max_num_seqs=16, seed=0)
    prompts = [[3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14]]
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    seeded = SamplingParams(max_tokens=6, temperature=0.9, seed=11, n=2, ignore_eos=True)
    turn = SamplingParams(max_tokens=5, ignore_eos=True)

    engine = LLMEngine(config)
    want_greedy = [c.token_ids for c in engine.generate(prompts, greedy)]
    want_seeded = [c.token_ids for c in engine.generate([prompts[0]], seeded)]
    sid = engine.open_session()
    want_turns = [engine.run_turn(sid, [20, 21, 22], turn).token_ids, engine.run_turn(sid, [23], turn).token_ids]

    backend = local.LocalBackend(config)
    try:
        with BackgroundFrontEnd(lambda: backend, BIND) as fe:
            with RolloutClient(fe.address, timeout_s=60) as c:
                got = c.generate_batch(prompts, greedy)
                assert [t.token_ids for t in got] == want_greedy
                assert all(len(t.logprobs) == len(t.token_ids) == len(t.versions) for t in got)
                assert [t.token_ids for t in c.generate(prompts[0], seeded)] == want_seeded
                s = c.open_session()
                turns = [c.step_session(s, [20, 21, 22], turn).token_ids, c.step_session(s, [23], turn).token_ids]
                assert turns == want_turns
                whole = c.close_session(s)
                assert whole.token_ids == turns[0] + [23] + turns[1]
                with pytest.raises(RolloutError) as info:
                    c.generate([10 ** 6])           # outside the tiny vocabulary: the engine names the field
                assert info.value.code is ErrorCode.BAD_REQUEST
                assert c.health()["ok"] is True
    finally:
        run(backend.shutdown())


# ------------------------------------------------------------------ the CLI
def test_cli_serve_local_graceful_sigterm(tiny_model):
    import os
    import signal
    import subprocess
    import sys

    pytest.importorskip("rollout.local")
    proc = subprocess.Popen([sys.executable, "-m", "rollout.cli", "serve", "--model", tiny_model, "--local",
                             "--bind", BIND, "--max-num-seqs", "4", "--no-update-weights"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        address = None
        deadline = time.monotonic() + 90
        while address is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("rollout serve: listening on "):
                address = line.split()[-1]
        assert address is not None, "the server never said where it listens"

        async def main():
            async with AsyncRolloutClient(address, timeout_s=30) as c:
                assert (await c.health())["ok"] is True
                with pytest.raises(RolloutError) as info:
                    await c.update_weights("safetensors", {"path": "/nonexistent"})
                assert info.value.code is ErrorCode.DISABLED
                long = asyncio.create_task(c.generate([1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True)))
                await asyncio.sleep(0.2)
                proc.send_signal(signal.SIGTERM)
                trajs = await long                       # in flight at SIGTERM: still answered
                assert len(trajs[0].token_ids) == 200
        run(main(), 60)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_gather_or_cancel_cancels_the_rest_of_a_batch_on_error():
    """A batch answered with an error must leave no work running behind the reply."""
    import asyncio

    from rollout.backend import gather_or_cancel
    cancelled = []

    async def slow(i):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(i)
            raise

    async def bad():
        await asyncio.sleep(0.01)
        raise RolloutError(ErrorCode.BAD_REQUEST, "prompt 1 is bad")

    async def scenario():
        with pytest.raises(RolloutError):
            await gather_or_cancel(slow(0), bad(), slow(2))
        assert await gather_or_cancel(asyncio.sleep(0, result=1), asyncio.sleep(0, result=2)) == [1, 2]
    asyncio.run(asyncio.wait_for(scenario(), 5))
    assert sorted(cancelled) == [0, 2]


def test_top_logprobs_come_back_over_the_wire(tiny_model):
    """params.logprobs = k: every model token of every trajectory (generate, a session turn, the whole session,
    an episode) carries its k most likely (id, logprob) pairs, as the engine computed them; environment tokens
    (and tokens of turns that did not ask) carry []."""
    local = pytest.importorskip("rollout.local")
    from engine import EngineConfig, LLMEngine

    config = EngineConfig(model=tiny_model, num_kv_blocks=128, max_num_seqs=8, seed=0)
    asked = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=3)
    want = LLMEngine(config).generate([[3, 4, 5]], asked)[0]
    backend = local.LocalBackend(config)
    try:
        with BackgroundFrontEnd(lambda: backend, BIND) as fe, RolloutClient(fe.address, timeout_s=60) as c:
            got = c.generate([3, 4, 5], asked)[0]
            sid = c.open_session()
            turn1 = c.step_session(sid, [3, 4, 5], asked)
            c.step_session(sid, [6, 7], SamplingParams(max_tokens=2, ignore_eos=True))   # no top logprobs asked
            whole = c.close_session(sid)
            plain = c.generate([3, 4, 5], SamplingParams(max_tokens=2))[0]
            episode = c.run_episode("echo_test", {}, SamplingParams(max_tokens=2, logprobs=1), max_turns=2)
    finally:
        run(backend.shutdown())
    as_pairs = [[(int(i), float(lp)) for i, lp in row] for row in got.top_logprobs]
    assert got.token_ids == want.token_ids and as_pairs == [[(i, pytest.approx(lp)) for i, lp in row]
                                                            for row in want.top_logprobs]
    assert all(len(row) == 3 and row[0][0] == tok and row[0][1] == pytest.approx(lp)   # greedy: top-1 is the token
               for row, tok, lp in zip(got.top_logprobs, got.token_ids, got.logprobs))
    assert turn1.top_logprobs == got.top_logprobs
    assert len(whole.top_logprobs) == len(whole.token_ids) == 4 + 2 + 2
    assert whole.top_logprobs[:4] == got.top_logprobs and whole.top_logprobs[4:] == [[]] * 4
    assert plain.top_logprobs is None                           # not asked: absent from the reply
    assert len(episode.top_logprobs) == len(episode.token_ids)
    assert all((len(row) == 1) == bool(m) for row, m in zip(episode.top_logprobs, episode.loss_mask))


def test_engine_errors_name_the_wire_fields(tiny_model):
    """The engine names its own fields (prompt_token_ids, SamplingParams.n); the wire reply names the client's."""
    local = pytest.importorskip("rollout.local")
    from engine import EngineConfig

    backend = local.LocalBackend(EngineConfig(model=tiny_model, num_kv_blocks=64, max_num_seqs=4, seed=0))
    try:
        with BackgroundFrontEnd(lambda: backend, BIND) as fe, RolloutClient(fe.address, timeout_s=60) as c:
            sid = c.open_session()
            calls = {"prompt_ids[1]": lambda: c.generate([1, 10 ** 6]),
                     "prompts[1][0]": lambda: c.generate_batch([[1], [10 ** 6]]),
                     "new_token_ids[0]": lambda: c.step_session(sid, [10 ** 6]),
                     "params.n must be 1": lambda: c.step_session(sid, [1], SamplingParams(n=2))}
            for needle, call in calls.items():
                with pytest.raises(RolloutError) as info:
                    call()
                assert info.value.code is ErrorCode.BAD_REQUEST and needle in info.value.message, info.value
                assert "prompt_token_ids" not in info.value.message and "SamplingParams" not in info.value.message
    finally:
        run(backend.shutdown())
