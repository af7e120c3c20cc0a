"""Tool calls through the OpenAI-compatible HTTP front end: the Hermes/Qwen ``<tool_call>`` parser on its own,
then the server driven by the official ``openai`` client over a scripted backend (its output is a fixed text,
so a response carries a tool call deterministically) with SmolLM2's tokenizer and a small Qwen-style chat
template that renders ``tools``, assistant ``tool_calls`` and ``tool`` results (SmolLM2's own template ignores
tools: tested too)."""
from __future__ import annotations

import json
import shutil
import threading
import time

import openai
import pytest
import uvicorn

from engine.smollm2 import chat_prompt_ids
from engine.sampling import SamplingParams
from rollout.http_server import HttpConfig, create_app
from rollout.tool_calls import parse_tool_calls
from rollout.trajectory import Trajectory
from tests.rollout.stub_backend import StubBackend
from tests.rollout.test_http_server import assert_openai_error, http, post

MODEL = "scripted"
EOS = 2

# A Qwen2.5-style template (written for these tests): tools in the system turn, calls as <tool_call> blocks
# with the arguments written by tojson (so they must be a dict), tool results in <tool_response> blocks.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{%- endif %}"
    "# Tools\n<tools>{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    "Call a tool with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{%- if message.content %}{{ message.content }}{%- endif %}"
    "{%- for call in message.tool_calls or [] %}{%- set call = call.function %}\n<tool_call>\n"
    "{\"name\": \"{{ call.name }}\", \"arguments\": {{ call.arguments | tojson }}}\n</tool_call>"
    "{%- endfor %}<|im_end|>\n"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")

TOOLS = [{"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]}}}]
CALL_TEXT = ('Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n'
             '</tool_call>')


# ---------------------------------------------------------------------------------------------- the parser
def test_parse_one_call():
    p = parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')
    assert [(c.name, c.arguments) for c in p.tool_calls] == [("add", {"a": 1, "b": 2})]
    assert p.content is None


def test_parse_two_calls_with_text_and_newlines_around():
    text = ('I will add.\n<tool_call>\n  {"name": "add",\n "arguments": {"a": 1}}\n</tool_call>\n'
            '<tool_call>{"name": "mul", "arguments": {"x": [1, 2]}}</tool_call>\nDone.')
    p = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in p.tool_calls] == [("add", {"a": 1}), ("mul", {"x": [1, 2]})]
    assert p.content == "I will add.\n\n\nDone."


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "add", "arguments": {"a": 1}</tool_call>',          # malformed JSON
    '<tool_call>{"name": "add"} trailing</tool_call>',
    '<tool_call>["add"]</tool_call>',                                        # not an object
    '<tool_call>{"arguments": {}}</tool_call>',                              # no name
    '<tool_call>{"name": "add", "arguments": [1]}</tool_call>',              # arguments not an object
    'ok <tool_call>{"name": "a", "arguments": {}}</tool_call> <tool_call>{oops}</tool_call>',   # one bad of two
    '<tool_call>{"name": "add", "arguments": {"a": 1}}',                     # never closed (max_tokens)
])
def test_malformed_calls_leave_the_text_as_plain_content(text):
    p = parse_tool_calls(text)
    assert p.tool_calls == [] and p.content == text


@pytest.mark.parametrize("text", ["", "just an answer", "no <tool_call> here"])
def test_no_calls(text):
    assert parse_tool_calls(text).tool_calls == [] and parse_tool_calls(text).content == text


def test_arguments_sent_as_a_json_string_are_accepted():
    p = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"k\\": 3}"}</tool_call>')
    assert p.tool_calls[0].arguments == {"k": 3}


