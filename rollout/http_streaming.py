"""``stream: true``: Server-Sent Events for /v1/chat/completions and /v1/completions (docs/openai.md, Streaming).

    sessions.stream (per prompt: backend.step_session_stream or generate_stream; the engine loop's deltas after
    every step, from this process or a Ray worker) --SampleDelta-->
      merge (one pump task per prompt) --> per choice: ChoiceText (incremental text, stop strings held back)
      --> "data: {chunk}\\n\\n" ... "data: [DONE]\\n\\n"

The first delta is awaited before the response starts, so an error the backend raises at once (a token id outside
the vocabulary, a prompt over the context) is an ordinary HTTP error; a later one is an ``error`` event (the
``openai`` client raises it) and the stream ends without ``[DONE]``. A client that disconnects cancels the pumps:
the backend stream closes, the engine aborts the request and frees its KV.

Sessions: a recorded turn (n = 1) is committed when its final delta arrives, before its last chunk is sent; chat
chunks carry the conversation's ``session_id`` at the top level, completions chunks in each choice. A stream
that fails or is cut before that leaves the conversation as it was (``ChatSessions.end``).

Text: each choice's tokens are detokenized incrementally (``engine.stop_strings.StopStringDetector``: the engine's
own scheme, seeded with the prompt's last tokens when there are stop strings, as the engine does). Text that may
be the start of a stop string (or of a ``<tool_call>`` block, with tools) is held back until it cannot be; the
last chunk of a choice completes its text to exactly the non-streamed response's text.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import StreamingResponse

from engine.sampling import SamplingParams
from engine.stop_strings import StopStringDetector
from rollout.backend import RolloutError
from rollout.loop_streams import SampleDelta
from rollout.openai_render import usage
from rollout.session_turns import cached_prompt_tokens
from rollout.tool_calls import TOOL_CALL_OPEN, chat_message, text_outside_calls

logger = logging.getLogger(__name__)
_END = object()


def partial_stop_len(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of ``text`` that is the start of some stop string (shorter than it)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class ChoiceText:
    """One choice's streamed text. ``feed`` -> the text that may be sent now; ``finish`` -> the rest of the
    response's final text. ``marker``: once it appears, nothing more is sent before ``finish`` (tool calls)."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], context: list[int], marker: str | None) -> None:
        # NOTE: the engine seeds its detector with the prompt only for stop strings; without, the text is a plain
        # decode of the output (what the non-streamed response returns), so no context here either.
        self._detector = StopStringDetector(tokenizer, stop, False, context if stop else ())
        self._hold = stop + ((marker,) if marker else ())
        self._marker = marker
        self._read = 0            # characters of the detector's text read
        self._held = ""           # read and not sent (may start a stop string or the marker)
        self._sent: list[str] = []
        self._closed = False      # the marker appeared

    def feed(self, token_ids: list[int]) -> str:
        if self._closed or self._detector.matched:
            return ""
        self._detector.feed(token_ids)
        new = self._detector.text_from(self._read)
        self._read += len(new)
        pending = self._held + new
        if self._detector.matched:    # the engine ends the sample on this token: finish() settles the text
            self._held = pending
            return ""
        if self._marker and self._marker in pending:
            cut = pending.index(self._marker)
            self._closed = True
        else:
            cut = len(pending) - partial_stop_len(pending, self._hold)
        out, self._held = pending[:cut], pending[cut:]
        if out:
            self._sent.append(out)
        return out

    def finish(self, final_text: str) -> str:
        sent = "".join(self._sent)
        if not final_text.startswith(sent):   # never seen; the text sent cannot be taken back
            logger.warning("streamed text %r is not a prefix of the final text %r", sent[-40:], final_text[:80])
        return final_text[len(sent):]


class SSEResponse(StreamingResponse):
    """An event stream that ends its iterator when the client disconnects (also while it waits for the engine,
    not only on the next send) and calls ``on_close`` once, however it ends."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        async def client_gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
        streaming = asyncio.ensure_future(self.stream_response(send))
        gone = asyncio.ensure_future(client_gone())
        try:
            await asyncio.wait({streaming, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, gone):
                task.cancel()
            results = await asyncio.gather(streaming, gone, return_exceptions=True)
            await self.body_iterator.aclose()
            self._on_close()
        if isinstance(results[0], Exception) and not isinstance(results[0], OSError):  # OSError: client gone
            raise results[0]


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def merge(streams: list[AsyncIterator[SampleDelta]]) -> AsyncIterator[tuple[int, SampleDelta]]:
    """(prompt index, delta) from every stream as they come; the first error is raised. Closing this
    iterator cancels every pump, which closes its stream (the backend aborts the request)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[SampleDelta]) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((i, delta))
            queue.put_nowait((i, _END))
        except Exception as e:  # noqa: BLE001 - handed to the reader
            queue.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    open_streams = len(tasks)
    try:
        while open_streams:
            i, item = await queue.get()
            if item is _END:
                open_streams -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class _Choice:
    text: ChoiceText
    started: bool = False
    text_offset: int = 0      # completions' logprobs.text_offset of the next token
    num_tokens: int = 0


@dataclass
class StreamPlan:
    """What one streamed request needs, prepared (and validated) by the front end."""
    chat: bool
    turns: list[Any]           # rollout.chat_sessions.ChatTurn, one per prompt (begun; the stream commits them)
    params: SamplingParams
    logprobs: bool             # chat: logprobs: true; completions: logprobs given
    return_token_ids: bool
    include_usage: bool
    use_tools: bool = False
    choices: dict[int, _Choice] = field(default_factory=dict)
    cached_tokens: int = 0     # prompt tokens not prefilled (session KV, prefix cache), from the final deltas

    @property
    def prompts(self) -> list[list[int]]:
        return [t.prompt_ids for t in self.turns]


