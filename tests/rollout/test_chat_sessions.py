"""Token-exact chat sessions (rollout/chat_sessions.py, docs/openai.md "Sessions") through /v1/chat/completions
and the official ``openai`` client.

The oracle is the engine's own session API (``LLMEngine.open_session`` / ``run_turn``) on a second engine over
the same weights, fed token ids the test computes itself from the chat template; KV reuse is read from the
serving engine's ``prefill_tokens`` counter. Models: a scripted bigram (tests/rollout/scripted_model.py) that
answers every turn with a tool call, under a Qwen3-style template that strips earlier <think> blocks, and a
tiny random llama (context-dependent answers) under SmolLM2's own template."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import uvicorn

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.smollm2 import chat_prompt_ids
from engine.tiny_models import make_tiny_model
from rollout.http_server import HttpConfig, create_app
from rollout.local import LocalBackend
from tests.rollout.scripted_model import CALL_JSON, make_scripted_model
from tests.rollout.test_http_tools import TOOLS

MODEL = "tiny"
MAX_TOKENS = 40

# Qwen3's rule, in ChatML with its newlines: an assistant turn before the last user query loses its <think>
# block; tools in the system turn, calls as <tool_call> blocks, results as <tool_response> in a user turn.
THINK_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}{{- '<|im_start|>user\\n<tool_response>\\n' + m.content"
    " + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}"
    "{%- set content = m.content %}"
    "{%- if loop.index0 < ns.last_query and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + content }}"
    "{%- for call in m.tool_calls or [] %}{{- '<tool_call>\\n{\"name\": \"' + call.function.name"
    " + '\", \"arguments\": ' + (call.function.arguments | tojson) + '}\\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def engine_config(path) -> EngineConfig:
    return EngineConfig(model=str(path), block_size=4, num_kv_blocks=1024, max_num_seqs=8)


class Served:
    """uvicorn on an ephemeral loopback port in a thread, over a LocalBackend, plus the official client."""

    def __init__(self, model_dir: Path) -> None:
        self.backend = LocalBackend(engine_config(model_dir))
        self.tokenizer = self.backend.loop.tokenizer()
        self.app = create_app(self.backend, self.tokenizer,
                              HttpConfig(model_name=MODEL, max_model_len=self.backend.loop.engine.max_model_len))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn-sessions", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30.0
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the HTTP server did not come up"
            time.sleep(0.02)
        base = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        self.client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60.0)

    def prefill_tokens(self) -> int:
        return asyncio.run(self.backend.stats())["total"]["prefill_tokens"]

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10.0)
        self.backend.loop.shutdown()


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, smollm2_dir, one_torch_thread):
    model_dir, script = make_scripted_model(tmp_path_factory.mktemp("scripted"), smollm2_dir, THINK_TEMPLATE)
    served = Served(model_dir)
    yield served, LLMEngine(engine_config(model_dir)), script
    served.close()


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory, smollm2_dir, one_torch_thread):
    path = make_tiny_model("llama", tmp_path_factory.mktemp("sessions_llama"), seed=11, hidden_size=32,
                           intermediate_size=64, head_dim=8, num_hidden_layers=2, vocab_size=49152, bos_token_id=1,
                           eos_token_id=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_dir / name, path / name)
    served = Served(path)
    yield served, LLMEngine(engine_config(path))
    served.close()


def echo(message) -> dict:
    """The assistant message as a client sends it back."""
    m = {"role": "assistant", "content": message.content}
    if message.tool_calls:
        m["tool_calls"] = [{"id": c.id, "type": "function",
                            "function": {"name": c.function.name, "arguments": c.function.arguments}}
                           for c in message.tool_calls]
    return m


def render(tok, messages, tools, generation_prompt):
    kwargs = {"tools": tools} if tools else {}
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)


def strip_think(messages):
    """The messages as THINK_TEMPLATE shows earlier turns: what it renders then needs no rewriting."""
    return [dict(m, content=m["content"].split("</think>")[-1]) if m["role"] == "assistant" and m["content"]
            else m for m in messages]


def test_five_turn_tool_conversation_is_token_exact_and_reuses_the_kv(scripted):
    served, oracle, script = scripted
    tok = served.tokenizer
    messages = [{"role": "user", "content": "What is 6*7?"}]
    suffixes = [[{"role": "tool", "tool_call_id": None, "content": "42"}],
                [{"role": "user", "content": "Check it once more."}],
                [{"role": "tool", "tool_call_id": None, "content": "42 again"}],
                [{"role": "user", "content": "And a last time?"}]]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    oracle_session = oracle.open_session()
    context: list[int] = []
    session_id = None
    for turn in range(5):
        if turn == 0:
            new_ids = chat_prompt_ids(tok, messages, TOOLS)
        else:
            call_id = messages[-1]["tool_calls"][0]["id"]
            new = [dict(m, tool_call_id=call_id) if m["role"] == "tool" else m for m in suffixes[turn - 1]]
            # The oracle's delta: the new messages after the turns as the template shows them, with the "\n"
            # ChatML writes after the <|im_end|> the model sampled.
            before = render(tok, strip_think(messages), TOOLS, False)
            after = render(tok, strip_think(messages) + new, TOOLS, True)
            assert after.startswith(before)
            new_ids = tok.encode("\n" + after[len(before):], add_special_tokens=False)
            messages = messages + new
        extra = {"return_token_ids": True} if session_id is None or turn % 2 else {"return_token_ids": True,
                                                                                  "session_id": session_id}
        prefilled = served.prefill_tokens()
        r = served.client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0.0,
                                                  max_completion_tokens=MAX_TOKENS, extra_body=extra)
        prefilled = served.prefill_tokens() - prefilled
        expected = oracle.run_turn(oracle_session, new_ids, params)
        context += new_ids
        choice = r.choices[0]
        assert r.prompt_token_ids == context, f"turn {turn}: the prompt is not the exact continuation"
        assert choice.token_ids == expected.token_ids == script
        context += choice.token_ids
        # KV: only the new messages were computed (the engine may count the previous turn's last sampled token
        # too), as in the oracle's session; the whole context would be len(context) tokens.
        assert prefilled == expected.num_prefill_tokens and prefilled - len(new_ids) in (0, 1), turn
        assert r.usage.prompt_tokens_details.cached_tokens == len(context) - len(choice.token_ids) - prefilled
        assert session_id in (None, r.session_id)
        session_id = r.session_id
        assert choice.finish_reason == "tool_calls" and choice.message.content == "<think>ok</think>"
        assert json.loads(choice.message.tool_calls[0].function.arguments) == json.loads(CALL_JSON)["arguments"]
        messages = messages + [echo(choice.message)]
    assert oracle.session_tokens(oracle_session) == context
    # What exactness bought: every turn's <think> block is in the context, as the model wrote it, while a fresh
    # render of the same messages (what a stateless server would prefill) drops the earlier ones.
    think = tok.convert_tokens_to_ids("<think>")
    assert context.count(think) == 5
    assert chat_prompt_ids(tok, messages[:-1], TOOLS).count(think) < 5


def test_random_model_turns_continue_from_the_exact_tokens(random_llama):
    """Context-dependent answers (a random model), cut by max_tokens or ended by EOS: each turn equals the
    oracle session's on token ids the test derives from SmolLM2's template."""
    served, oracle = random_llama
    tok = served.tokenizer
    messages = [{"role": "user", "content": "Hello there"}]
    oracle_session = oracle.open_session()
    context: list[int] = []
    for turn, max_tokens in enumerate([6, 1, 9]):
        if turn == 0:
            new_ids = chat_prompt_ids(tok, messages)
        else:
            new = [{"role": "user", "content": f"Tell me more, part {turn}."}]
            before, after = render(tok, messages, None, False), render(tok, messages + new, None, True)
            assert after.startswith(before)
            ended = context[-1] == tok.eos_token_id
            # the model's turn is closed as the template closes it: the "\n" after its <|im_end|>, or both
            new_ids = tok.encode(("\n" if ended else "<|im_end|>\n") + after[len(before):], add_special_tokens=False)
            messages = messages + new
        expected = oracle.run_turn(oracle_session, new_ids, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        r = served.client.chat.completions.create(model=MODEL, messages=messages, temperature=0.0,
                                                  max_completion_tokens=max_tokens,
                                                  extra_body={"return_token_ids": True})
        context += new_ids
        assert r.prompt_token_ids == context and r.choices[0].token_ids == expected.token_ids, turn
        context += expected.token_ids
        messages = messages + [echo(r.choices[0].message)]
    assert oracle.session_tokens(oracle_session) == context


def load_example():
    path = Path(__file__).resolve().parents[2] / "examples" / "openai_agent.py"
    spec = importlib.util.spec_from_file_location("openai_agent_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module        # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_openai_agent_example_recovers_the_sessions_trajectory(scripted):
    """examples/openai_agent.py's agent loop against the scripted model (it always calls the calculator, so the
    episode runs to max_turns): its client-side trajectory equals the engine loop's record of the session."""
    served, _, script = scripted
    example = load_example()
    traj = example.run_episode(served.client, MODEL, "6*7", 42, max_turns=3, max_tokens=MAX_TOKENS)
    assert traj.turns == 3 and traj.tool_calls == 3 and traj.final_answer is None and traj.reward == 0.0
    episode = traj.messages[len(example.FEW_SHOT) + 2:]          # after the system prompt, few-shot and question
    assert [m["content"] for m in episode if m["role"] == "tool"] == ["42"] * 3
    conversation = served.app.state.front.sessions.get(traj.session_id)
    whole = asyncio.run(served.backend.close_session(conversation.engine_session))   # the engine loop's record
    assert traj.prompt_ids + traj.token_ids == whole.prompt_ids + whole.token_ids
    assert traj.loss_mask == [0] * (len(whole.prompt_ids) - len(traj.prompt_ids)) + whole.loss_mask
    assert traj.logprobs == [0.0] * (len(whole.prompt_ids) - len(traj.prompt_ids)) + whole.logprobs
    assert sum(traj.loss_mask) == 3 * len(script)
