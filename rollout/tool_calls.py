"""Tool calls in generated text: the Hermes / Qwen format (docs/openai.md).

    <tool_call>
    {"name": "add", "arguments": {"a": 1, "b": 2}}
    </tool_call>

``parse_tool_calls`` finds every such block. All-or-nothing: when a block's JSON does not parse, or is not an
object with a non-empty string ``name`` and an object ``arguments``, the whole text is plain content (a model's
malformed call is returned as text for the caller to see, never a server error).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Optional

TOOL_CALL_OPEN = "<tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ParsedToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ParsedText:
    content: Optional[str]             # the text outside the blocks, stripped; None when empty
    tool_calls: list[ParsedToolCall]   # empty: the text had no (well-formed) tool call; content is the whole text


def _one_call(inner: str) -> Optional[ParsedToolCall]:
    try:
        obj = json.loads(inner)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    name, arguments = obj.get("name"), obj.get("arguments", {})
    if isinstance(arguments, str):     # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return ParsedToolCall(name, arguments)


def parse_tool_calls(text: str) -> ParsedText:
    """The tool calls of ``text`` and the text around them (see the module docstring)."""
    calls, outside, pos = [], [], 0
    for m in _BLOCK.finditer(text):
        call = _one_call(m.group(1))
        if call is None:
            return ParsedText(text, [])
        calls.append(call)
        outside.append(text[pos:m.start()])
        pos = m.end()
    if not calls:
        return ParsedText(text, [])
    outside.append(text[pos:])
    content = "".join(outside).strip()
    return ParsedText(content or None, calls)


def text_outside_calls(text: str) -> str:
    """The text around the blocks, not stripped: a streamed choice's content, whose strip is ``content``."""
    return _BLOCK.sub("", text)


def openai_tool_calls(calls: list[ParsedToolCall]) -> list[dict[str, Any]]:
    """OpenAI's ``message.tool_calls``: ``arguments`` as a JSON string, a fresh ``call_<hex>`` id each."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
            for c in calls]


def chat_message(text: str, finish_reason: str, use_tools: bool) -> tuple[dict[str, Any], str]:
    """A chat choice's assistant message and finish_reason: with tools, the calls parsed out of ``text`` (all or
    nothing: ``parse_tool_calls``) and ``"tool_calls"``; otherwise the text as content and the engine's reason."""
    if use_tools:
        parsed = parse_tool_calls(text)
        if parsed.tool_calls:
            return ({"role": "assistant", "content": parsed.content,
                     "tool_calls": openai_tool_calls(parsed.tool_calls)}, "tool_calls")
    return {"role": "assistant", "content": text}, finish_reason
