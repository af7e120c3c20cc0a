"""Chat-session policy over a deterministic stub backend (no engine): explicit session ids and their errors,
concurrent turns (409 / fork), n > 1, the bounds (max count, TTL) freeing backend sessions, a lost backend
session re-prefilled from the exact tokens, a failed turn that loses nothing. The stub keeps its own record of
every session's tokens: the oracle for what the backend was sent."""
from __future__ import annotations

import asyncio
import threading
import time

import openai
import pytest
import uvicorn
from transformers import AutoTokenizer

from engine.smollm2 import chat_prompt_ids
from rollout.backend import ErrorCode, RolloutError
from rollout.chat_sessions import SessionConfig
from rollout.chat_template import ChatTemplate, TurnState
from rollout.http_server import HttpConfig, create_app
from tests.rollout.stub_backend import StubBackend

MODEL = "stub"
WAIT_S = 30.0
USER = [{"role": "user", "content": "What is 6*7?"}]


class GatedStub(StubBackend):
    """step_session waits for ``door`` (open unless cleared) and signals ``entered`` once per call."""

    def __init__(self) -> None:
        super().__init__()
        self.door = threading.Event()
        self.door.set()
        self.entered = threading.Semaphore(0)
        self.closed = threading.Semaphore(0)          # released once per close_session
        self.fail_next: RolloutError | None = None

    async def close_session(self, session_id):
        try:
            return await super().close_session(session_id)
        finally:
            self.closed.release()

    async def step_session(self, session_id, new_token_ids, params):
        self.entered.release()
        await asyncio.get_running_loop().run_in_executor(None, self.door.wait, WAIT_S)
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            self.sessions[session_id].add_env_tokens(list(new_token_ids))   # the turn got in, then failed
            raise error
        return await super().step_session(session_id, new_token_ids, params)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture
def serve(smollm2_dir):
    """serve(template=None, sessions=None, backend_class=GatedStub) -> (base URL, backend, ChatSessions): a server
    over a fresh backend_class(),
    SmolLM2's tokenizer with ``template`` (default its own), the sessions (default: TTL 60 s, at most 3
    conversations) on a manual clock; stopped after the test."""
    stops = []

    def start(template=None, sessions=None, backend_class=None):
        backend = (backend_class or GatedStub)()
        tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
        if template is not None:
            tokenizer.chat_template = template
        config = HttpConfig(model_name=MODEL, max_model_len=4096,
                            sessions=sessions or SessionConfig(ttl_s=60.0, max_conversations=3))
        app = create_app(backend, tokenizer, config)
        sessions = app.state.front.sessions
        sessions.clock = Clock()
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=srv.run, name="test-uvicorn-policy", daemon=True)
        thread.start()
        stops.append((backend, srv, thread))
        deadline = time.monotonic() + WAIT_S
        while not srv.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the HTTP server did not come up"
            time.sleep(0.02)
        return f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}/v1", backend, sessions
    yield start
    for backend, srv, thread in stops:
        backend.door.set()
        srv.should_exit = True
        thread.join(10.0)


@pytest.fixture
def served(serve):
    return serve()


def client(base):
    return openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=WAIT_S)


def chat(base, messages, session_id=None, **kw):
    extra = {"return_token_ids": True}
    if session_id is not None:
        extra["session_id"] = session_id
    return client(base).chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=4,
                                                extra_body=extra, **kw)


def echo(r):
    return {"role": "assistant", "content": r.choices[0].message.content}


def context(r):
    return list(r.prompt_token_ids) + list(r.choices[0].token_ids)


def engine_session(sessions, session_id):
    return sessions.get(session_id).engine_session


