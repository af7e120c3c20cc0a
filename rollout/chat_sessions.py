"""Token-exact chat sessions for ``/v1/chat/completions`` (docs/openai.md, "Sessions").

A chat request whose messages extend a conversation this server answered earlier (the same messages, the
assistant message it returned, then new messages) continues from the exact tokens of that conversation — the
model's own output is never re-tokenized — in the backend session that holds its KV, so only the new messages
are prefilled.

    request messages:  m_0 .. m_{k-1}  a_k            s_1 .. s_j
                       \\_____ recorded conversation _/ \\_ new _/
    context tokens:    T (exact, recorded: prompts + model tokens)  ++  encode(glue + delta)

``delta`` is the text the chat template renders for the new messages after the recorded ones (rendering of all
messages with the generation prompt, cut where the recorded messages' rendering ends); ``glue`` is the part of
the template's end of the previous assistant turn that the model did not sample (ChatML: the ``\\n`` after
``<|im_end|>``; the whole ``<|im_end|>\\n`` when the turn was cut by max_tokens). ``continuation_text`` has the
rule, including templates that rewrite earlier turns.

One owner: ``ChatSessions`` holds every conversation record and runs on the server's asyncio loop only (no
locks: nothing here awaits while it reads or changes a record, except the backend calls of a turn, during
which the record is marked busy).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from engine.sampling import SamplingParams
from rollout.backend import ErrorCode, RolloutBackend, RolloutError
from rollout.openai_schema import ChatMessage
from rollout.trajectory import Trajectory

SESSION_FIELD = "session_id"   # the request's and the response's extension field


@dataclass(frozen=True)
class SessionConfig:
    enabled: bool = True              # False: every chat request is a fresh render (no records, no sessions)
    ttl_s: float = 600.0              # an idle conversation older than this is forgotten and its session closed
    max_conversations: int = 1024     # past this, the least recently used idle conversation is forgotten

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise TypeError(f"SessionConfig.enabled must be a bool, got {self.enabled!r}")
        if isinstance(self.ttl_s, bool) or not isinstance(self.ttl_s, (int, float)) or not self.ttl_s > 0:
            raise ValueError(f"SessionConfig.ttl_s must be a number > 0, got {self.ttl_s!r}")
        if (isinstance(self.max_conversations, bool) or not isinstance(self.max_conversations, int)
                or self.max_conversations < 1):
            raise ValueError(f"SessionConfig.max_conversations must be an int >= 1, got {self.max_conversations!r}")


class SessionError(Exception):
    """A chat request refused by the session layer; the front end answers it in OpenAI's error format."""

    def __init__(self, status: int, message: str, param: str | None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class TemplateMismatch(ValueError):
    """The chat template's rendering of the new messages cannot be placed after the recorded conversation."""


@dataclass
class Conversation:
    id: str                             # public: the response's session_id
    tools: list[dict] | None         # as given to the template (None: no tools rendered)
    messages: list[dict]                # template dicts, ending with the assistant message this server returned
    token_ids: list[int]                # the exact context: every prompt and model token so far, in order
    ended_turn: bool                    # the last model turn ended with an end-of-turn token it sampled
    engine_session: str | None       # the backend session holding its KV; None: gone, re-prefill token_ids
    key: str = ""                       # prefix_keys(tools, messages)[-1]: its entry in ChatSessions._index
    last_used: float = 0.0
    busy: bool = False                  # a turn is running: the record is not changed by anyone else


@dataclass
class ChatTurn:
    """One chat request's prompt, as ``ChatSessions.turn`` prepared it."""
    prompt_ids: list[int]               # the whole context the model continues from
    new_token_ids: list[int]            # what this turn appends to ``conversation`` (all of prompt_ids if fresh)
    messages: list[dict]
    tools: list[dict] | None
    conversation: Conversation | None = None   # continued in place (held busy); None: a new conversation
    record: bool = True                 # False: n > 1 or sessions disabled; nothing is remembered
    session_id: str | None = None       # set by commit: the conversation the response belongs to
    opened_session: str | None = None   # the backend session opened for a new conversation, until commit
    stepped: bool = False               # a backend turn was started: the conversation's KV may have moved on


def prefix_keys(tools: list[dict] | None, messages: list[dict]) -> list[str]:
    """keys[i] identifies (tools, messages[:i]): a chained hash of canonical JSON, one per prefix."""
    h = hashlib.sha256(json.dumps(tools, sort_keys=True, ensure_ascii=False).encode())
    keys = [h.hexdigest()]
    for m in messages:
        h.update(b"\x00" + json.dumps(m, sort_keys=True, ensure_ascii=False).encode())
        keys.append(h.copy().hexdigest())
    return keys


def _nth_end(text: str, needle: str, n: int) -> int | None:
    """The index just after the n-th (1-based) occurrence of ``needle`` in ``text``; None if it has fewer."""
    at = -1
    for _ in range(n):
        at = text.find(needle, at + 1)
        if at < 0:
            return None
    return at + len(needle)


class ChatTemplate:
    """Renders messages with the tokenizer's chat template and computes what a continuation appends."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())

    def render(self, messages: list[dict], tools: list[dict] | None, generation_prompt: bool) -> str:
        kwargs = {} if tools is None else {"tools": tools}
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                  **kwargs)

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        from engine.smollm2 import chat_prompt_ids
        return chat_prompt_ids(self.tokenizer, messages, tools)

    def ended_turn(self, t: Trajectory) -> bool:
        """Whether the model closed its turn itself: it stopped on a special token it sampled (EOS, <|im_end|>)."""
        return t.finish_reason == "stop" and bool(t.token_ids) and t.token_ids[-1] in self._special_ids

    def continuation_text(self, conv: Conversation, new_messages: list[dict]) -> str:
        """The text appended after ``conv.token_ids`` for ``new_messages``: glue + delta (module docstring).

        prev = render(recorded messages), full = render(recorded + new, generation prompt).
        - The end of the last assistant turn as the template writes it ("closing"): from the last occurrence,
          in that turn's rendering, of the token the model ended with (or of the tokenizer's EOS text when the
          model did not end its turn, or ended it on a token the template does not close turns with) to the end
          of ``prev``. Glue = the part of it the model did not sample.
          A template whose assistant turns do not end with that token: no glue.
        - Delta = full[cut:]. Usually full starts with prev and cut = len(prev). A template that rewrites earlier
          turns when more follow (Qwen3 drops earlier <think> blocks) breaks that; then cut = the end of the
          same number of closings in ``full`` as ``prev`` holds: the rewrite may change what earlier turns
          say, not how many turns end before the new messages. The rewritten text itself is never used:
          those turns' tokens are the recorded ones, as the model saw and produced them.
        Raises TemplateMismatch when the new rendering cannot be aligned (no closing found to count)."""
        tools, prev_messages = conv.tools, conv.messages
        prev = self.render(prev_messages, tools, generation_prompt=False)
        full = self.render(prev_messages + new_messages, tools, generation_prompt=True)
        head = self.render(prev_messages[:-1], tools, generation_prompt=True)
        assistant = prev.removeprefix(head)
        eos = getattr(self.tokenizer, "eos_token", None) or ""
        sampled = self.tokenizer.decode([conv.token_ids[-1]], skip_special_tokens=False) if conv.ended_turn else ""
        # NOTE: a model that ended on another special token than the template's closer (<|endoftext|> where
        # ChatML closes with <|im_end|>) did not close its turn as the template does: close it, as after max_tokens.
        ended = bool(sampled) and sampled in assistant
        marker = sampled if ended else eos
        at = assistant.rfind(marker) if marker else -1
        closing = assistant[at:] if at >= 0 else ""
        glue = closing[len(marker):] if ended else closing
        if full.startswith(prev):
            cut = len(prev)
        else:
            cut = _nth_end(full, closing, prev.count(closing)) if closing else None
            if cut is None:
                raise TemplateMismatch("the chat template renders the earlier messages differently once new ones "
                                       "follow, and its turns cannot be aligned (no end-of-turn text to count)")
        return glue + full[cut:]

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))


class ChatSessions:
    """The conversations this server answered, matched against new chat requests (see the module docstring).

    Matching: explicit (``session_id``: that conversation or a 400 naming the field; busy: 409) or automatic
    (the conversation whose recorded messages, tools included, are the longest proper prefix of the request's;
    busy: the request forks it — a new conversation starting from a copy of its exact tokens). No match: a
    fresh conversation, rendered in full. n > 1 is never recorded (the engine samples a session turn once):
    with a match its samples continue from the conversation's exact tokens, which stays as it was."""

    def __init__(self, backend: RolloutBackend, tokenizer: Any, config: SessionConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self.template = ChatTemplate(tokenizer)
        self.config = config
        self.clock = clock
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()   # by id, least recently used first
        # by key; several when the same messages were answered alike (a fork, a retry), most recent last
        self._index: dict[str, list[Conversation]] = {}
        self._closing: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self._conversations)

    def get(self, session_id: str) -> Conversation | None:
        return self._conversations.get(session_id)

    # ---------------------------------------------------------------- one request
    @contextlib.asynccontextmanager
    async def turn(self, messages: list[dict], tools: list[dict] | None, session_id: str | None,
                   n: int) -> AsyncIterator[ChatTurn]:
        """Prepare the request's prompt; the conversation it continues is held busy until the block ends.
        ``commit`` inside the block records the answer; an exception leaves every record as it was."""
        self._expire()
        turn = self._prepare(messages, tools, session_id, n)
        conv = turn.conversation
        if conv is not None:
            conv.busy = True
        try:
            yield turn
        except BaseException:
            if turn.session_id is None:                    # not committed: the record stays as it was
                if turn.opened_session is not None:
                    self._close_later(turn.opened_session)
                if conv is not None and turn.stepped:      # its session holds a turn the record does not
                    self._drop_session(conv)
            raise
        finally:
            if conv is not None:
                conv.busy = False
                conv.last_used = self.clock()

    def _prepare(self, messages: list[dict], tools: list[dict] | None, session_id: str | None,
                 n: int) -> ChatTurn:
        record = self.config.enabled and n == 1
        if session_id is not None:
            if not self.config.enabled:
                raise SessionError(400, "session_id: sessions are disabled on this server", SESSION_FIELD)
            if n != 1:
                raise SessionError(400, f"n must be 1 with session_id (a session continues one sample), got {n}",
                                   "n")
            conv = self._conversations.get(session_id)
            if conv is None:
                raise SessionError(400, f"session_id {session_id!r}: no such conversation (never answered here, "
                                        "or expired)", SESSION_FIELD, "session_not_found")
            why = self._why_not_extended(conv, messages, tools)
            if why:
                raise SessionError(400, f"session_id {session_id!r}: the messages do not extend its conversation: "
                                        f"{why}", SESSION_FIELD, "session_mismatch")
            if conv.busy:
                raise SessionError(409, f"session_id {session_id!r}: a turn of this conversation is already "
                                        "running; send the next one after its answer", SESSION_FIELD, "session_busy")
            return self._continue(conv, messages, tools, record=True, strict=True)
        conv = self._match(messages, tools) if self.config.enabled else None
        if conv is not None:
            try:
                turn = self._continue(conv, messages, tools, record=record, strict=False)
            except TemplateMismatch:
                turn = None
            if turn is not None:
                if conv.busy and record:                   # fork: a new conversation from a copy of its tokens
                    turn.conversation, turn.new_token_ids = None, turn.prompt_ids
                return turn
        ids = self._render_fresh(messages, tools)
        return ChatTurn(prompt_ids=ids, new_token_ids=ids, messages=messages, tools=tools, record=record)

    def _render_fresh(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        try:
            return self.template.prompt_ids(messages, tools)
        except Exception as e:  # noqa: BLE001 - a template that refuses the messages (jinja raise_exception)
            raise SessionError(400, f"the chat template refused the messages: {type(e).__name__}: {e}",
                               "messages") from None

    def _continue(self, conv: Conversation, messages: list[dict], tools: list[dict] | None, *, record: bool,
                  strict: bool) -> ChatTurn:
        new_messages = messages[len(conv.messages):]
        try:
            text = self.template.continuation_text(conv, new_messages)
        except TemplateMismatch as e:
            if strict:
                raise SessionError(400, f"session_id {conv.id!r}: {e}", SESSION_FIELD, "session_mismatch") from None
            raise
        except Exception as e:  # noqa: BLE001 - a template that refuses the messages
            raise SessionError(400, f"the chat template refused the messages: {type(e).__name__}: {e}",
                               "messages") from None
        new_ids = self.template.encode(text)
        return ChatTurn(prompt_ids=conv.token_ids + new_ids, new_token_ids=new_ids, messages=messages, tools=tools,
                        conversation=conv if record else None, record=record)

    @staticmethod
    def _why_not_extended(conv: Conversation, messages: list[dict], tools: list[dict] | None) -> str:
        if tools != conv.tools:
            return "tools (or tool_choice) differ from the conversation's"
        k = len(conv.messages)
        if len(messages) <= k:
            return (f"it has {k} messages (the last one the assistant's answer); send them plus at least one "
                    f"new message, got {len(messages)}")
        for i, (got, want) in enumerate(zip(messages, conv.messages)):
            if got != want:
                what = "the assistant message this server returned" if i == k - 1 else "the message sent earlier"
                return f"messages[{i}] ({got.get('role')}) differs from {what}"
        return ""

    def _match(self, messages: list[dict], tools: list[dict] | None) -> Conversation | None:
        keys = prefix_keys(tools, messages)
        for i in range(len(messages) - 1, 0, -1):          # longest proper prefix first
            found = [c for c in self._index.get(keys[i], ()) if c.tools == tools and c.messages == messages[:i]]
            if found:   # the most recently used idle one; all busy: one to fork
                return next((c for c in reversed(found) if not c.busy), found[-1])
        return None

    # ---------------------------------------------------------------- the backend
    async def generate(self, turn: ChatTurn, params: SamplingParams) -> list[Trajectory]:
        """The turn's samples. Raises RolloutError; the conversation's record is unchanged then."""
        if not turn.record:
            return await self.backend.generate(turn.prompt_ids, params)
        turn.stepped = True
        conv = turn.conversation
        if conv is None:                                   # fresh (or forked): a new session, the whole context
            turn.opened_session = await self.backend.open_session(None, self.config.ttl_s)
            return [await self.backend.step_session(turn.opened_session, turn.prompt_ids, params)]
        try:
            if conv.engine_session is None:
                raise RolloutError(ErrorCode.UNKNOWN_SESSION, "its session was dropped")
            return [await self.backend.step_session(conv.engine_session, turn.new_token_ids, params)]
        except RolloutError as e:
            if e.code != ErrorCode.UNKNOWN_SESSION:
                self._drop_session(conv)
                raise
        except BaseException:
            self._drop_session(conv)                       # e.g. cancelled mid-turn: its KV holds a partial turn
            raise
        # The session is gone (expired by the engine's TTL, a dead worker): the tokens are still exact, only the
        # KV is recomputed (the prefix cache shares what it still holds).
        conv.engine_session = await self.backend.open_session(None, self.config.ttl_s)
        try:
            return [await self.backend.step_session(conv.engine_session, turn.prompt_ids, params)]
        except BaseException:
            self._drop_session(conv)
            raise

    def commit(self, turn: ChatTurn, t: Trajectory, message: dict[str, Any]) -> str | None:
        """Record the answer ``message`` (the response's, OpenAI's shape) with the sample's exact tokens; returns
        the conversation's session_id (None when the turn is not recorded)."""
        if not turn.record:
            return None
        # The shape a client sends it back in, as the template reads it (what matching compares).
        message = ChatMessage.model_validate(message).template_dict()
        tokens = turn.prompt_ids + list(t.token_ids)
        conv = turn.conversation
        if conv is None:
            self._make_room()
            conv = Conversation(id=f"chatsess-{uuid.uuid4().hex}", tools=turn.tools, messages=[], token_ids=[],
                                ended_turn=False, engine_session=turn.opened_session)
            turn.opened_session = None                     # the record owns it now
            self._conversations[conv.id] = conv
        else:
            self._unindex(conv)
        conv.messages = turn.messages + [message]
        conv.token_ids = tokens
        conv.ended_turn = self.template.ended_turn(t)
        conv.key = prefix_keys(conv.tools, conv.messages)[-1]
        conv.last_used = self.clock()
        self._index.setdefault(conv.key, []).append(conv)
        self._conversations.move_to_end(conv.id)
        turn.session_id = conv.id
        return conv.id

    # ---------------------------------------------------------------- bounds
    def _expire(self) -> None:
        """Forget idle conversations past their TTL (before a request is matched)."""
        now = self.clock()
        for conv in list(self._conversations.values()):
            if not conv.busy and now - conv.last_used > self.config.ttl_s:
                self._forget(conv)

    def _make_room(self) -> None:
        """Forget the least recently used idle conversations until one more fits (when a new one is recorded:
        never the one a request is continuing, which is busy until its commit)."""
        for conv in list(self._conversations.values()):
            if len(self._conversations) < self.config.max_conversations:
                break
            if not conv.busy:
                self._forget(conv)

    def _forget(self, conv: Conversation) -> None:
        self._conversations.pop(conv.id, None)
        self._unindex(conv)
        self._drop_session(conv)

    def _unindex(self, conv: Conversation) -> None:
        same = self._index.get(conv.key, [])
        if conv in same:
            same.remove(conv)
        if not same:
            self._index.pop(conv.key, None)

    def _drop_session(self, conv: Conversation) -> None:
        if conv.engine_session is not None:
            self._close_later(conv.engine_session)
            conv.engine_session = None

    def _close_later(self, engine_session: str) -> None:
        async def close() -> None:
            with contextlib.suppress(RolloutError):        # already gone (TTL, dead worker): nothing to free
                await self.backend.close_session(engine_session)
        task = asyncio.ensure_future(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


def cached_prompt_tokens(prompt_ids: list[int], samples: list[Trajectory]) -> int:
    """Prompt tokens whose KV was not computed for this request (a session's KV, the prefix cache): OpenAI's
    ``usage.prompt_tokens_details.cached_tokens``, from the first sample's count of prefilled tokens."""
    if not samples or "num_prefill_tokens" not in samples[0].metrics:
        return 0
    return max(0, len(prompt_ids) - int(samples[0].metrics["num_prefill_tokens"]))
