"""The HTTP front end under load and observed: 429 at its in-flight limit (held deterministically by an explicit
gate in the backend, never by timing) and serving again after; ``GET /metrics`` in Prometheus' text format, behind
the API key, counting requests by endpoint and status and the tokens of the answered completions."""
from __future__ import annotations

import asyncio
import re
import shutil
import threading

import openai
import pytest

from rollout.http_server import HttpConfig, create_app
from tests.rollout.http_helpers import serving
from tests.rollout.stub_backend import StubBackend
from tests.rollout.test_http_server import assert_openai_error, http, post

MODEL = "held"
KEY = "limits-key-0123456789"
LIMIT = 2
# name{labels} value, or # HELP / # TYPE lines (the text exposition format, version 0.0.4)
SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"'
                    r'(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*\})? (-?[0-9.e+-]+|NaN|[+-]Inf)$')


class HeldBackend(StubBackend):
    """The stub, remembering the server's loop and signalling (a threading.Event) once ``expect`` requests are
    at work (``generate``, or a session turn: an n = 1 completion is recorded as a conversation); ``hold()`` /
    ``release()`` (the stub's gate) keep them there."""

    def __init__(self) -> None:
        super().__init__()
        self.server_loop: asyncio.AbstractEventLoop | None = None
        self.expect = 0
        self.entered = 0
        self.all_entered = threading.Event()

    async def _work(self, request_id: str, context: list[int]) -> None:
        self.server_loop = asyncio.get_running_loop()
        self.entered += 1
        if self.entered >= self.expect:
            self.all_entered.set()
        return await super()._work(request_id, context)


class NoStreaming:
    """A backend without ``generate_stream`` (a streaming capability is optional for a RolloutBackend)."""

    def __init__(self) -> None:
        self._stub = StubBackend()

    def __getattr__(self, name):
        if name == "generate_stream":
            raise AttributeError(name)
        return getattr(self._stub, name)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, smollm2_dir):
    from transformers import AutoTokenizer
    path = tmp_path_factory.mktemp("limits_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_dir / name, path / name)
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def served(tokenizer):
    backend = HeldBackend()
    app = create_app(backend, tokenizer, HttpConfig(model_name=MODEL, max_model_len=4096, api_key=KEY,
                                                    max_in_flight=LIMIT))
    with serving(app, "test-uvicorn-limits") as base:
        yield base, backend


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key=KEY, max_retries=0, timeout=30.0)


def scrape(base: str) -> dict[str, float]:
    """/metrics parsed strictly: every line a HELP/TYPE comment or a well-formed sample; -> sample -> value."""
    reply = http(f"{base}/metrics", key=KEY)
    assert reply.status_code == 200
    samples = {}
    for line in reply.text.splitlines():
        if line.startswith("# "):
            assert re.match(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+$", line), line
            continue
        assert SAMPLE.match(line), f"not a Prometheus sample line: {line!r}"
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return samples


def completion(client, **kw):
    return client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=4, **kw)


def test_the_in_flight_limit_answers_429_and_the_server_keeps_serving(client, served):
    base, backend = served
    backend.hold()
    backend.expect, backend.entered = LIMIT, 0
    backend.all_entered.clear()
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(completion(client))) for _ in range(LIMIT)]
    for t in threads:
        t.start()
    try:
        assert backend.all_entered.wait(30), "the held requests never reached the backend"
        with pytest.raises(openai.RateLimitError) as info:
            completion(client)
        assert info.value.status_code == 429
        err = assert_openai_error(post(base, "/v1/chat/completions", {"model": MODEL, "messages": []}, key=KEY),
                                  429)   # refused before the body is even read
        assert err["code"] == "rate_limit_exceeded" and "max_in_flight" in err["message"]
        assert info.value.response.headers["retry-after"] == "1"
        assert scrape(base)["rollout_http_requests_in_flight"] == LIMIT
        # streams count too
        with pytest.raises(openai.RateLimitError):
            list(completion(client, stream=True))
    finally:
        backend.server_loop.call_soon_threadsafe(backend.release)
        for t in threads:
            t.join(30)
    backend.gate = None
    assert len(answers) == LIMIT and all(a.choices[0].finish_reason == "length" for a in answers)
    m = scrape(base)
    assert m["rollout_http_requests_in_flight"] == 0
    assert m['rollout_http_requests_total{endpoint="/v1/completions",status="429"}'] >= 2
    assert completion(client).usage.completion_tokens == 4


def test_metrics_count_requests_by_status_and_tokens(client, served):
    base, _ = served
    before = scrape(base)
    done = [completion(client), completion(client, n=2)]
    streamed = list(completion(client, stream=True, stream_options={"include_usage": True}))
    assert_openai_error(post(base, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "3"}, key=KEY),
                        400)
    assert http(f"{base}/v1/nowhere/{'x' * 50}", key=KEY).status_code == 404
    after = scrape(base)

    def grew(name):
        return after.get(name, 0) - before.get(name, 0)
    assert grew('rollout_http_requests_total{endpoint="/v1/completions",status="200"}') == 3
    assert grew('rollout_http_requests_total{endpoint="/v1/completions",status="400"}') == 1
    assert grew('rollout_http_requests_total{endpoint="other",status="404"}') == 1   # no label per random path
    usages = [d.usage for d in done] + [streamed[-1].usage]
    assert grew("rollout_http_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert grew("rollout_http_generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert grew('rollout_http_request_duration_seconds_count{endpoint="/v1/completions"}') == 4
    assert after['rollout_http_request_duration_seconds_bucket{endpoint="/v1/completions",le="+Inf"}'] == \
        after['rollout_http_request_duration_seconds_count{endpoint="/v1/completions"}']
    assert after["rollout_http_max_in_flight"] == LIMIT


def test_metrics_need_the_key(served):
    assert_openai_error(http(f"{served[0]}/metrics"), 401)
    assert_openai_error(http(f"{served[0]}/metrics", key="wrong"), 401)


def test_a_backend_without_streaming_refuses_stream_clearly(tokenizer):
    app = create_app(NoStreaming(), tokenizer, HttpConfig(model_name=MODEL, max_model_len=4096))
    with serving(app, "test-uvicorn-nostream") as base:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30.0)
        with pytest.raises(openai.BadRequestError, match="streams tokens"):
            c.completions.create(model=MODEL, prompt=[1, 2], max_tokens=2, stream=True)
        assert c.completions.create(model=MODEL, prompt=[1, 2], max_tokens=2).choices[0].finish_reason == "length"
