"""The HTTP front end over a Ray ``RolloutPool`` (local Ray of 2 CPUs, one CPU worker, the tiny llama with SmolLM2's
tokenizer): ``stream: true`` carries the worker's tokens as its engine generates them (many chunks, not one at the
end), equal to the engine's own ``generate``; a streamed chat continues its session on the worker that holds its
KV (only the new tokens prefilled, equal to the engine's session API); a client that goes away mid-stream aborts
the request on the worker and frees what it held."""
from __future__ import annotations

import asyncio
import time

import openai
import pytest

ray = pytest.importorskip("ray")

from engine import LLMEngine, SamplingParams  # noqa: E402
from engine.smollm2 import chat_prompt_ids  # noqa: E402
from rollout.http_server import HttpConfig, create_app  # noqa: E402
from tests.rollout.http_helpers import open_stream, serving, sse_events  # noqa: E402
from tests.rollout.pool_helpers import local_pool  # noqa: E402
from tests.rollout.test_http_server import engine_config, model_dir  # noqa: E402,F401 - fixture
from tests.rollout.test_session_prefix import delta_ids  # noqa: E402

pytestmark = pytest.mark.slow   # a Ray start (about 10 s on this machine) and one worker process

MODEL = "tiny-pool"
IDS = [17, 400, 1234, 99, 5000]


@pytest.fixture(scope="module")
def pooled(model_dir, one_torch_thread):  # noqa: F811
    from transformers import AutoTokenizer
    oracle = LLMEngine(engine_config(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    with local_pool(engine_config(model_dir), num_workers=1) as pool:
        app = create_app(pool, tokenizer, HttpConfig(model_name=MODEL, max_model_len=oracle.max_model_len))
        with serving(app, "test-uvicorn-pool") as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60.0)
            yield base, pool, client, oracle, tokenizer


def stats(pool):
    return asyncio.run(asyncio.wait_for(pool.stats(), 60))["total"]


def with_tokens(chunks):
    return [ch for c in chunks for ch in c.choices if getattr(ch, "token_ids", None)]


def test_streams_through_the_pool_come_in_increments_and_equal_the_engine(pooled):
    _, _, client, oracle, tokenizer = pooled
    (want,) = oracle.generate([IDS], SamplingParams(temperature=0.0, max_tokens=16))
    chunks = list(client.completions.create(model=MODEL, prompt=IDS, max_tokens=16, temperature=0.0, stream=True,
                                            extra_body={"return_token_ids": True}))
    pieces = with_tokens(chunks)
    assert [t for ch in pieces for t in ch.token_ids] == want.token_ids
    assert len(pieces) >= 8, "the worker's tokens came in one piece, not as they were generated"
    assert "".join(ch.text for c in chunks for ch in c.choices) == \
        tokenizer.decode(want.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    # n > 1 streams too (not recorded), each sample by its index, equal to the engine's seeded samples
    params = SamplingParams(temperature=0.8, max_tokens=6, n=2, seed=3)
    wants = oracle.generate([IDS], params)
    chunks = list(client.completions.create(model=MODEL, prompt=IDS, max_tokens=6, temperature=0.8, n=2, seed=3,
                                            stream=True, extra_body={"return_token_ids": True}))
    for w in wants:
        assert [t for ch in with_tokens(chunks) if ch.index == w.sample_index for t in ch.token_ids] == w.token_ids


def test_a_streamed_chat_continues_its_session_on_the_worker(pooled):
    _, pool, client, oracle, tokenizer = pooled
    messages = [{"role": "user", "content": "Hello there, pool"}]
    s = oracle.open_session()
    context: list[int] = []
    sid = None
    for turn, max_tokens in enumerate([6, 5]):
        if turn == 0:
            new_ids = chat_prompt_ids(tokenizer, messages)
        else:
            new = [{"role": "user", "content": "And then?"}]
            new_ids = delta_ids(tokenizer, messages, new, context)
            messages = messages + new
        want = oracle.run_turn(s, new_ids, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        before = stats(pool)["prefill_tokens"]
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0.0, stream=True,
                                                     max_completion_tokens=max_tokens,
                                                     extra_body={"return_token_ids": True}))
        prefilled = stats(pool)["prefill_tokens"] - before
        assert chunks[0].prompt_token_ids == context + new_ids
        assert [t for ch in with_tokens(chunks) for t in ch.token_ids] == want.token_ids
        assert len(with_tokens(chunks)) > 1
        sids = {c.model_extra.get("session_id") for c in chunks}
        assert len(sids) == 1 and None not in sids and sid in (None, *sids)
        sid = sids.pop()
        assert prefilled == want.num_prefill_tokens
        if turn:
            assert prefilled <= len(new_ids) + 1             # the session's KV stayed on the worker
        context += new_ids + want.token_ids
        messages = messages + [{"role": "assistant",
                                "content": "".join(ch.delta.content or "" for c in chunks for ch in c.choices)}]
    total = stats(pool)
    assert total["resident_turns"] >= 1


def test_a_client_gone_mid_stream_aborts_the_request_on_the_worker(pooled):
    base, pool, client, _, _ = pooled
    before = stats(pool)
    conn, resp = open_stream(base, "/v1/completions", {"model": MODEL, "prompt": IDS, "max_tokens": 900,
                                                       "temperature": 0, "stream": True})
    assert resp.status == 200
    events = sse_events(resp)
    assert all(e["choices"][0]["finish_reason"] is None for e in (next(events), next(events), next(events)))
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 30
    while True:   # bounded: the cancel travels pool loop -> Ray -> the worker's generator -> its engine loop
        s = stats(pool)
        if (s["aborted_requests"] > before["aborted_requests"] and s["pending_requests"] == 0
                and s["open_sessions"] == before["open_sessions"]):
            break
        assert time.monotonic() < deadline, f"the request was not aborted on the worker: {s}"
        time.sleep(0.05)
    assert s["num_held_blocks"] == before["num_held_blocks"] and s["decode_tokens"] - before["decode_tokens"] < 900
    r = client.completions.create(model=MODEL, prompt=IDS, max_tokens=3, temperature=0.0)   # and serves on
    assert r.choices[0].finish_reason in ("length", "stop")
