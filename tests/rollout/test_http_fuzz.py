"""Fuzzing the HTTP front end on loopback: a few hundred seeded random and malformed requests (random bytes, broken
JSON, wrong types, huge and negative values, unknown and missing fields, deep nesting, bad auth, random routes,
streams) against a live server over a tiny real engine. Every reply must be a well-formed OpenAI error with a
4xx status, or a valid completion (streamed: a valid event stream); never a 500. Afterwards the server answers a
good request and the engine holds nothing (no leaked request or KV block)."""
from __future__ import annotations

import http.client
import json
import random
import time

import openai
import pytest

from engine import EngineConfig
from rollout.http_server import HttpConfig, create_app
from rollout.local import LocalBackend
from tests.rollout.http_helpers import serving
from tests.rollout.test_http_server import model_dir  # noqa: F401 - fixture

SEED = 16
NUM_REQUESTS = 300
MODEL = "fuzz"
KEY = "fuzz-key-0123456789"
CONTEXT = 48                         # short: no valid request can generate for long
ERROR_STATUSES = {400, 401, 404, 405, 413}
INTERESTING = [-(2 ** 63) - 1, -1, 0, 1, 2, 3, 20, 21, 64, 65, 2 ** 31, 2 ** 63, 10 ** 30, 0.5, -0.0, 1e308,
               True, False, None, "", "1", "x" * 300, [], [1], [[1]], {}, {"a": 1}, [0] * 40]
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed",
          "stop", "stream", "stream_options", "logprobs", "top_logprobs", "return_token_ids", "stop_token_ids",
          "tools", "tool_choice", "user", "echo", "frequency_penalty", "best_of", "bogus_field"]


@pytest.fixture(scope="module")
def served(model_dir, one_torch_thread):  # noqa: F811
    backend = LocalBackend(EngineConfig(model=str(model_dir), block_size=4, num_kv_blocks=256, max_num_seqs=8,
                                        max_model_len=CONTEXT))
    app = create_app(backend, backend.loop.tokenizer(), HttpConfig(model_name=MODEL, max_model_len=CONTEXT,
                                                                   api_key=KEY))
    with serving(app, "test-uvicorn-fuzz") as base:
        yield base, backend, app.state.front
    backend.loop.shutdown()


def good_completion(rng):
    prompt = rng.choice([[rng.randrange(3, 49152) for _ in range(rng.randrange(1, 6))], "Hello there", ["a", "b"]])
    return {"model": MODEL, "prompt": prompt, "max_tokens": rng.randrange(1, 6), "temperature": rng.choice([0, 0.7])}


def good_chat(rng):
    return {"model": MODEL, "messages": [{"role": "user", "content": rng.choice(["hi", "2+2?", ""])}],
            "max_tokens": rng.randrange(1, 6)}


def random_value(rng, depth=0):
    if depth < 2 and rng.random() < 0.2:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    if depth < 2 and rng.random() < 0.1:
        return {rng.choice(FIELDS): random_value(rng, depth + 1)}
    return rng.choice(INTERESTING)


def mutate(rng, body):
    for _ in range(rng.randrange(1, 4)):
        roll = rng.random()
        if roll < 0.6:
            body[rng.choice(FIELDS)] = random_value(rng)
        elif roll < 0.8 and body:
            del body[rng.choice(sorted(body))]
        elif "messages" in body:
            body["messages"] = [{"role": rng.choice(["user", "system", "assistant", "tool", "robot"]),
                                 "content": random_value(rng)}]
        else:
            body["prompt"] = random_value(rng)
    return body


def nested(depth):
    return "[" * depth + "]" * depth


