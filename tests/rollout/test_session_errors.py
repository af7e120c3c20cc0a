"""Sessions over the deterministic stub backend (no engine): their errors in OpenAI's format (404 unknown, expired,
closed or forgotten; 409 busy), ``DELETE /v1/sessions/{id}``, /v1/completions continuing by exact token prefix
(automatic and explicit, branches, n > 1), a busy conversation never matched by tokens, and the bounds of the
record (count, tokens, TTL). The stub keeps its own record of every backend session's tokens: the oracle for
what the backend was sent. Events are ordered by the stub's gate (``door``, ``entered``), never by timing."""
from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time

import openai
import pytest

from rollout.backend import ErrorCode, RolloutError
from rollout.chat_sessions import SessionConfig
from rollout.loop_streams import SampleDelta
from tests.rollout.http_helpers import open_stream, sse_events
from tests.rollout.stub_backend import StubBackend
from tests.rollout.test_chat_session_policy import (  # noqa: F401 - fixtures
    MODEL,
    USER,
    WAIT_S,
    GatedStub,
    chat,
    client,
    context,
    echo,
    engine_session,
    serve,
    served,
)


def completion(base, prompt, session_id=None, n=1):
    extra = {"return_token_ids": True}
    if session_id is not None:
        extra["session_id"] = session_id
    return client(base).completions.create(model=MODEL, prompt=prompt, max_tokens=4, n=n, extra_body=extra)


def sid_of(r):
    return (r.model_extra or {}).get("session_id")


def delete(base, session_id):
    """DELETE /v1/sessions/{id} -> (status, JSON body)."""
    host, port = base.removeprefix("http://").removesuffix("/v1").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=WAIT_S)
    try:
        conn.request("DELETE", f"/v1/sessions/{session_id}")
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def assert_error(call, status, code, text):
    with pytest.raises(openai.APIStatusError) as e:
        call()
    assert e.value.status_code == status, e.value.body
    assert e.value.body["code"] == code and text in e.value.body["message"], e.value.body
    assert e.value.body["param"] == "session_id" and e.value.body["type"] == "invalid_request_error"


def test_gone_sessions_are_404s_naming_why_and_the_server_keeps_serving(served):  # noqa: F811
    base, backend, sessions = served
    more = lambda r: USER + [echo(r), {"role": "user", "content": "And 7*8?"}]  # noqa: E731
    for call in (lambda: chat(base, USER + [{"role": "assistant", "content": "x"}, USER[0]], "chatsess-nope"),
                 lambda: completion(base, [1, 2, 3], "chatsess-nope")):
        assert_error(call, 404, "session_not_found", "unknown")
    # closed: DELETE frees its backend session now; the id is then a 404 everywhere, DELETE included
    r = chat(base, USER)
    kept = engine_session(sessions, r.session_id)
    assert kept in backend.sessions
    assert delete(base, r.session_id) == (200, {"id": r.session_id, "object": "session", "deleted": True})
    assert kept not in backend.sessions and sessions.get(r.session_id) is None
    assert_error(lambda: chat(base, more(r), r.session_id), 404, "session_not_found", "was closed")
    assert_error(lambda: completion(base, context(r) + [5], r.session_id), 404, "session_not_found", "was closed")
    status, body = delete(base, r.session_id)
    assert status == 404 and body["error"]["code"] == "session_not_found"
    # expired: idle past the TTL (the manual clock), forgotten on the next request
    r = completion(base, [4, 5, 6])
    sessions.clock.now += 61.0
    assert_error(lambda: completion(base, context(r) + [7], sid_of(r)), 404, "session_not_found", "expired")
    # forgotten to make room: at most 3 conversations
    firsts = [completion(base, [10 + i, 1, 2]) for i in range(4)]
    assert_error(lambda: completion(base, context(firsts[0]) + [7], sid_of(firsts[0])), 404, "session_not_found",
                 "forgotten to make room")
    # after all that: served, and the conversations still there continue
    again = completion(base, context(firsts[3]) + [7], sid_of(firsts[3]))
    assert sid_of(again) == sid_of(firsts[3])
    assert backend.sessions[engine_session(sessions, sid_of(again))].turns == 2


