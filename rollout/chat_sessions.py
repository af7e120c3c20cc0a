"""Token-exact sessions for ``/v1/chat/completions`` and ``/v1/completions`` (docs/openai.md, "Sessions").

A request that continues a conversation this server answered earlier continues from the exact tokens of that
conversation — the model's own output is never re-tokenized — in the backend session that holds its KV, so only
the new tokens are prefilled. Continuing is found three ways, in this order:

1. ``session_id`` (explicit): that conversation, or a 4xx (404 gone, 409 busy, 400 not extended).
2. By messages (chat): the request's messages are a recorded turn's messages (the assistant message this server
   returned last) plus new ones; the new messages are rendered after that turn's exact tokens::

       request messages:  m_0 .. m_{k-1}  a_k            s_1 .. s_j
                          \\_____ recorded turn ________/ \\_ new _/
       context tokens:    T (exact, recorded: prompts + model tokens)  ++  encode(glue + delta)

   (``rollout.chat_template.ChatTemplate.continuation_text``: glue, delta, templates that rewrite earlier turns.)
3. By exact token prefix: the request's prompt tokens (a /v1/completions token prompt, a text prompt's encoding,
   a chat's fresh rendering) start with the exact context of an idle conversation; the rest is its new tokens.
   ``rollout.token_prefix`` is the index; every candidate is compared token for token.

Continued *in place* only when it is the conversation's latest turn and no other turn of it runs; anything else
(an earlier turn: a branch; a busy conversation: a fork) starts a new conversation from a copy of the exact tokens
(its own backend session, prefilled, less what the prefix cache shares). The engine's sessions have no fork of
their own, so a branch never touches the conversation it came from. ``n > 1`` records nothing (the engine samples a
session turn once) and never matches by tokens (its prompt is the same either way); matched by messages, its
samples continue from the exact tokens.

One owner: ``ChatSessions`` holds every record and runs on the server's asyncio loop only (no locks: nothing here
awaits while it reads or changes a record, except a turn's backend calls, during which its conversation is busy).
The backend calls are ``rollout.session_turns``.
"""
from __future__ import annotations

import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rollout.backend import RolloutBackend, RolloutError
from rollout.chat_template import (
    ChatTemplate,
    TemplateMismatch,
    TurnState,
    extended_turn,
    prefix_keys,
    why_not_extended,
)
from rollout.openai_schema import ChatMessage
from rollout.session_turns import SessionTurns, cached_prompt_tokens  # noqa: F401 - re-exported
from rollout.token_prefix import TokenPrefixIndex
from rollout.trajectory import Trajectory

SESSION_FIELD = "session_id"   # the requests' and the responses' extension field
GONE_MEMORY = 4096             # ids of conversations gone (closed, expired, evicted) remembered for a clear 404


