"""``stream: true`` through the official ``openai`` client on loopback, over the real incremental path
(``LocalBackend.generate_stream``): streamed greedy output equals the non-streamed output and the engine's own
``generate`` token for token; n > 1 and batches by index; logprobs, usage, stop strings (never streamed past),
stop token ids, versions and token ids per chunk; a client that disconnects aborts its request (KV freed).
The tiny random llama with SmolLM2's tokenizer of tests/rollout/test_http_server.py."""
from __future__ import annotations

import time

import openai
import pytest

from engine import LLMEngine, SamplingParams
from engine.smollm2 import chat_prompt_ids
from rollout.http_server import HttpConfig, create_app
from rollout.local import LocalBackend
from tests.rollout.http_helpers import open_stream, serving, sse_events
from tests.rollout.test_http_server import KEY, MODEL, engine_config, http, model_dir  # noqa: F401 - fixture

IDS = [17, 400, 1234, 99, 5000]
HI = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def oracle(model_dir, one_torch_thread):  # noqa: F811
    return LLMEngine(engine_config(model_dir))


@pytest.fixture(scope="module")
def served(model_dir, one_torch_thread):  # noqa: F811
    backend = LocalBackend(engine_config(model_dir))
    tokenizer = backend.loop.tokenizer()
    app = create_app(backend, tokenizer, HttpConfig(model_name=MODEL, max_model_len=backend.loop.engine.max_model_len,
                                                    api_key=KEY))
    with serving(app, "test-uvicorn-stream") as base:
        yield base, backend, tokenizer
    backend.loop.shutdown()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key=KEY, max_retries=0, timeout=60.0)


def test_chat_stream_equals_the_non_streamed_answer_and_the_engine(client, oracle, served):
    tokenizer = served[2]
    kw = {"model": MODEL, "messages": HI, "max_completion_tokens": 24, "temperature": 0.0,
              "extra_body": {"return_token_ids": True}}
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    ids = chat_prompt_ids(tokenizer, HI)
    (want,) = oracle.generate([ids], SamplingParams(temperature=0.0, max_tokens=24))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].prompt_token_ids == ids == whole.prompt_token_ids
    assert [c.id for c in chunks] == [chunks[0].id] * len(chunks)
    streamed = [tok for c in chunks for ch in c.choices for tok in (getattr(ch, "token_ids", None) or [])]
    assert streamed == want.token_ids == whole.choices[0].token_ids
    versions = [v for c in chunks for ch in c.choices for v in (getattr(ch, "versions", None) or [])]
    assert versions == want.versions == whole.choices[0].versions
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.finish_reason for c in chunks for ch in c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason == want.finish_reason and not any(finishes[:-1])
    # real increments: the tokens came in many chunks, not in one at the end
    assert sum(bool(getattr(ch, "token_ids", None)) for c in chunks for ch in c.choices) >= 12


def test_completion_stream_batch_n_logprobs_and_usage(client):
    kw = {"model": MODEL, "prompt": [IDS, [5, 6, 7, 8]], "n": 2, "max_tokens": 10, "temperature": 0.9, "seed": 7, "logprobs": 2,
              "extra_body": {"return_token_ids": True}}
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    # cached_tokens may differ: the second run finds the first one's blocks in the prefix cache
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump(exclude={"prompt_tokens_details"}) == \
        whole.usage.model_dump(exclude={"prompt_tokens_details"})
    assert 0 <= chunks[-1].usage.prompt_tokens_details.cached_tokens <= whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1]) and {c.object for c in chunks} == {"text_completion"}
    body = [c for c in chunks if c.choices]
    for want in whole.choices:
        mine = [ch for c in body for ch in c.choices if ch.index == want.index]
        assert [t for ch in mine for t in ch.token_ids] == want.token_ids
        assert "".join(ch.text for ch in mine) == want.text
        assert mine[0].prompt_token_ids == want.prompt_token_ids
        assert [lp for ch in mine for lp in ch.logprobs.token_logprobs] == pytest.approx(want.logprobs.token_logprobs)
        assert [t for ch in mine for t in ch.logprobs.tokens] == want.logprobs.tokens
        assert [o for ch in mine for o in ch.logprobs.text_offset] == want.logprobs.text_offset
        assert [ch.finish_reason for ch in mine][-1] == want.finish_reason
        assert not any(ch.finish_reason for ch in mine[:-1])
    assert sorted({ch.index for c in body for ch in c.choices}) == [0, 1, 2, 3]