async def open_stream(front: Any, plan: StreamPlan, on_close: Callable[[], None]) -> SSEResponse:
    """Start the backend streams and wait for the first delta (errors so far are raised as RolloutError, before
    the response starts); -> the event stream. ``on_close`` runs once when the stream ends, however it ends."""
    deltas = merge([front.sessions.stream(turn, plan.params) for turn in plan.turns])
    try:
        first = await deltas.__anext__()
    except BaseException:
        await deltas.aclose()
        raise
    return SSEResponse(_events(front, plan, first, deltas), on_close)


async def _events(front: Any, plan: StreamPlan, first: tuple[int, SampleDelta],
                  deltas: AsyncIterator[tuple[int, SampleDelta]]) -> AsyncIterator[str]:
    chat, n = plan.chat, plan.params.n
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": front.config.model_name}
    if plan.include_usage:
        head["usage"] = None      # as OpenAI: every chunk but the last has usage null
    if chat and plan.turns[0].record:
        head["session_id"] = plan.turns[0].session_id    # the conversation this answer is recorded in
    marker = TOOL_CALL_OPEN if plan.use_tools else None
    for i, ids in enumerate(plan.prompts):
        for s in range(n):
            plan.choices[i * n + s] = _Choice(ChoiceText(front.renderer.tokenizer, plan.params.stop, ids, marker))

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return sse(dict(head, choices=choices, **extra))

    if chat:   # the role first, one chunk per choice (as OpenAI), the prompt's ids on the first
        for index in range(n):
            extra = {"prompt_token_ids": plan.prompts[0]} if plan.return_token_ids and index == 0 else {}
            yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}], **extra)
    # completions of one prompt: its ids at the top level too (as the non-streamed response), on the first chunk
    top_ids = {"prompt_token_ids": plan.prompts[0]} if not chat and plan.return_token_ids and len(plan.prompts) == 1 \
        else {}
    completion_tokens = 0
    try:
        async for prompt_index, d in _after(first, deltas):
            completion_tokens += len(d.token_ids)
            out = _choice_chunk(front, plan, prompt_index, d)
            if out is not None:
                yield chunk([out], **top_ids)
                top_ids = {}
    except RolloutError as e:
        err = front.api_error(e)
        yield sse({"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}})
        return
    except Exception as e:
        logger.exception("streaming failed")
        yield sse({"error": {"message": f"internal error: {type(e).__name__}", "type": "server_error",
                             "param": None, "code": None}})
        return
    finally:
        await deltas.aclose()
    prompt_tokens = sum(len(ids) for ids in plan.prompts)
    front.metrics.add_tokens(prompt_tokens, completion_tokens)
    if plan.include_usage:
        yield sse(dict(head, choices=[], usage=dict(usage(prompt_tokens, completion_tokens),
                                                    prompt_tokens_details={"cached_tokens": plan.cached_tokens})))
    yield "data: [DONE]\n\n"


async def _after(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


def _choice_chunk(front: Any, plan: StreamPlan, prompt_index: int, d: SampleDelta) -> dict[str, Any] | None:
    """The chunk choice of one delta (None: nothing to send yet)."""
    index = prompt_index * plan.params.n + d.sample_index
    state = plan.choices[index]
    render = front.renderer
    finish_reason, tool_calls = None, None
    if d.final is None:
        text = state.text.feed(d.token_ids)
    else:
        full = render.text(d.final)
        message, finish_reason = chat_message(full, d.final.finish_reason, plan.use_tools) if plan.chat \
            else (None, d.final.finish_reason)
        if finish_reason == "tool_calls":
            tool_calls = [dict(call, index=k) for k, call in enumerate(message["tool_calls"])]
            full = text_outside_calls(full)
        text = state.text.finish(full)
        _settle(front, plan, prompt_index, d, message)
    state.num_tokens += len(d.token_ids)
    if d.final is None and not text and not plan.logprobs and not plan.return_token_ids:
        return None
    out: dict[str, Any] = {"index": index}
    if plan.chat:
        delta: dict[str, Any] = {"content": text} if text else {}
        if tool_calls:
            delta["tool_calls"] = tool_calls
        out["delta"] = delta
        out["logprobs"] = render.chat_logprobs(d.token_ids, d.logprobs, d.top_logprobs) if plan.logprobs else None
    else:
        out["text"] = text
        if plan.logprobs:
            out["logprobs"], state.text_offset = render.completion_logprobs(d.token_ids, d.logprobs, d.top_logprobs,
                                                                            state.text_offset)
        else:
            out["logprobs"] = None
    out["finish_reason"] = finish_reason
    turn = plan.turns[prompt_index]
    if not plan.chat and turn.record:
        out["session_id"] = turn.session_id
    if plan.return_token_ids:
        if not plan.chat and not state.started:
            out["prompt_token_ids"] = plan.prompts[prompt_index]
        out["token_ids"] = list(d.token_ids)
        out["versions"] = list(d.versions)
    state.started = True
    return out


def _settle(front: Any, plan: StreamPlan, prompt_index: int, d: SampleDelta, message: dict[str, Any] | None) -> None:
    """A sample's final delta: count its cached prompt tokens; a recorded turn (one sample) is committed and
    ended now, before its last chunk is sent, so a client that reads the answer and sends the next turn at once
    finds the conversation recorded and idle."""
    turn = plan.turns[prompt_index]
    if d.sample_index == 0:
        plan.cached_tokens += cached_prompt_tokens(turn.prompt_ids, [d.final])
    if turn.record:
        front.sessions.commit(turn, d.final, message)
        front.sessions.end(turn)