def test_explicit_session_id_errors_name_the_field_and_lose_nothing(served):
    base, backend, sessions = served
    r1 = chat(base, USER)
    sid = r1.session_id
    more = USER + [echo(r1), {"role": "user", "content": "And 7*8?"}]
    cases = [  # (messages, session_id, n, param, text in the message)
        (USER + [{"role": "assistant", "content": "tampered"}, more[-1]], sid, 1, "session_id", "messages[1]"),
        (USER + [echo(r1)], sid, 1, "session_id", "at least one new message"),
        (more, sid, 2, "n", "n must be 1"),
    ]
    for messages, session_id, n, param, text in cases:
        with pytest.raises(openai.BadRequestError) as e:
            chat(base, messages, session_id, n=n)
        assert e.value.body["param"] == param and text in e.value.body["message"], e.value.body
    with pytest.raises(openai.BadRequestError, match="tools"):
        chat(base, more, sid, tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(openai.NotFoundError) as e:
        chat(base, more, "chatsess-unknown")
    assert e.value.body["code"] == "session_not_found" and "unknown" in e.value.body["message"]
    r2 = chat(base, more, sid)
    assert r2.session_id == sid
    assert r2.prompt_token_ids[:len(context(r1))] == context(r1)        # continues the exact tokens
    whole = backend.sessions[engine_session(sessions, sid)]
    assert whole.prompt_ids + whole.token_ids == context(r2) and whole.turns == 2


def test_a_busy_conversation_is_a_409_with_its_id_and_forks_without(served):
    base, backend, _ = served
    r1 = chat(base, USER)
    sid = r1.session_id
    more = USER + [echo(r1), {"role": "user", "content": "And 7*8?"}]
    backend.door.clear()
    backend.entered = threading.Semaphore(0)              # count the calls from here on
    results = {}

    def run(name, session_id):
        results[name] = chat(base, more, session_id)
    first = threading.Thread(target=run, args=("pinned", sid))
    first.start()
    assert backend.entered.acquire(timeout=WAIT_S)        # the conversation's turn is in the backend
    with pytest.raises(openai.ConflictError) as e:
        chat(base, more, sid)
    assert e.value.body["code"] == "session_busy" and e.value.body["param"] == "session_id"
    fork = threading.Thread(target=run, args=("auto", None))
    fork.start()
    assert backend.entered.acquire(timeout=WAIT_S)
    backend.door.set()
    first.join(WAIT_S)
    fork.join(WAIT_S)
    pinned, auto = results["pinned"], results["auto"]
    assert pinned.session_id == sid and auto.session_id not in (None, sid)
    assert auto.prompt_token_ids == pinned.prompt_token_ids           # the fork copied the exact tokens
    # Neither was disturbed: both continue from their own answers (alike here: the stub's answer depends on the
    # context only), the pinned one by its id, the fork automatically.
    r3 = chat(base, more + [echo(pinned), {"role": "user", "content": "Thanks."}], sid)
    assert r3.session_id == sid and r3.prompt_token_ids[:len(context(pinned))] == context(pinned)
    r4 = chat(base, more + [echo(auto), {"role": "user", "content": "Thanks!"}])
    assert r4.session_id == auto.session_id and r4.prompt_token_ids[:len(context(auto))] == context(auto)


def test_n_above_one_continues_the_exact_tokens_and_records_nothing(served):
    base, backend, sessions = served
    r1 = chat(base, USER)
    more = USER + [echo(r1), {"role": "user", "content": "And 7*8?"}]
    turns_before = backend.sessions[engine_session(sessions, r1.session_id)].turns
    r2 = chat(base, more, n=2)
    assert len(r2.choices) == 2 and (r2.model_extra or {}).get("session_id") is None
    assert r2.prompt_token_ids[:len(context(r1))] == context(r1)
    assert backend.sessions[engine_session(sessions, r1.session_id)].turns == turns_before
    r3 = chat(base, more)                                               # the conversation is where it was
    assert r3.session_id == r1.session_id and r3.prompt_token_ids == r2.prompt_token_ids


def test_the_bounds_forget_conversations_and_free_their_sessions(served):
    base, backend, sessions = served
    firsts = [chat(base, [{"role": "user", "content": f"question {i}"}]) for i in range(3)]   # full: max 3
    def more(i):
        return [{"role": "user", "content": f"question {i}"}, echo(firsts[i]), {"role": "user", "content": "more"}]
    kept = chat(base, more(0))                  # full, but continuing the least recently used one keeps it
    assert kept.session_id == firsts[0].session_id and kept.prompt_token_ids[:len(context(firsts[0]))] == \
        context(firsts[0])
    chat(base, [{"role": "user", "content": "question 3"}])           # a 4th: the least recently used (1) goes
    assert backend.closed.acquire(timeout=WAIT_S)
    assert len(sessions) == 3 and sessions.get(firsts[1].session_id) is None
    assert len(backend.sessions) == 3                                   # its backend session was closed
    again = chat(base, more(1))                                         # forgotten: a fresh, full render
    assert again.session_id != firsts[1].session_id
    assert again.prompt_token_ids == chat_prompt_ids(sessions.template.tokenizer, more(1))
    assert backend.closed.acquire(timeout=WAIT_S)                       # ... which made room in turn
    sessions.clock.now += 61.0                                          # past the TTL: all idle ones go
    chat(base, USER)
    for _ in range(3):
        assert backend.closed.acquire(timeout=WAIT_S)
    assert len(sessions) == 1 and len(backend.sessions) == 1


def test_a_lost_backend_session_is_re_prefilled_from_the_exact_tokens(served):
    base, backend, sessions = served
    r1 = chat(base, USER)
    lost = engine_session(sessions, r1.session_id)
    del backend.sessions[lost]                                          # expired on the worker, say
    more = USER + [echo(r1), {"role": "user", "content": "And 7*8?"}]
    r2 = chat(base, more, r1.session_id)
    assert r2.session_id == r1.session_id and r2.prompt_token_ids[:len(context(r1))] == context(r1)
    whole = backend.sessions[engine_session(sessions, r1.session_id)]
    assert whole.prompt_ids == r2.prompt_token_ids and whole.turns == 1   # one turn: the whole exact context


def test_a_failed_turn_leaves_the_conversation_as_it_was(served):
    base, backend, sessions = served
    r1 = chat(base, USER)
    first_session = engine_session(sessions, r1.session_id)
    more = USER + [echo(r1), {"role": "user", "content": "And 7*8?"}]
    backend.fail_next = RolloutError(ErrorCode.WORKER_DIED, "the worker died")
    with pytest.raises(openai.InternalServerError):
        chat(base, more, r1.session_id)
    r2 = chat(base, more, r1.session_id)                                # the same request again: served
    assert r2.session_id == r1.session_id and r2.prompt_token_ids[:len(context(r1))] == context(r1)
    assert backend.closed.acquire(timeout=WAIT_S)
    assert first_session not in backend.sessions                        # its half-done KV was dropped
    whole = backend.sessions[engine_session(sessions, r1.session_id)]
    assert whole.prompt_ids + whole.token_ids == context(r2)



# ChatML that writes the number of messages into its system turn: every later request re-renders turn 0.
COUNTING_TEMPLATE = (
    "{{- '<|im_start|>system\\n' + (messages | length | string) + ' messages<|im_end|>\\n' }}"
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_a_template_that_rewrites_an_earlier_turn_keeps_the_recorded_tokens(serve):
    base, backend, sessions = serve(COUNTING_TEMPLATE)
    tok = sessions.template.tokenizer
    r1 = chat(base, USER)
    assert tok.decode(r1.prompt_token_ids).startswith("<|im_start|>system\n1 messages<|im_end|>")
    r2 = chat(base, USER + [echo(r1), {"role": "user", "content": "more"}], r1.session_id)
    # The stub's answer ran to max_tokens: the turn is closed for it, then the new message as ChatML writes it;
    # the system turn stays as recorded ("1 messages"), not re-rendered ("3 messages").
    new = tok.encode("<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n",
                     add_special_tokens=False)
    assert r2.prompt_token_ids == context(r1) + new
    whole = backend.sessions[engine_session(sessions, r1.session_id)]
    assert whole.prompt_ids + whole.token_ids == context(r2)


@pytest.mark.parametrize("last_token, ended, glue", [
    ("<|im_end|>", True, "\n"),                    # the model closed its turn: only ChatML's newline is added
    ("<|endoftext|>", True, "<|im_end|>\n"),       # ended on a token ChatML does not close turns with
    ("!", False, "<|im_end|>\n"),                  # cut by max_tokens
])
def test_the_glue_closes_the_turn_the_way_the_template_does(smollm2_tokenizer, last_token, ended, glue):
    tok = smollm2_tokenizer
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]
    state = TurnState(tools=None, messages=messages, num_tokens=1, last_token=tok.convert_tokens_to_ids(last_token),
                      ended_turn=ended)
    text = ChatTemplate(tok).continuation_text(state, [{"role": "user", "content": "more"}])
    assert text == glue + "<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n"
