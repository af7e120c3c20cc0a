"""The OpenAI-compatible HTTP front end driven by the official ``openai`` client on loopback: completions (text,
token ids, batches), chat, n > 1, logprobs, stop strings, ``return_token_ids``; greedy outputs against the
engine's own ``generate`` on the same token ids (the oracle); OpenAI-style errors with their status codes, and
the server still serving after them. A tiny random llama with SmolLM2's real tokenizer and chat template."""
from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import openai   # the test extra's: a missing client fails the suite rather than skipping it
import pytest
import uvicorn

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.smollm2 import chat_prompt_ids
from engine.tiny_models import make_tiny_model
from rollout.http_server import HttpConfig, create_app
from rollout.local import LocalBackend

VOCAB = dict(vocab_size=49152, bos_token_id=1, eos_token_id=2)   # SmolLM2's: <|im_start|>, <|im_end|>
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
MODEL = "tiny-llama"
KEY = "test-key-0123456789"
STARTUP_DEADLINE_S = 30.0


def engine_config(path) -> EngineConfig:
    return EngineConfig(model=str(path), block_size=4, num_kv_blocks=512, max_num_seqs=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm2_dir):
    path = make_tiny_model("llama", tmp_path_factory.mktemp("http_llama"), seed=5, hidden_size=32,
                           intermediate_size=64, head_dim=8, num_hidden_layers=1, **VOCAB)
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def oracle(model_dir, one_torch_thread):
    """A second engine on the same weights, driven directly (never through HTTP)."""
    return LLMEngine(engine_config(model_dir))


@pytest.fixture(scope="module")
def server(model_dir, one_torch_thread):
    """uvicorn on 127.0.0.1, an ephemeral port, in a background thread; yields its base URL once /health answers."""
    backend = LocalBackend(engine_config(model_dir))
    config = HttpConfig(model_name=MODEL, max_model_len=backend.loop.engine.max_model_len, api_key=KEY)
    app = create_app(backend, backend.loop.tokenizer(), config)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    base = None
    while time.monotonic() < deadline and thread.is_alive():
        if srv.started:
            port = srv.servers[0].sockets[0].getsockname()[1]
            base = f"http://127.0.0.1:{port}"
            try:
                if http(f"{base}/health", timeout=2.0).status_code == 200:
                    break
            except OSError:
                pass
        time.sleep(0.02)
    else:
        srv.should_exit = True
        raise RuntimeError("the HTTP server did not come up before its deadline")
    yield base
    srv.should_exit = True
    thread.join(10.0)
    backend.loop.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60.0)


@pytest.fixture(scope="module")
def tokenizer(server, model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))


def greedy(oracle, ids, **kw):
    params = SamplingParams(temperature=0.0, **kw)
    return oracle.generate([ids], params)


@dataclass
class Reply:
    status_code: int
    text: str

    def json(self):
        return json.loads(self.text)