def make_request(rng):
    """-> (method, path, headers, body bytes, stream?)."""
    path = rng.choice(["/v1/completions", "/v1/chat/completions"])
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    kind = rng.random()
    body = (good_chat if path.endswith("chat/completions") else good_completion)(rng)
    if rng.random() < 0.3:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": rng.choice([True, False])}
    if kind < 0.08:
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
    elif kind < 0.16:
        text = json.dumps(body)
        raw = text[:rng.randrange(0, len(text))].encode()
    elif kind < 0.22:
        raw = json.dumps(rng.choice([[1, 2], 5, "prompt", None, True])).encode()
    elif kind < 0.26:
        raw = ('{"model": "fuzz", "prompt": ' + nested(rng.choice([50, 500, 5000])) + "}").encode()
    elif kind < 0.30:
        raw = json.dumps(dict(body, max_tokens=float("nan"))).encode()    # NaN: not JSON
    elif kind < 0.38:
        headers["Authorization"] = rng.choice(["", "Bearer", "Bearer wrong", "Basic " + KEY, KEY, "Bearer  " + "x" * 500])
        raw = json.dumps(body).encode()
    elif kind < 0.43:
        path = rng.choice(["/v1/nothing", "/", "/v1", "/v1/models/fuzz", "/metrics", "/health", "/v1/models"])
        raw = json.dumps(body).encode()
    elif kind < 0.55:
        raw = json.dumps(body).encode()                                     # valid
    else:
        raw = json.dumps(mutate(rng, body)).encode()
    method = "GET" if path in ("/metrics", "/health", "/v1/models") and rng.random() < 0.5 else "POST"
    return method, path, headers, raw, bool(isinstance(body, dict) and body.get("stream") is True)


def check_error(status, data, where):
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"}, where
    assert isinstance(err["message"], str) and err["message"], where
    assert err["type"] == "invalid_request_error", where
    assert err["param"] is None or isinstance(err["param"], str), where


def check_completion(body, where):
    assert body["object"] in ("text_completion", "chat.completion"), where
    assert body["choices"] and all(c["finish_reason"] in ("stop", "length", "tool_calls") for c in body["choices"])
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] >= 1, where


def check_stream(data, where):
    events = [line[len("data: "):] for line in data.decode().split("\n") if line.startswith("data: ")]
    assert events, where
    if events[-1] != "[DONE]":
        assert "error" in json.loads(events[-1]), where   # an error event ends a failed stream
        return
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all(c["object"] in ("text_completion", "chat.completion.chunk") for c in chunks), where
    finished = {ch["index"] for c in chunks for ch in c["choices"] if ch["finish_reason"]}
    started = {ch["index"] for c in chunks for ch in c["choices"]}
    assert finished == started, where


def test_random_and_malformed_requests_never_break_the_server(served):
    base, backend, front = served
    host, port = base.removeprefix("http://").split(":")
    rng = random.Random(SEED)
    statuses = {}
    start = time.monotonic()
    for i in range(NUM_REQUESTS):
        method, path, headers, raw, stream = make_request(rng)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request(method, path, raw if method == "POST" else None, headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        where = f"request {i}: {method} {path} {raw[:300]!r} -> {resp.status} {data[:300]!r}"
        statuses[resp.status] = statuses.get(resp.status, 0) + 1
        assert resp.status == 200 or resp.status in ERROR_STATUSES, where
        if resp.status != 200:
            check_error(resp.status, data, where)
        elif resp.getheader("content-type", "").startswith("text/event-stream"):
            assert stream, where
            check_stream(data, where)
        elif path in ("/v1/completions", "/v1/chat/completions"):
            check_completion(json.loads(data), where)
    assert time.monotonic() - start < 60, "the fuzz run is meant to be fast"
    # the mix really exercised both sides
    assert statuses.get(200, 0) >= 30 and statuses.get(400, 0) >= 100 and statuses.get(401, 0) >= 10, statuses
    c = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=30)
    r = c.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3, temperature=0.0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens == 3
    deadline = time.monotonic() + 10
    while True:   # bounded: a stream's abort may still be a queued command of the engine loop
        s = backend.loop.stats().result(10)
        if s["pending_requests"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0:
            break
        assert time.monotonic() < deadline, f"requests left behind: {s}"
        time.sleep(0.005)
    # the only KV still held is that of the chat conversations the server recorded (token-exact sessions): no
    # other engine session is open, and closing theirs frees every block
    recorded = [c.engine_session for c in front.sessions._conversations.values() if c.engine_session is not None]
    assert s["open_sessions"] == len(recorded) and s["preemptions"] == 0
    for sid in recorded:
        backend.loop.close_session(sid).result(10)
    assert backend.loop.stats().result(10)["num_held_blocks"] == 0