def test_a_busy_conversation_is_a_409_everywhere_and_its_turn_is_not_disturbed(served):  # noqa: F811
    base, backend, sessions = served
    r1 = chat(base, USER)
    sid = r1.session_id
    more = USER + [echo(r1), {"role": "user", "content": "And 7*8?"}]
    backend.door.clear()
    backend.entered = type(backend.entered)(0)            # count the calls from here on
    results = {}
    running = threading.Thread(target=lambda: results.setdefault("turn", chat(base, more, sid)))
    running.start()
    try:
        assert backend.entered.acquire(timeout=WAIT_S)    # its turn is in the backend
        assert_error(lambda: chat(base, more, sid), 409, "session_busy", "already running")
        assert_error(lambda: completion(base, context(r1) + [5], sid), 409, "session_busy", "already running")
        status, body = delete(base, sid)
        assert status == 409 and body["error"]["code"] == "session_busy"
    finally:
        backend.door.set()
        running.join(WAIT_S)
    turn = results["turn"]
    assert turn.session_id == sid and turn.prompt_token_ids[:len(context(r1))] == context(r1)
    whole = backend.sessions[engine_session(sessions, sid)]
    assert whole.prompt_ids + whole.token_ids == context(turn) and whole.turns == 2   # nothing else got in
    assert delete(base, sid)[0] == 200


def test_backend_session_errors_are_404_and_409_not_500(served):  # noqa: F811
    base, backend, sessions = served
    for error, status in ((RolloutError(ErrorCode.SESSION_BUSY, "a turn is running"), 409),
                          (RolloutError(ErrorCode.UNKNOWN_SESSION, "no such session"), 404)):
        backend.fail_next = error                     # the backend refuses the new conversation's first turn
        with pytest.raises(openai.APIStatusError) as e:
            chat(base, [{"role": "user", "content": f"fresh {status}"}])
        assert e.value.status_code == status and e.value.body["code"] == error.code.value, e.value.body
        assert backend.closed.acquire(timeout=WAIT_S)   # its session was closed, nothing recorded
    assert len(sessions) == 0 and backend.sessions == {}
    assert chat(base, USER).session_id and len(sessions) == 1


def test_completions_continue_by_exact_token_prefix(served):  # noqa: F811
    base, backend, sessions = served
    r1 = completion(base, [1, 2, 3])
    sid = sid_of(r1)
    assert sid and r1.choices[0].model_extra["session_id"] == sid
    r2 = completion(base, context(r1) + [7, 8])                       # automatic: same conversation
    assert sid_of(r2) == sid and r2.prompt_token_ids == context(r1) + [7, 8]
    whole = backend.sessions[engine_session(sessions, sid)]
    assert whole.turns == 2 and whole.prompt_ids + whole.token_ids == context(r2)   # sent [7, 8] only
    assert whole.token_ids[len(r1.choices[0].token_ids):][:2] == [7, 8] and whole.loss_mask.count(0) == 2
    r3 = completion(base, context(r2), sid)                          # explicit, no new tokens: generate on
    assert sid_of(r3) == sid and backend.sessions[engine_session(sessions, sid)].turns == 3
    # n > 1 never matches by tokens and records nothing: the conversation is where it was
    wide = completion(base, context(r3) + [9], n=2)
    assert sid_of(wide) is None and len(wide.choices) == 2
    assert backend.sessions[engine_session(sessions, sid)].turns == 3
    # a prompt extending an earlier turn: a new conversation (a branch), the later one untouched
    branch = completion(base, context(r1) + [9])
    assert sid_of(branch) not in (None, sid)
    assert backend.sessions[engine_session(sessions, sid_of(branch))].prompt_ids == context(r1) + [9]
    pinned = completion(base, context(r1) + [6], sid)                # the same, by its id: a branch too
    assert sid_of(pinned) not in (None, sid, sid_of(branch))
    with pytest.raises(openai.BadRequestError) as e:                 # extends no turn of it
        completion(base, [1, 2, 4], sid)
    assert e.value.body["code"] == "session_mismatch" and "token 2" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="one prompt"):
        client(base).completions.create(model=MODEL, prompt=[[1], [2]], max_tokens=2, extra_body={"session_id": sid})
    r4 = completion(base, context(r3) + [5])                         # still continues in place
    assert sid_of(r4) == sid and backend.sessions[engine_session(sessions, sid)].turns == 4


def test_a_busy_conversation_is_never_matched_by_tokens(served):  # noqa: F811
    base, backend, sessions = served
    r1 = completion(base, [1, 2, 3])
    backend.door.clear()
    backend.entered = type(backend.entered)(0)
    results = {}
    threads = [threading.Thread(target=lambda k=k, s=s: results.setdefault(k, completion(base, context(r1) + [k], s)))
               for k, s in ((7, sid_of(r1)), (8, None))]
    try:
        threads[0].start()
        assert backend.entered.acquire(timeout=WAIT_S)               # the conversation's turn runs
        threads[1].start()
        assert backend.entered.acquire(timeout=WAIT_S)               # the other one too: it was not made to wait
    finally:
        backend.door.set()
        for t in threads:
            t.join(WAIT_S)
    assert sid_of(results[7]) == sid_of(r1) and sid_of(results[8]) not in (None, sid_of(r1))
    fork = backend.sessions[engine_session(sessions, sid_of(results[8]))]
    assert fork.turns == 1 and fork.prompt_ids == context(r1) + [8]  # its own session, the whole exact prompt