# ---------------------------------------------------------------------------------------------- templates
def test_smollm2_template_ignores_tools(smollm2_dir):
    """Why the server tests bring their own template: SmolLM2's renders no tools (the model's template decides)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    messages = [{"role": "user", "content": "What is 6*7?"}]
    assert chat_prompt_ids(tok, messages, TOOLS) == chat_prompt_ids(tok, messages)


# ---------------------------------------------------------------------------------------------- the server
class ScriptedBackend(StubBackend):
    """Every sample is ``script`` (token ids, then EOS); the prompts it was given are recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.script: list[int] = []
        self.prompts: list[list[int]] = []

    def _sample(self, context, params: SamplingParams, sample_index, request_id, prompt) -> Trajectory:
        self.prompts.append(list(prompt))
        tokens = (self.script + [EOS])[:params.max_tokens]
        t = Trajectory(prompt_ids=list(prompt), request_id=request_id, sample_index=sample_index, turns=1,
                       finish_reason="stop" if len(tokens) == len(self.script) + 1 else "length")
        t.add_model_tokens(tokens, [-0.5] * len(tokens), [self.version] * len(tokens))
        return t


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, smollm2_dir):
    from transformers import AutoTokenizer
    path = tmp_path_factory.mktemp("tool_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, path / name)
    (path / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    tok = AutoTokenizer.from_pretrained(str(path))
    assert "<tool_call>" in tok.apply_chat_template([{"role": "user", "content": "x"}], tools=TOOLS,
                                                    tokenize=False), "the test template was not loaded"
    return tok


@pytest.fixture(scope="module")
def served(tokenizer):
    backend = ScriptedBackend()
    app = create_app(backend, tokenizer, HttpConfig(model_name=MODEL, max_model_len=4096))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, name="test-uvicorn-tools", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30.0
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the HTTP server did not come up"
        time.sleep(0.02)
    base = f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    yield base, backend
    srv.should_exit = True
    thread.join(10.0)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused", max_retries=0, timeout=30.0)


def say(backend, tokenizer, text):
    backend.script = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(backend.script, skip_special_tokens=True) == text


USER = [{"role": "user", "content": "What is 6*7?"}]


def test_a_tool_call_is_parsed_and_typed_by_the_client(client, served, tokenizer):
    _, backend = served
    say(backend, tokenizer, CALL_TEXT)
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, temperature=0.0,
                                       extra_body={"return_token_ids": True})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": "6*7"}
    assert choice.message.content == "Let me compute."
    assert choice.token_ids == backend.script + [EOS]             # the exact tokens, whatever was parsed
    # the tools were rendered by the template into the prompt
    assert r.prompt_token_ids == chat_prompt_ids(tokenizer, USER, TOOLS)
    assert '"calculator"' in tokenizer.decode(r.prompt_token_ids)


def test_two_calls_and_no_content(client, served, tokenizer):
    _, backend = served
    say(backend, tokenizer, '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>\n'
                            '<tool_call>{"name": "calculator", "arguments": {"expression": "2+2"}}</tool_call>')
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="auto")
    msg = r.choices[0].message
    assert msg.content is None and r.choices[0].finish_reason == "tool_calls"
    assert [json.loads(c.function.arguments)["expression"] for c in msg.tool_calls] == ["1+1", "2+2"]
    assert len({c.id for c in msg.tool_calls}) == 2


def test_the_follow_up_renders_the_call_and_the_tool_result(client, served, tokenizer):
    _, backend = served
    say(backend, tokenizer, CALL_TEXT)
    first = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS)
    call = first.choices[0].message.tool_calls[0]
    say(backend, tokenizer, "It is 42.")
    messages = USER + [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": call.id, "type": "function",
                         "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "RESULT-42"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                       extra_body={"return_token_ids": True})
    assert r.choices[0].message.content == "It is 42." and r.choices[0].finish_reason == "stop"
    assert not r.choices[0].message.tool_calls
    prompt = tokenizer.decode(r.prompt_token_ids)
    assert "RESULT-42" in prompt
    # the earlier call is rendered with its arguments as JSON, as the model wrote it
    assert '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>' in prompt
    result_ids = tokenizer.encode("RESULT-42", add_special_tokens=False)
    assert any(r.prompt_token_ids[i:i + len(result_ids)] == result_ids for i in range(len(r.prompt_token_ids)))


def test_tool_choice_none_returns_plain_content_and_renders_no_tools(client, served, tokenizer):
    _, backend = served
    say(backend, tokenizer, CALL_TEXT)
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="none",
                                       extra_body={"return_token_ids": True})
    assert r.choices[0].message.content == CALL_TEXT and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    assert r.prompt_token_ids == chat_prompt_ids(tokenizer, USER)


