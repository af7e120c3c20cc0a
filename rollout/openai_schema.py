"""Request bodies of the OpenAI-compatible HTTP front end (``rollout.http_server``), validated with pydantic,
and the OpenAI error format.

Strict on purpose: wrong JSON types are refused, never coerced (``"1"`` is not an int, ``1.0`` is not an int,
``true`` is not a number), and unknown fields are refused with their name (STYLE.md: no silently dropped typos).
Fields OpenAI defines that this server does not serve (``echo``, penalties, ``response_format``, ...)
are refused by name with a 400 rather than ignored. What each field means: docs/openai.md.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_TOP_LOGPROBS = 20     # OpenAI's cap for chat top_logprobs (the ZeroMQ protocol's max_logprobs too)

# Roles the chat template is given; "tool" messages carry a tool's result, assistant messages may carry tool_calls.
Role = Literal["system", "user", "assistant", "tool"]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    """``stream_options`` (only with ``stream: true``)."""
    include_usage: bool = False                # a last chunk with ``usage`` and no choices


class _SamplingFields(_Strict):
    """Fields both endpoints share. OpenAI's defaults: temperature 1, top_p 1, n 1."""
    model: str
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Optional[str] = None                 # accepted (clients send it) and not used
    # Extensions (vLLM's names): token ids that end a sample ("stop", the id included in token_ids), and a
    # response carrying the prompt's token ids and each choice's generated ids and their policy versions.
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False


class TextPart(_Strict):
    """The only content part this increment renders (images, audio: not supported)."""
    type: Literal["text"]
    text: str


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None   # a JSON schema object; passed to the chat template as is
    strict: Optional[bool] = None                 # accepted; output is not constrained to the schema


class Tool(_Strict):
    """An OpenAI function tool of a request's ``tools``."""
    type: Literal["function"]
    function: FunctionDefinition


class ToolCallFunction(_Strict):
    name: str = Field(min_length=1)
    arguments: str                                # a JSON object, as a string (OpenAI's wire format)


class ToolCall(_Strict):
    """A call in an assistant message's ``tool_calls`` (what this server returned on an earlier turn)."""
    id: str
    type: Literal["function"]
    function: ToolCallFunction

    def template_dict(self) -> dict[str, Any]:
        """The shape HF chat templates read: ``function.arguments`` as a dict (Qwen2.5's template writes it with
        ``tojson``, others iterate its items), so the call renders as the model wrote it."""
        try:
            arguments = json.loads(self.function.arguments)
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise ValueError(f"tool call {self.id!r}: function.arguments must be a JSON object (as a string), "
                             f"got {self.function.arguments!r}")
        return {"id": self.id, "type": "function", "function": {"name": self.function.name, "arguments": arguments}}


class ChatMessage(_Strict):
    role: Role
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None         # of a "tool" message: passed to the chat template as is
    tool_calls: Optional[list[ToolCall]] = None   # of an "assistant" message

    @model_validator(mode="after")
    def _tool_calls_only_on_assistant(self) -> "ChatMessage":
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls is only allowed on assistant messages, not {self.role!r}")
        return self

    def template_dict(self) -> dict[str, Any]:
        """The message as the chat template reads it (text parts joined into one string)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        d: dict[str, Any] = {"role": self.role, "content": content if content is not None else ""}
        if self.name is not None:
            d["name"] = self.name
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            d["tool_calls"] = [c.template_dict() for c in self.tool_calls]
        return d


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``. ``prompt``: a string, a list of token ids, or a list of either (a batch)."""
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: int = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # Extension: continue this conversation (the session_id of an earlier response; one prompt starting with its
    # exact tokens); without it a prompt starting with an earlier answer's exact tokens is matched automatically.
    session_id: str | None = Field(default=None, min_length=1)

    def prompts(self) -> list[Union[str, list[int]]]:
        """One entry per prompt of the batch. NOTE: ``[]`` is one empty token-id prompt (refused later)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and not isinstance(p[0], int):   # list[str] or list[list[int]]
            return list(p)
        return [p]


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``. Without max_completion_tokens / max_tokens the turn may run to the end of
    the model's context (OpenAI's behaviour)."""
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)              # deprecated by OpenAI, still sent
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)   # wins over max_tokens when both are sent
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[Tool]] = None
    # "auto" (the default with tools) or "none"; others ("required", a named function) are refused in the
    # handler with a clear "not supported yet".
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    # Extension: continue this conversation (the session_id of an earlier response) or fail; without it a
    # request extending an earlier answer is matched automatically (rollout.chat_sessions, docs/openai.md).
    session_id: str | None = Field(default=None, min_length=1)


def error_body(message: str, type_: str, param: Optional[str] = None, code: Optional[str] = None) -> dict[str, Any]:
    """OpenAI's error format (what the official client parses into ``APIStatusError.body``)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, Optional[str]]:
    """(message, param) of a pydantic / FastAPI validation failure: the first error, named by its field path."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if first.get("type") == "extra_forbidden":
        return f"unknown or unsupported field {'.'.join(loc)!r}", ".".join(loc) or None
    # Union members add their type name to the path (prompt.str, prompt.list[int].0): keep the field's name.
    param = loc[0] if loc else None
    where = ".".join(loc) if loc else "body"
    return f"{where}: {first.get('msg', 'invalid value')}", param