def test_stop_strings_are_never_streamed_past(client, oracle, served):
    tokenizer = served[2]
    (full,) = oracle.generate([IDS], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    text = tokenizer.decode(full.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), f"pick another prompt: no usable stop string in {text!r}"
    (want,) = oracle.generate([IDS], SamplingParams(temperature=0.0, max_tokens=16, stop=[stop]))
    kw = {"model": MODEL, "prompt": IDS, "max_tokens": 16, "temperature": 0.0, "stop": [stop],
              "extra_body": {"return_token_ids": True}}
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    pieces = [ch.text for c in chunks for ch in c.choices]
    sent = ""
    for piece in pieces:   # at no point did the client hold text running into the stop string
        sent += piece
        assert stop not in sent
    assert sent == whole.choices[0].text == want.text
    assert [t for c in chunks for ch in c.choices for t in ch.token_ids] == want.token_ids
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_token_ids_streamed_and_not(client, oracle):
    (full,) = oracle.generate([IDS], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    stop_id = full.token_ids[5]
    (want,) = oracle.generate([IDS], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_id]))
    assert want.finish_reason == "stop" and want.token_ids[-1] == stop_id
    kw = {"model": MODEL, "prompt": IDS, "max_tokens": 12, "temperature": 0.0,
              "extra_body": {"return_token_ids": True, "stop_token_ids": [stop_id]}}
    whole = client.completions.create(**kw)
    assert whole.choices[0].token_ids == want.token_ids and whole.choices[0].finish_reason == "stop"
    assert whole.choices[0].versions == want.versions
    chunks = list(client.completions.create(stream=True, **kw))
    assert [t for c in chunks for ch in c.choices for t in ch.token_ids] == want.token_ids


def test_chat_stream_logprobs_equal_the_non_streamed_ones(client):
    kw = {"model": MODEL, "messages": HI, "max_tokens": 8, "temperature": 0.0, "logprobs": True, "top_logprobs": 2}
    whole = client.chat.completions.create(**kw).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole])
    assert [[t.token for t in e.top_logprobs] for e in streamed] == [[t.token for t in e.top_logprobs] for e in whole]


def wait_until_idle(backend, before):
    deadline = time.monotonic() + 10
    while True:   # bounded: the abort (and the close of the stream's session) are commands the engine loop runs
        s = backend.loop.stats().result(10)   # after the disconnect is seen
        if (s["aborted_requests"] > before["aborted_requests"] and s["pending_requests"] == 0
                and s["open_sessions"] == before["open_sessions"]):
            return s
        assert time.monotonic() < deadline, f"the request was not aborted: {s}"
        time.sleep(0.005)


def test_a_client_that_disconnects_aborts_its_request(served):
    base, backend, _ = served
    before = backend.loop.stats().result(10)
    conn, resp = open_stream(base, "/v1/completions", {"model": MODEL, "prompt": IDS, "max_tokens": 900,
                                                       "temperature": 0, "stream": True}, KEY)
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = sse_events(resp)
    got = [next(events) for _ in range(3)]
    assert all(isinstance(e, dict) and e["choices"][0]["finish_reason"] is None for e in got)
    conn.sock.close()      # gone mid-stream, without reading on
    conn.close()
    s = wait_until_idle(backend, before)   # the cut turn was not recorded: its session was closed
    # every block the stream took is back (earlier chats of this module are recorded conversations whose engine
    # sessions keep their KV: those blocks were held before the stream and still are)
    assert s["num_running"] == 0 and s["num_held_blocks"] == before["num_held_blocks"]
    assert s["decode_tokens"] - before["decode_tokens"] < 900
    # the slot is given back and the server streams the next request to its end
    assert list(sse_events(open_stream(base, "/v1/completions", {"model": MODEL, "prompt": IDS, "max_tokens": 3,
                                                                 "stream": True}, KEY)[1]))[-1] == "[DONE]"
    metrics = http(f"{base}/metrics", key=KEY).text   # the stream's slot is free, the KV gauges read the engine
    held = backend.loop.stats().result(10)
    assert "\nrollout_http_requests_in_flight 0\n" in metrics
    assert f'\nrollout_kv_cache_blocks{{state="held"}} {held["num_held_blocks"]}\n' in metrics
    assert f'\nrollout_kv_cache_blocks{{state="total"}} {s["num_total_blocks"]}\n' in metrics


def test_errors_before_the_stream_are_http_errors(client, served):
    with pytest.raises(openai.BadRequestError, match="vocabulary|vocab"):
        list(client.completions.create(model=MODEL, prompt=[10 ** 6], max_tokens=3, stream=True))
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        client.completions.create(model=MODEL, prompt=IDS, max_tokens=3, stream_options={"include_usage": True})
    with pytest.raises(openai.BadRequestError, match="include_usge"):
        client.completions.create(model=MODEL, prompt=IDS, max_tokens=3, stream=True,
                                  stream_options={"include_usge": True})
    assert list(client.completions.create(model=MODEL, prompt=IDS, max_tokens=2, stream=True))[-1].choices