def test_without_tools_nothing_is_parsed(client, served, tokenizer):
    _, backend = served
    say(backend, tokenizer, CALL_TEXT)
    r = client.chat.completions.create(model=MODEL, messages=USER)
    assert r.choices[0].message.content == CALL_TEXT and r.choices[0].finish_reason == "stop"


def test_a_malformed_call_is_plain_content(client, served, tokenizer):
    _, backend = served
    say(backend, tokenizer, '<tool_call>{"name": "calculator", "arguments": {oops}</tool_call>')
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS)
    assert r.choices[0].message.content == tokenizer.decode(backend.script) and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("text", [CALL_TEXT, "plain <tool_call>{not json}</tool_call> after", "no call at all"])
def test_streamed_tool_calls_arrive_parsed_at_the_end(client, served, tokenizer, text):
    _, backend = served
    say(backend, tokenizer, text)
    whole = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS).choices[0]
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, stream=True,
                                                 extra_body={"return_token_ids": True}))
    deltas = [c.choices[0] for c in chunks if c.choices]
    assert [t for d in deltas for t in (getattr(d, "token_ids", None) or [])] == backend.script + [EOS]
    content = "".join(d.delta.content or "" for d in deltas)
    calls = [call for d in deltas for call in (d.delta.tool_calls or [])]
    assert deltas[-1].finish_reason == whole.finish_reason and not any(d.finish_reason for d in deltas[:-1])
    if whole.message.tool_calls:
        # the text before the block streamed as it came, the call once parsed; stripped, the same content
        assert content.strip() == whole.message.content and content.startswith("Let me")
        assert [(c.index, c.function.name, c.function.arguments) for c in calls] == \
            [(0, w.function.name, w.function.arguments) for w in whole.message.tool_calls]
        assert calls[0].id.startswith("call_") and calls[0].type == "function"
        assert all("<tool_call>" not in (d.delta.content or "") for d in deltas)
    else:
        assert content == whole.message.content and not calls


def chat(**kw):
    return dict({"model": MODEL, "messages": USER}, **kw)


@pytest.mark.parametrize("body, param", [
    (chat(tools=[{"type": "retrieval", "function": {"name": "f"}}]), "tools"),
    (chat(tools=[{"type": "function", "function": {"name": ""}}]), "tools"),
    (chat(tools=[{"type": "function", "function": {"name": 5}}]), "tools"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "object"}}]), "tools"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "colour": "red"}}]), "tools"),
    (chat(tools={"type": "function"}), "tools"),
    (chat(tools=TOOLS, tool_choice="required"), "tool_choice"),
    (chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "calculator"}}), "tool_choice"),
    (chat(tool_choice="auto"), "tool_choice"),
    (chat(messages=[{"role": "user", "content": "x", "tool_calls": []}]), "messages"),
    (chat(messages=[{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "not json"}}]}]), "messages"),
    (chat(messages=[{"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}]), "messages"),
])
def test_bad_tools_input_is_a_400_and_the_server_keeps_serving(served, client, tokenizer, body, param):
    base, backend = served
    err = assert_openai_error(post(base, "/v1/chat/completions", body, key=None), 400)
    assert err["param"].split(".")[0] == param, err   # unknown fields are named by their path
    say(backend, tokenizer, "fine")
    assert client.chat.completions.create(model=MODEL, messages=USER).choices[0].message.content == "fine"


def test_tool_choice_not_supported_reads_clearly(client, served):
    with pytest.raises(openai.BadRequestError, match="not supported yet"):
        client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required")
    assert http(f"{served[0]}/health").status_code == 200