def http(url, data=None, key=None, timeout=60.0) -> Reply:
    """A plain HTTP request (stdlib): bodies the official client would never send."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Reply(resp.status, resp.read().decode())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.read().decode())


def post(server, path, body, key=KEY, raw=None) -> Reply:
    return http(f"{server}{path}", raw if raw is not None else json.dumps(body).encode(), key)


# ---------------------------------------------------------------------------------------------- happy paths
def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http(f"{server}/health").json()["ok"] is True


def test_completion_with_token_ids_equals_the_engine(client, oracle):
    ids = [17, 400, 1234, 99, 5000]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0.0,
                                  extra_body={"return_token_ids": True})
    (want,) = greedy(oracle, ids, max_tokens=12)
    choice = r.choices[0]
    assert choice.token_ids == want.token_ids
    assert choice.prompt_token_ids == ids and r.prompt_token_ids == ids
    assert choice.finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == 5 + len(want.token_ids)


def test_completion_with_text_and_a_batch(client, oracle, tokenizer):
    texts = ["The capital of France is", "1, 2, 3,"]
    r = client.completions.create(model=MODEL, prompt=texts, max_tokens=8, temperature=0.0,
                                  extra_body={"return_token_ids": True})
    assert [c.index for c in r.choices] == [0, 1]
    for text, choice in zip(texts, r.choices):
        ids = tokenizer.encode(text)
        (want,) = greedy(oracle, ids, max_tokens=8)
        assert choice.prompt_token_ids == ids and choice.token_ids == want.token_ids
        assert choice.text == tokenizer.decode(want.token_ids, skip_special_tokens=True,
                                               clean_up_tokenization_spaces=False)
    assert r.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in texts)


def test_chat_equals_the_engine_on_the_template_tokens(client, oracle, tokenizer):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."}, {"role": "tool", "content": "42"},
                {"role": "user", "content": [{"type": "text", "text": "And now?"}]}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0.0,
                                       extra_body={"return_token_ids": True})
    rendered = [dict(m, content=m["content"] if isinstance(m["content"], str) else "And now?") for m in messages]
    ids = chat_prompt_ids(tokenizer, rendered)
    (want,) = greedy(oracle, ids, max_tokens=10)
    assert r.prompt_token_ids == ids and r.choices[0].token_ids == want.token_ids
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tokenizer.decode(want.token_ids, skip_special_tokens=True,
                                                            clean_up_tokenization_spaces=False)
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(ids)


def test_chat_with_tools_and_tool_calls_on_the_engine(client, oracle, tokenizer):
    """The real engine: tools given, an assistant tool_calls message (content null) and a tool result render
    through SmolLM2's template (which shows neither tools nor calls) and the answer equals the engine's."""
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "6*7?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_completion_tokens=6,
                                       temperature=0.0, extra_body={"return_token_ids": True})
    (want,) = greedy(oracle, r.prompt_token_ids, max_tokens=6)
    assert r.choices[0].token_ids == want.token_ids and r.choices[0].finish_reason == want.finish_reason
    assert "42" in tokenizer.decode(r.prompt_token_ids)


def test_n_samples_with_a_seed_are_reproducible(client):
    kw = dict(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=6, temperature=1.0, n=2, seed=11,
              extra_body={"return_token_ids": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]
    assert a.usage.completion_tokens == sum(len(c.token_ids) for c in a.choices)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2,
                                          max_tokens=4, temperature=1.0, seed=3)
    assert [c.index for c in chat.choices] == [0, 1]


def test_logprobs_equal_the_engine(client, oracle):
    ids = [300, 301, 302]
    (want,) = oracle.generate([ids], SamplingParams(temperature=0.0, max_tokens=5, logprobs=3))
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0.0, logprobs=3)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(want.logprobs, abs=1e-5)
    assert len(lp.tokens) == len(want.token_ids) and all(len(row) <= 3 for row in lp.top_logprobs)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0.0, logprobs=True, top_logprobs=2,
                                          extra_body={"return_token_ids": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == len(chat.choices[0].token_ids)
    assert all(len(t.top_logprobs) == 2 for t in content)
    # greedy: the sampled token is the most likely one
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5) for t in content)


def test_stop_strings_equal_the_engine(client, oracle, tokenizer):
    ids = [17, 400, 1234, 99, 5000]
    (full,) = greedy(oracle, ids, max_tokens=12, ignore_eos=True)
    text = tokenizer.decode(full.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), f"pick another prompt: no usable stop string in {text!r}"
    (want,) = greedy(oracle, ids, max_tokens=12, stop=[stop])
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0.0, stop=stop,
                                  extra_body={"return_token_ids": True})
    assert want.finish_reason == "stop" and r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == want.text and stop not in r.choices[0].text
    assert r.choices[0].token_ids == want.token_ids


def test_concurrent_requests_are_all_answered(server, oracle):
    prompts = [[10 + i, 20 + i, 30 + i] for i in range(6)]
    results: dict[int, dict] = {}

    def one(i):
        results[i] = post(server, "/v1/completions", {"model": MODEL, "prompt": prompts[i], "max_tokens": 6,
                                                      "temperature": 0, "return_token_ids": True}).json()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60.0)
    wants = oracle.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6))
    assert [results[i]["choices"][0]["token_ids"] for i in range(len(prompts))] == [w.token_ids for w in wants]


# ---------------------------------------------------------------------------------------------- errors
def assert_openai_error(resp, status):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"prompt"'])
def test_malformed_json_is_a_400(server, raw):
    assert_openai_error(post(server, "/v1/completions", None, raw=raw), 400)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x"}, "model"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 2.0}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": True}, "temperature"),
    ({"model": MODEL, "prompt": [1, "a"]}, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": MODEL, "prompt": "x", "stop": 5}, "stop"),
    ({"model": MODEL, "prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
])
def test_wrong_types_are_a_400_naming_the_field(server, body, param):
    assert assert_openai_error(post(server, "/v1/completions", body), 400)["param"] == param


def test_bad_values_the_engine_refuses_are_a_400(server):
    assert_openai_error(post(server, "/v1/completions", {"model": MODEL, "prompt": [VOCAB["vocab_size"]]}), 400)
    assert_openai_error(post(server, "/v1/completions", {"model": MODEL, "prompt": []}), 400)
    assert_openai_error(post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "stop": [""]}), 400)
    chat = {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}
    assert assert_openai_error(post(server, "/v1/chat/completions", chat), 400)["param"] == "messages"
    assert_openai_error(post(server, "/v1/chat/completions", {"model": MODEL, "messages": []}), 400)
    too_long = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 6}
    assert_openai_error(post(server, "/v1/chat/completions", too_long), 413)


def test_unknown_model_is_a_404(client, server):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"
    assert_openai_error(http(f"{server}/v1/nowhere", key=KEY), 404)


def test_bad_auth_is_a_401(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert_openai_error(post(server, "/v1/completions", {"model": MODEL, "prompt": "x"}, key=None), 401)
    assert_openai_error(post(server, "/v1/completions", {"model": MODEL, "prompt": "x"}, key="wrong"), 401)
    # auth comes before validation: a malformed body without the key is a 401, not a 400
    assert_openai_error(post(server, "/v1/completions", None, key=None, raw=b"{oops"), 401)


def test_the_server_keeps_serving_after_bad_requests(client, server, oracle):
    for raw in (b"{", b"\xff\xfe", json.dumps({"model": MODEL, "prompt": {"a": 1}}).encode()):
        assert post(server, "/v1/completions", None, raw=raw).status_code == 400
    r = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=4, temperature=0.0,
                                  extra_body={"return_token_ids": True})
    assert r.choices[0].token_ids == greedy(oracle, [1, 2, 3], max_tokens=4)[0].token_ids


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv, why", [
    (["--http", "0.0.0.0:8000"], "not loopback"),
    (["--http", "10.1.2.3:8000"], "not loopback"),
    (["--http", "127.0.0.1"], "HOST:PORT"),
    (["--http", "127.0.0.1:http"], "HOST:PORT"),
    (["--http", "127.0.0.1:8000", "--http-max-in-flight", "0"], "--http-max-in-flight"),
])
def test_cli_refuses_bad_http_flags_before_loading_a_model(capsys, argv, why):
    from rollout import cli
    assert cli.main(["serve", "--model", "/nonexistent", "--local", *argv]) == 2
    assert why in capsys.readouterr().err


def test_cli_serves_http_next_to_zeromq(model_dir, tmp_path):
    """``rollout serve --local --http``: both front ends come up, the key is required, SIGTERM stops it cleanly."""
    import os
    import re
    import signal
    import subprocess
    import sys

    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "rollout.cli", "--log-level", "WARNING", "serve",
                             "--model", str(model_dir), "--local", "--max-num-seqs", "4",
                             "--bind", "tcp://127.0.0.1:*", "--http", "127.0.0.1:0",
                             "--api-key-file", str(key_file), "--served-model-name", "cli-model",
                             "--http-max-in-flight", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = None
        deadline = time.monotonic() + 60.0
        lines = []
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"OpenAI-compatible HTTP on (\S+)", line)
            url = m.group(1) if m else None
        assert url, "".join(lines)
        c = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=30.0)
        assert [m.id for m in c.models.list().data] == ["cli-model"]
        r = c.completions.create(model="cli-model", prompt=[1, 2, 3], max_tokens=3, temperature=0.0)
        assert r.usage.prompt_tokens == 3 and r.choices[0].finish_reason in ("stop", "length")
        assert http(f"{url}/models", key="wrong").status_code == 401
        streamed = c.completions.create(model="cli-model", prompt=[1, 2, 3], max_tokens=3, temperature=0.0,
                                        stream=True)
        assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text
        metrics = http(f"{url.removesuffix('/v1')}/metrics", key=KEY)
        assert metrics.status_code == 200 and "\nrollout_http_max_in_flight 3\n" in metrics.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30.0) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10.0)
        proc.stdout.close()


def test_trajectory_carries_top_logprobs_only_when_asked():
    """The HTTP front end reads top logprobs from the backend's Trajectory; on the wire the field is optional."""
    import msgpack

    from rollout.trajectory import Trajectory
    plain = Trajectory(prompt_ids=[1], token_ids=[2], logprobs=[-0.5], loss_mask=[1], versions=[0])
    assert "top_logprobs" not in plain.to_dict()
    rich = Trajectory(prompt_ids=[1], token_ids=[2], logprobs=[-0.5], loss_mask=[1], versions=[0],
                      top_logprobs=[[(2, -0.5), (7, -1.5)]])
    back = Trajectory.from_dict(msgpack.unpackb(msgpack.packb(rich.to_dict())))
    assert [[tuple(p) for p in row] for row in back.top_logprobs] == [[(2, -0.5), (7, -1.5)]]
