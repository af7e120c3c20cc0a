"""An OpenAI tool-calling agent on the rollout service: the calculator environment's tool, driven through the
official ``openai`` client, its trajectory (tokens, loss mask, logprobs) recovered for training.

    python examples/openai_agent.py                       # in-process server: SmolLM2-135M-Instruct on CPU
    python examples/openai_agent.py --episodes 2 --difficulty hard --temperature 0.7 --seed 3

    # or against a running server (SmolLM2's own template knows no tools: give it this folder's)
    rollout serve --model smollm2 --local --http 127.0.0.1:8000 --chat-template examples/tool_chat_template.jinja
    python examples/openai_agent.py --base-url http://127.0.0.1:8000/v1 --model smollm2

The agent is plain OpenAI code: ``chat.completions.create(tools=[calculator])``, run each ``tool_call`` and
answer it with a ``tool`` message, until the model answers without a call. Two extension fields make it a
rollout: ``return_token_ids`` (the prompt's and the answer's token ids) and ``session_id`` (continue this
conversation's session: its KV stays on the server between turns, and every turn's prompt is the previous
turn's exact tokens plus the new messages rendered by the chat template, docs/openai.md "Sessions"). So the
trajectory is the last turn's prompt + answer; the model's tokens (loss mask 1) are each turn's answer, with
the logprobs it was sampled with; tool results and prompts are loss mask 0. ``run_episode`` checks that each
turn's prompt starts with the previous context: a re-tokenized history would fail it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rollout.envs.calculator import CalcError, evaluate, format_value, make_question

TEMPLATE = Path(__file__).with_name("tool_chat_template.jinja")
CALCULATOR_TOOL = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression of integers, + - * / and parentheses.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
SYSTEM = "You are a careful assistant. Use the calculator tool for arithmetic, then give the final number."
# Two worked exchanges: a 135M model rarely calls a tool it has only been told about.
def _shot(question: str, value: str, call_id: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"What is {question}?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {
                "name": "calculator", "arguments": json.dumps({"expression": question})}}]},
            {"role": "tool", "tool_call_id": call_id, "content": value},
            {"role": "assistant", "content": f"The answer is {value}."}]


FEW_SHOT = _shot("17 + 25", "42", "call_example_1") + _shot("63 - 28", "35", "call_example_2")
PARTIAL_CREDIT = 0.2   # as the calculator environment: a well-formed call without the right final answer
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass
class AgentTrajectory:
    """What a trainer needs from one episode. ``token_ids`` follows ``prompt_ids``; the per-token lists line up."""
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)      # 1: sampled by the model
    logprobs: list[float] = field(default_factory=list)     # the sampling logprob of model tokens, 0.0 elsewhere
    reward: float = 0.0
    turns: int = 0
    tool_calls: int = 0
    session_id: str | None = None
    final_answer: str | None = None                         # None: cut off by max_turns while using the tool
    messages: list[dict[str, Any]] = field(default_factory=list)

    def add(self, token_ids: list[int], model: bool, logprobs: list[float] | None = None) -> None:
        self.token_ids += token_ids
        self.loss_mask += [int(model)] * len(token_ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(token_ids)


def call_calculator(arguments: str) -> tuple[str, bool]:
    """(the tool's answer, whether the call was well formed)."""
    try:
        expression = json.loads(arguments).get("expression")
        if not isinstance(expression, str):
            return "error: arguments need an 'expression' string", False
        return format_value(evaluate(expression)), True
    except (ValueError, AttributeError, CalcError) as e:
        return f"error: {e}", False


def score(answer_text: str, answer: Fraction, made_call: bool) -> float:
    for number in _NUMBER.findall(answer_text):
        with contextlib.suppress(ValueError, ZeroDivisionError):
            if Fraction(number.replace(",", "")) == answer:
                return 1.0
    return PARTIAL_CREDIT if made_call else 0.0


def run_episode(client: Any, model: str, question: str, answer: Fraction, *, max_turns: int = 4,
                max_tokens: int = 64, temperature: float = 0.0, seed: int | None = None) -> AgentTrajectory:
    """One agent episode through ``client`` (``openai.OpenAI``); raises RuntimeError if the server's prompt of a
    turn does not continue the previous turn's exact tokens."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}, *FEW_SHOT,
                                      {"role": "user", "content": f"What is {question}?"}]
    traj: AgentTrajectory | None = None
    made_call = False
    for _ in range(max_turns):
        extra: dict[str, Any] = {"return_token_ids": True}
        if traj is not None:
            extra["session_id"] = traj.session_id        # pin the conversation: a 400 if it cannot continue
        r = client.chat.completions.create(model=model, messages=messages, tools=[CALCULATOR_TOOL],
                                           temperature=temperature, seed=seed, max_completion_tokens=max_tokens,
                                           logprobs=True, extra_body=extra)
        choice = r.choices[0]
        prompt, output = list(r.prompt_token_ids), list(choice.token_ids)
        if traj is None:
            traj = AgentTrajectory(prompt_ids=prompt)
        else:
            context = traj.prompt_ids + traj.token_ids
            if prompt[:len(context)] != context:
                raise RuntimeError("the server's prompt does not continue the conversation's exact tokens")
            traj.add(prompt[len(context):], model=False)   # the tool results / new messages, as rendered
        traj.add(output, model=True, logprobs=[t.logprob for t in choice.logprobs.content])
        traj.session_id = r.session_id
        traj.turns += 1
        msg = choice.message
        calls = msg.tool_calls or []
        messages.append({"role": "assistant", "content": msg.content, **({"tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in calls]} if calls else {})})
        if not calls:
            traj.final_answer = msg.content or ""
            traj.reward = score(traj.final_answer, answer, made_call)
            break
        for c in calls:
            result, ok = call_calculator(c.function.arguments) if c.function.name == "calculator" else (
                f"error: unknown tool {c.function.name!r}", False)
            made_call |= ok
            traj.tool_calls += 1
            messages.append({"role": "tool", "tool_call_id": c.id, "content": result})
    traj.messages = messages
    return traj


@contextlib.contextmanager
def in_process_server(model: str = "smollm2", template: Path = TEMPLATE) -> Iterator[str]:
    """``rollout serve --local --http`` in this process (uvicorn on a thread, an ephemeral loopback port) with
    ``template`` as the chat template; yields the base URL of its ``/v1``."""
    import uvicorn

    from engine import EngineConfig
    from rollout.http_server import HttpConfig, create_app
    from rollout.local import LocalBackend

    backend = LocalBackend(EngineConfig(model=model, max_num_seqs=8))
    try:
        tokenizer = backend.loop.tokenizer()
        tokenizer.chat_template = template.read_text()
        config = HttpConfig(model_name=model, max_model_len=backend.loop.engine.max_model_len)
        app = create_app(backend, tokenizer, config)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, name="openai-agent-http", daemon=True)
        thread.start()
        deadline = time.monotonic() + 60.0
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process HTTP server did not start")
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
        finally:
            server.should_exit = True
            thread.join(30.0)
    finally:
        backend.loop.shutdown()


def show(traj: AgentTrajectory) -> str:
    lines = []
    for m in traj.messages[len(FEW_SHOT) + 1:]:
        calls = "".join(f" -> {c['function']['name']}({c['function']['arguments']})" for c in m.get("tool_calls") or [])
        lines.append(f"  {m['role']:>9}: {m.get('content') or ''}{calls}")
    model_tokens = sum(traj.loss_mask)
    lines.append(f"  reward {traj.reward}, {traj.turns} turns, {traj.tool_calls} tool calls, session {traj.session_id}")
    lines.append(f"  trajectory: {len(traj.prompt_ids)} prompt + {len(traj.token_ids)} tokens ({model_tokens} model, "
                 f"{len(traj.token_ids) - model_tokens} tool/prompt), mean model logprob "
                 f"{sum(traj.logprobs) / max(1, model_tokens):.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default=None, help="a running server's /v1 (default: an in-process one)")
    parser.add_argument("--api-key", default="unused-on-loopback")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--episodes", type=int, default=1)
    parser.add_argument("--difficulty", default="easy", choices=("easy", "hard"))
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import openai

    with contextlib.ExitStack() as stack:
        base_url = args.base_url or stack.enter_context(in_process_server(args.model))
        client = openai.OpenAI(base_url=base_url, api_key=args.api_key, max_retries=0, timeout=600.0)
        start = time.perf_counter()
        rewards = []
        for i in range(args.episodes):
            question, answer = make_question(args.seed + i, args.difficulty)
            traj = run_episode(client, args.model, question, answer, max_turns=args.max_turns,
                               max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed + i)
            print(f"===== episode {i}: What is {question}? (answer {format_value(answer)})\n{show(traj)}")
            rewards.append(traj.reward)
        print(f"{len(rewards)} episodes in {time.perf_counter() - start:.1f} s, mean reward "
              f"{sum(rewards) / len(rewards):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