@dataclass(frozen=True)
class SessionConfig:
    enabled: bool = True              # False: every request is a fresh prompt (no records, no sessions)
    ttl_s: float = 600.0              # an idle conversation older than this is forgotten and its session closed
    max_conversations: int = 1024     # past this, the least recently used idle conversation is forgotten
    max_tokens: int = 4_000_000       # tokens recorded over all conversations (the token index); past it, the same
    completions: bool = True          # /v1/completions (n = 1) records and continues conversations too

    def __post_init__(self) -> None:
        for name in ("enabled", "completions"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SessionConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.ttl_s, bool) or not isinstance(self.ttl_s, (int, float)) or not self.ttl_s > 0:
            raise ValueError(f"SessionConfig.ttl_s must be a number > 0, got {self.ttl_s!r}")
        for name in ("max_conversations", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SessionConfig.{name} must be an int >= 1, got {value!r}")


class SessionError(Exception):
    """A request refused by the session layer; the front end answers it in OpenAI's error format."""

    def __init__(self, status: int, message: str, param: str | None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass(eq=False)
class Conversation:
    id: str                             # public: the responses' session_id
    token_ids: list[int]                # the exact context: every prompt and model token so far, in order
    engine_session: str | None          # the backend session holding its KV; None: gone, re-prefill token_ids
    turns: list[TurnState] = field(default_factory=list)   # after each answered turn, oldest first
    token_key: int = 0                  # its entry in ChatSessions._by_tokens
    last_used: float = 0.0
    busy: bool = False                  # a turn is running in place: nobody else changes the record

    @property
    def state(self) -> TurnState:
        return self.turns[-1]


@dataclass(eq=False)
class ChatTurn:
    """One prompt of a request, as ``ChatSessions.begin_chat`` / ``begin_tokens`` prepared it."""
    prompt_ids: list[int]               # the whole context the model continues from
    new_token_ids: list[int]            # what this turn appends to ``conversation`` (all of prompt_ids if new)
    messages: list[dict] | None         # the request's (template dicts); None: a /v1/completions turn
    tools: list[dict] | None
    conversation: Conversation | None = None   # continued in place (held busy); None: a new conversation
    record: bool = True                 # False: n > 1 or sessions off; nothing is remembered
    session_id: str | None = None       # the id the response carries (chosen at begin when recorded)
    committed: bool = False
    opened_session: str | None = None   # the backend session opened for a new conversation, until commit
    stepped: bool = False               # a backend turn was started: the conversation's KV may have moved on
    reopened: bool = False              # its lost backend session was replaced (session_turns)
    ended: bool = False


class ChatSessions(SessionTurns):
    def __init__(self, backend: RolloutBackend, tokenizer: Any, config: SessionConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self.template = ChatTemplate(tokenizer)
        self.config = config
        self.clock = clock
        self.streams_sessions = hasattr(backend, "step_session_stream")
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()   # by id, least recently used first
        # message key -> (conversation, turn index); several when the same messages were answered alike
        self._by_messages: dict[str, list[tuple[Conversation, int]]] = {}
        self._by_tokens: TokenPrefixIndex[Conversation] = TokenPrefixIndex()  # current contexts only
        self._num_tokens = 0                                                  # len(token_ids) summed
        self._gone: OrderedDict[str, str] = OrderedDict()                     # id -> why it is gone
        self._closing: set = set()

    def __len__(self) -> int:
        return len(self._conversations)

    def get(self, session_id: str) -> Conversation | None:
        return self._conversations.get(session_id)

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    # ---------------------------------------------------------------- one request
    def begin_chat(self, messages: list[dict], tools: list[dict] | None, session_id: str | None, n: int,
                   stream: bool = False) -> ChatTurn:
        """A chat request's prompt; the conversation it continues in place is busy until ``end``."""
        self._expire()
        return self._hold(self._prepare_chat(messages, tools, session_id, n, stream))

    def begin_tokens(self, prompt_ids: list[int], session_id: str | None, n: int, stream: bool = False) -> ChatTurn:
        """One /v1/completions prompt (token ids), matched by exact token prefix only."""
        self._expire()
        return self._hold(self._prepare_tokens(prompt_ids, session_id, n, stream))

    def end(self, turn: ChatTurn) -> None:
        """The turn is over (answered or not; idempotent): its conversation is idle again, and a turn that was
        started and not committed lets its backend session go (it may hold tokens the record does not)."""
        if turn.ended:
            return
        turn.ended = True
        conv = turn.conversation
        if not turn.committed:
            if turn.opened_session is not None:
                self._close_later(turn.opened_session)
                turn.opened_session = None
            if conv is not None and turn.stepped:
                self._drop_session(conv)
        if conv is not None:
            conv.busy = False
            conv.last_used = self.clock()

    @contextlib.contextmanager
    def held(self, turns: list[ChatTurn]) -> Iterator[list[ChatTurn]]:
        try:
            yield turns
        finally:
            for turn in turns:
                self.end(turn)

    def _hold(self, turn: ChatTurn) -> ChatTurn:
        if turn.conversation is not None:
            turn.conversation.busy = True
            turn.session_id = turn.conversation.id
        elif turn.record:
            turn.session_id = f"chatsess-{uuid.uuid4().hex}"
        return turn

    def _records(self, n: int, stream: bool) -> bool:
        return self.config.enabled and n == 1 and (not stream or self.streams_sessions)

    def _explicit(self, session_id: str, n: int, stream: bool) -> Conversation:
        if not self.config.enabled:
            raise SessionError(400, "session_id: sessions are disabled on this server", SESSION_FIELD)
        if n != 1:
            raise SessionError(400, f"n must be 1 with session_id (a session continues one sample), got {n}", "n")
        if stream and not self.streams_sessions:
            raise SessionError(400, f"session_id with stream: true needs a backend that streams session turns; "
                                    f"{type(self.backend).__name__} does not", SESSION_FIELD)
        conv = self._conversations.get(session_id)
        if conv is None:
            why = {"closed": "was closed", "expired": f"expired (idle for more than {self.config.ttl_s:g} s)",
                   "evicted": f"was forgotten to make room (at most {self.config.max_conversations} conversations "
                              f"and {self.config.max_tokens} tokens are kept)"}.get(self._gone.get(session_id, ""),
                                                                                   "is unknown (never answered here)")
            raise SessionError(404, f"session_id {session_id!r}: the conversation {why}", SESSION_FIELD,
                               "session_not_found")
        return conv

    @staticmethod
    def _busy(conv: Conversation) -> SessionError:
        return SessionError(409, f"session_id {conv.id!r}: a turn of this conversation is already running; send "
                                 "the next one after its answer", SESSION_FIELD, "session_busy")

    def _prepare_chat(self, messages: list[dict], tools: list[dict] | None, session_id: str | None, n: int,
                      stream: bool) -> ChatTurn:
        record = self._records(n, stream)
        if session_id is not None:
            conv = self._explicit(session_id, n, stream)
            index = extended_turn(conv.turns, messages, tools)
            if index is None:
                raise SessionError(400, f"session_id {session_id!r}: the messages do not extend its conversation: "
                                        f"{why_not_extended(conv.turns, messages, tools)}", SESSION_FIELD,
                                   "session_mismatch")
            in_place = index == len(conv.turns) - 1
            if in_place and conv.busy:
                raise self._busy(conv)
            return self._continue(conv, index, messages, tools, record=True, in_place=in_place, strict=True)
        if self.config.enabled:
            found = self._match_messages(messages, tools)
            if found is not None:
                conv, index = found
                in_place = record and index == len(conv.turns) - 1 and not conv.busy
                with contextlib.suppress(TemplateMismatch):
                    return self._continue(conv, index, messages, tools, record=record, in_place=in_place,
                                          strict=False)
        ids = self._render_fresh(messages, tools)
        conv = self._match_tokens(ids) if record else None
        if conv is not None:
            return ChatTurn(ids, ids[len(conv.token_ids):], messages, tools, conversation=conv)
        return ChatTurn(ids, ids, messages, tools, record=record)

    def _prepare_tokens(self, prompt_ids: list[int], session_id: str | None, n: int, stream: bool) -> ChatTurn:
        record = self._records(n, stream) and self.config.completions
        if session_id is not None:
            if not self.config.completions:
                raise SessionError(400, "session_id: sessions on /v1/completions are disabled on this server",
                                   SESSION_FIELD)
            conv = self._explicit(session_id, n, stream)
            if prompt_ids[:len(conv.token_ids)] == conv.token_ids:
                if conv.busy:
                    raise self._busy(conv)
                return ChatTurn(prompt_ids, prompt_ids[len(conv.token_ids):], None, None, conversation=conv)
            if any(prompt_ids[:t.num_tokens] == conv.token_ids[:t.num_tokens] for t in conv.turns):
                return ChatTurn(prompt_ids, prompt_ids, None, None)    # extends an earlier turn: a branch
            at = next(i for i, (a, b) in enumerate(zip(prompt_ids + [-1], conv.token_ids)) if a != b)
            raise SessionError(400, f"session_id {session_id!r}: the prompt does not start with the exact tokens of "
                                    f"any turn of its conversation (it differs at token {at})", SESSION_FIELD,
                               "session_mismatch")
        conv = self._match_tokens(prompt_ids) if record else None
        if conv is not None:
            return ChatTurn(prompt_ids, prompt_ids[len(conv.token_ids):], None, None, conversation=conv)
        return ChatTurn(prompt_ids, prompt_ids, None, None, record=record)

    def _render_fresh(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        try:
            return self.template.prompt_ids(messages, tools)
        except Exception as e:  # noqa: BLE001 - a template that refuses the messages (jinja raise_exception)
            raise SessionError(400, f"the chat template refused the messages: {type(e).__name__}: {e}",
                               "messages") from None

    def _continue(self, conv: Conversation, index: int, messages: list[dict], tools: list[dict] | None, *,
                  record: bool, in_place: bool, strict: bool) -> ChatTurn:
        """The request's prompt after turn ``index`` of ``conv``: its exact tokens + the new messages' tokens."""
        state = conv.turns[index]
        try:
            text = self.template.continuation_text(state, messages[len(state.messages):])
        except TemplateMismatch as e:
            if strict:
                raise SessionError(400, f"session_id {conv.id!r}: {e}", SESSION_FIELD, "session_mismatch") from None
            raise
        except Exception as e:  # noqa: BLE001 - a template that refuses the messages
            raise SessionError(400, f"the chat template refused the messages: {type(e).__name__}: {e}",
                               "messages") from None
        new_ids = self.template.encode(text)
        prompt = conv.token_ids[:state.num_tokens] + new_ids
        if in_place:
            return ChatTurn(prompt, new_ids, messages, tools, conversation=conv)
        return ChatTurn(prompt, prompt, messages, tools, record=record)   # a branch, a fork, or n > 1

    def _match_messages(self, messages: list[dict], tools: list[dict] | None) -> tuple[Conversation, int] | None:
        """The recorded turn whose messages are the longest proper prefix of the request's: a conversation's
        latest turn when it is idle (continued in place), else the most recent such turn (a branch or fork)."""
        keys = prefix_keys(tools, messages)
        for i in range(len(messages) - 1, 0, -1):
            found = [(c, j) for c, j in self._by_messages.get(keys[i], ())
                     if c.turns[j].tools == tools and c.turns[j].messages == messages[:i]]
            if found:
                return next(((c, j) for c, j in reversed(found) if j == len(c.turns) - 1 and not c.busy), found[-1])
        return None

    def _match_tokens(self, prompt_ids: list[int]) -> Conversation | None:
        """The idle conversation with the longest exact context that ``prompt_ids`` starts with."""
        return next((c for c, _ in self._by_tokens.prefixes_of(prompt_ids) if not c.busy), None)

    # ---------------------------------------------------------------- recording
    def commit(self, turn: ChatTurn, t: Trajectory, message: dict[str, Any] | None) -> str | None:
        """Record the answer (``message``: the chat response's, OpenAI's shape; None for /v1/completions) with the
        sample's exact tokens; -> the conversation's session_id (None when the turn is not recorded)."""
        if not turn.record or turn.committed:
            return turn.session_id if turn.committed else None
        conv = turn.conversation
        messages = None
        if turn.messages is not None:   # the shape a client sends it back in, as the template reads it
            messages = self._shared(conv, turn.messages) + [ChatMessage.model_validate(message).template_dict()]
        tokens = turn.prompt_ids + list(t.token_ids)
        if conv is None:
            conv = Conversation(id=turn.session_id, token_ids=[], engine_session=turn.opened_session)
            turn.opened_session = None                     # the record owns it now
            self._conversations[conv.id] = conv
        else:
            self._by_tokens.remove(conv, conv.token_key)
            self._num_tokens -= len(conv.token_ids)
        key = prefix_keys(turn.tools, messages)[-1] if messages is not None else None
        conv.turns.append(TurnState(turn.tools, messages, len(tokens), tokens[-1], self.template.ended_turn(t), key))
        if key is not None:
            self._by_messages.setdefault(key, []).append((conv, len(conv.turns) - 1))
        conv.token_ids = tokens
        conv.token_key = self._by_tokens.add(conv, tokens)
        self._num_tokens += len(tokens)
        conv.last_used = self.clock()
        self._conversations.move_to_end(conv.id)
        turn.committed = True
        self._make_room(keep=conv)
        return conv.id

    @staticmethod
    def _shared(conv: Conversation | None, messages: list[dict]) -> list[dict]:
        """``messages`` (a copy), its prefix the previous turn's very message dicts when they are equal: every turn
        keeps its messages (for branching), so a long conversation holds each message once, not once per turn."""
        prev = conv.state.messages if conv is not None else None
        if prev is not None and messages[:len(prev)] == prev:
            return prev + messages[len(prev):]
        return list(messages)

    async def close(self, session_id: str) -> None:
        """Forget the conversation now and free its backend session's KV (awaited). 404 gone, 409 busy."""
        self._expire()
        conv = self._explicit(session_id, 1, False)
        if conv.busy:
            raise self._busy(conv)
        engine_session, conv.engine_session = conv.engine_session, None
        self._forget(conv, "closed")
        if engine_session is not None:
            with contextlib.suppress(RolloutError):        # already gone (TTL, dead worker): nothing to free
                await self.backend.close_session(engine_session)

    # ---------------------------------------------------------------- bounds
    def _expire(self) -> None:
        """Forget idle conversations past their TTL (before a request is matched)."""
        now = self.clock()
        for conv in list(self._conversations.values()):
            if not conv.busy and now - conv.last_used > self.config.ttl_s:
                self._forget(conv, "expired")

    def _make_room(self, keep: Conversation) -> None:
        """Forget the least recently used idle conversations while over either bound (never ``keep``, never one
        a turn is running in)."""
        for conv in list(self._conversations.values()):
            if (len(self._conversations) <= self.config.max_conversations
                    and self._num_tokens <= self.config.max_tokens):
                break
            if conv is not keep and not conv.busy:
                self._forget(conv, "evicted")

    def _forget(self, conv: Conversation, why: str) -> None:
        self._conversations.pop(conv.id, None)
        for j, state in enumerate(conv.turns):
            same = self._by_messages.get(state.key, [])
            same[:] = [(c, i) for c, i in same if not (c is conv and i == j)]
            if not same:
                self._by_messages.pop(state.key, None)
        self._by_tokens.remove(conv, conv.token_key)
        self._num_tokens -= len(conv.token_ids)
        self._gone[conv.id] = why
        while len(self._gone) > GONE_MEMORY:
            self._gone.popitem(last=False)
        self._drop_session(conv)