def test_the_record_is_bounded_in_tokens_and_lru(serve):  # noqa: F811
    base, backend, sessions = serve(sessions=SessionConfig(ttl_s=60.0, max_conversations=100, max_tokens=24))
    rs = [completion(base, [20 + i, 1, 2]) for i in range(3)]         # 7 tokens each: 21 recorded
    assert len(sessions) == 3 and sessions.num_tokens == 21
    completion(base, context(rs[0]) + [5])                            # rs[0]: 12 tokens, the most recent now
    assert len(sessions) == 2 and sessions.get(sid_of(rs[1])) is None   # 26 > 24: the LRU idle one (rs[1]) went
    assert backend.closed.acquire(timeout=WAIT_S) and engine_session(sessions, sid_of(rs[0])) in backend.sessions
    assert sessions.num_tokens == 19 and len(sessions._by_tokens) == len(sessions)
    big = completion(base, list(range(100, 130)))                    # over the cap alone: kept, every other goes
    assert len(sessions) == 1 and sessions.get(sid_of(big)) is not None and sessions.num_tokens == 34
    for _ in range(2):
        assert backend.closed.acquire(timeout=WAIT_S)
    assert list(backend.sessions) == [engine_session(sessions, sid_of(big))]


class CutStub(GatedStub):
    """A streamed turn sends its first token, signals ``entered``, then waits for ``door`` (its client may go away
    meanwhile: the stream is then cancelled there, counted in ``cut``)."""

    def __init__(self) -> None:
        super().__init__()
        self.cut = 0

    async def step_session_stream(self, session_id, new_token_ids, params):
        t = await StubBackend.step_session(self, session_id, new_token_ids, params)   # the stub's record: the turn
        yield SampleDelta(0, t.token_ids[:1], t.logprobs[:1], t.versions[:1], None)
        self.entered.release()
        deadline = time.monotonic() + WAIT_S
        try:
            while not self.door.is_set():     # bounded; cancelled at once when the client is gone
                assert time.monotonic() < deadline, "the door never opened"
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            self.cut += 1
            raise
        yield SampleDelta(0, t.token_ids[1:], t.logprobs[1:], t.versions[1:], None, final=t)


def test_a_stream_cut_mid_turn_leaves_the_conversation_as_it_was(serve):  # noqa: F811
    base, backend, sessions = serve(backend_class=CutStub)
    r1 = chat(base, USER)
    first_session = engine_session(sessions, r1.session_id)
    more = USER + [echo(r1), {"role": "user", "content": "And 7*8?"}]
    backend.door.clear()
    conn, resp = open_stream(base.removesuffix("/v1"), "/v1/chat/completions",
                             {"model": MODEL, "messages": more, "max_completion_tokens": 4, "stream": True,
                              "session_id": r1.session_id, "return_token_ids": True})
    events = sse_events(resp)
    role, token = next(events), next(events)
    assert role["session_id"] == token["session_id"] == r1.session_id and len(token["choices"][0]["token_ids"]) == 1
    assert backend.entered.acquire(timeout=WAIT_S)
    conn.sock.close()                              # gone mid-turn
    conn.close()
    assert backend.closed.acquire(timeout=WAIT_S)  # the turn's session, holding a turn the record does not, closed
    assert backend.cut == 1 and first_session not in backend.sessions
    conv = sessions.get(r1.session_id)
    assert conv.token_ids == context(r1) and len(conv.turns) == 1 and not conv.busy and conv.engine_session is None
    backend.door.set()
    r2 = chat(base, more, r1.session_id)           # served again: the whole exact context in a new session
    assert r2.session_id == r1.session_id and r2.prompt_token_ids == role["prompt_token_ids"]
    whole = backend.sessions[engine_session(sessions, r1.session_id)]
    assert whole.turns == 1 and whole.prompt_ids == r2.prompt_token_ids


def test_each_turn_keeps_its_messages_without_copying_the_earlier_ones(served):  # noqa: F811
    base, backend, sessions = served
    messages, r = USER, chat(base, USER)
    for k in range(3):
        messages = messages + [echo(r), {"role": "user", "content": f"more {k}"}]
        r = chat(base, messages)
    turns = sessions.get(r.session_id).turns
    assert len(turns) == 4 and [len(t.messages) for t in turns] == [2, 4, 6, 8]
    for earlier, later in zip(turns, turns[1:]):   # the same dicts, not equal copies: one per message in all
        assert all(a is b for a, b in zip(earlier.messages, later.messages))
