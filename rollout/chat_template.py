"""The chat template at the session layer's edge (``rollout.chat_sessions``): rendering messages, and the text a
continuation appends after a conversation's exact tokens (``continuation_text``: glue + delta, docs/openai.md
"The new messages' tokens").

``TurnState`` is what a continuation is computed from: a conversation as it stood after one of its turns (its
messages, tools, and the last token of its exact context); ``extended_turn`` / ``why_not_extended`` say which of
a conversation's turns a request's messages extend (an explicit ``session_id``), or why none.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from rollout.trajectory import Trajectory


class TemplateMismatch(ValueError):
    """The chat template's rendering of the new messages cannot be placed after the recorded conversation."""


@dataclass(frozen=True)
class TurnState:
    """A conversation after one of its turns: the request it answered plus the answer, and where its tokens end."""
    tools: list[dict] | None        # as given to the template (None: no tools rendered)
    messages: list[dict] | None     # ending with the assistant message returned; None: a /v1/completions turn
    num_tokens: int                 # its exact context is the conversation's token_ids[:num_tokens]
    last_token: int                 # token_ids[num_tokens - 1]: the model's last sampled token
    ended_turn: bool                # the model ended its turn with an end-of-turn token it sampled
    key: str | None = None          # prefix_keys(tools, messages)[-1] (None without messages): its index entry


def prefix_keys(tools: list[dict] | None, messages: list[dict]) -> list[str]:
    """keys[i] identifies (tools, messages[:i]): a chained hash of canonical JSON, one per prefix."""
    h = hashlib.sha256(json.dumps(tools, sort_keys=True, ensure_ascii=False).encode())
    keys = [h.hexdigest()]
    for m in messages:
        h.update(b"\x00" + json.dumps(m, sort_keys=True, ensure_ascii=False).encode())
        keys.append(h.copy().hexdigest())
    return keys


def extended_turn(turns: list[TurnState], messages: list[dict], tools: list[dict] | None) -> int | None:
    """The latest of ``turns`` whose messages (and tools) the request's extend by at least one message."""
    for i in range(len(turns) - 1, -1, -1):
        t = turns[i]
        if (t.messages is not None and t.tools == tools and len(messages) > len(t.messages)
                and messages[:len(t.messages)] == t.messages):
            return i
    return None


def why_not_extended(turns: list[TurnState], messages: list[dict], tools: list[dict] | None) -> str:
    """Why the request's messages extend none of ``turns`` (measured against the latest chat turn)."""
    state = next((t for t in reversed(turns) if t.messages is not None), None)
    if state is None:
        return "its turns came from /v1/completions (continue it there, with its exact tokens)"
    if tools != state.tools:
        return "tools (or tool_choice) differ from the conversation's"
    k = len(state.messages)
    if len(messages) <= k:
        return (f"it has {k} messages (the last one the assistant's answer); send them plus at least one "
                f"new message, got {len(messages)}")
    for i, (got, want) in enumerate(zip(messages, state.messages)):
        if got != want:
            what = "the assistant message this server returned" if i == k - 1 else "the message sent earlier"
            return f"messages[{i}] ({got.get('role')}) differs from {what}"
    return ""


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

    def continuation_text(self, state: TurnState, new_messages: list[dict]) -> str:
        """The text appended after the exact tokens of ``state`` for ``new_messages``: glue + delta (see
        rollout.chat_sessions).

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
        tools, prev_messages = state.tools, state.messages
        assert prev_messages, "a continuation by messages needs the state's messages"
        prev = self.render(prev_messages, tools, generation_prompt=False)
        full = self.render(prev_messages + new_messages, tools, generation_prompt=True)
        head = self.render(prev_messages[:-1], tools, generation_prompt=True)
        assistant = prev.removeprefix(head)
        eos = getattr(self.tokenizer, "eos_token", None) or ""
        sampled = self.tokenizer.decode([state.last_token], skip_special_tokens=False) if state.ended_turn else ""
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
