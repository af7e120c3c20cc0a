"""``OpenAIFrontEnd``: OpenAI request bodies -> token ids + ``SamplingParams`` -> the backend -> response bodies
(the routes are ``rollout.http_server``; streamed responses ``rollout.http_streaming``).

Every prompt goes through the session layer (``rollout.chat_sessions``): it may continue a recorded conversation
(its exact tokens and KV), and an answered n = 1 prompt is recorded for the next request to continue. A turn is
begun (``begin_chat`` / ``begin_tokens``), run (``generate`` or ``stream``), committed with its answer, and ended
— ended however the request ends, so a failure or a vanished client never leaves a conversation busy.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, Optional, Union

from engine.sampling import SamplingParams
from rollout.backend import RolloutBackend, RolloutError, gather_or_cancel
from rollout.chat_sessions import ChatSessions, ChatTurn, cached_prompt_tokens
from rollout.http_config import ApiError, HttpConfig, from_rollout_error
from rollout.http_metrics import HttpMetrics
from rollout.http_streaming import SSEResponse, StreamPlan, open_stream
from rollout.openai_render import Renderer, usage
from rollout.openai_schema import ChatCompletionRequest, CompletionRequest
from rollout.tool_calls import chat_message
from rollout.trajectory import Trajectory


class OpenAIFrontEnd:
    """Holds no engine state: the conversations (``sessions``), the metrics and the in-flight count only."""

    def __init__(self, backend: RolloutBackend, tokenizer: Any, config: HttpConfig) -> None:
        if tokenizer is None:
            raise ValueError("the HTTP front end needs the model's tokenizer (its directory has none)")
        self.backend = backend
        self.tokenizer = tokenizer
        self.renderer = Renderer(tokenizer)
        self.config = config
        self.created = int(time.time())
        self.metrics = HttpMetrics()
        self.sessions = ChatSessions(backend, tokenizer, config.sessions)
        self.in_flight = 0                # generation requests admitted and not answered (streams: not ended)

    def admit(self) -> Callable[[], None]:
        """Take an in-flight slot (429 when none is left); -> its release (idempotent)."""
        if self.in_flight >= self.config.max_in_flight:
            raise ApiError(429, f"the server has {self.in_flight} requests in flight, its limit "
                                f"(max_in_flight); retry later", "requests", code="rate_limit_exceeded")
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
        return release

    @staticmethod
    def api_error(e: RolloutError) -> ApiError:
        return from_rollout_error(e)

    async def _stream(self, plan: StreamPlan, on_close: Callable[[], None]) -> SSEResponse:
        """The event stream of ``plan``'s turns; they end when it ends (or here, when it cannot start)."""
        def closed() -> None:
            for turn in plan.turns:
                self.sessions.end(turn)
            on_close()
        try:
            return await open_stream(self, plan, closed)
        except BaseException as e:
            for turn in plan.turns:
                self.sessions.end(turn)
            if isinstance(e, RolloutError):
                raise from_rollout_error(e) from None
            raise

    # ---------------------------------------------------------------- checks shared by both endpoints
    def _check_common(self, req: Union[CompletionRequest, ChatCompletionRequest]) -> None:
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
        if req.stream and not hasattr(self.backend, "generate_stream"):
            raise ApiError(400, f"stream: true needs a backend that streams tokens; {type(self.backend).__name__} "
                                "does not", param="stream")
        if req.model != self.config.model_name:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves "
                                f"{self.config.model_name!r}", param="model", code="model_not_found")
        if req.n > self.config.limits.max_n:
            raise ApiError(400, f"n must be at most {self.config.limits.max_n}", param="n")

    def _params(self, req: Union[CompletionRequest, ChatCompletionRequest], max_tokens: int,
                top_logprobs: Optional[int]) -> SamplingParams:
        limits = self.config.limits
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > limits.max_stop_strings or any(len(s) > limits.max_stop_chars for s in stop):
            raise ApiError(400, f"stop: at most {limits.max_stop_strings} strings of at most "
                                f"{limits.max_stop_chars} characters", param="stop")
        if max_tokens > limits.max_new_tokens:
            raise ApiError(400, f"max_tokens must be at most {limits.max_new_tokens}", param="max_tokens")
        stop_ids = req.stop_token_ids or []
        if len(stop_ids) > limits.max_stop_token_ids or not all(0 <= t <= limits.max_token_id for t in stop_ids):
            raise ApiError(400, f"stop_token_ids: at most {limits.max_stop_token_ids} ids, each in "
                                f"[0, {limits.max_token_id}]", param="stop_token_ids")
        try:
            return SamplingParams(temperature=req.temperature, top_p=req.top_p, n=req.n, seed=req.seed,
                                  max_tokens=max_tokens, stop=tuple(stop), logprobs=top_logprobs or None,
                                  stop_token_ids=tuple(stop_ids))
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def _check_prompt(self, ids: list[int]) -> None:
        limits = self.config.limits
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(413, f"the prompt has {len(ids)} tokens, over the limit of {limits.max_prompt_tokens}",
                           param="prompt", code="context_length_exceeded")

    async def _generate(self, turns: list[ChatTurn], params: SamplingParams) -> list[list[Trajectory]]:
        try:
            return await gather_or_cancel(*(self.sessions.generate(t, params) for t in turns))
        except RolloutError as e:
            raise from_rollout_error(e) from None

    def _usage(self, turns: list[ChatTurn], groups: list[list[Trajectory]]) -> dict[str, Any]:
        prompt_tokens = sum(len(t.prompt_ids) for t in turns)
        completion_tokens = sum(len(t.token_ids) for g in groups for t in g)
        self.metrics.add_tokens(prompt_tokens, completion_tokens)
        cached = sum(cached_prompt_tokens(t.prompt_ids, g) for t, g in zip(turns, groups))
        return dict(usage(prompt_tokens, completion_tokens), prompt_tokens_details={"cached_tokens": cached})

    def _extensions(self, req: CompletionRequest | ChatCompletionRequest, t: Trajectory) -> dict[str, Any]:
        """A choice's extension fields: its token ids and their policy versions (with return_token_ids)."""
        return {"token_ids": list(t.token_ids), "versions": list(t.versions)} if req.return_token_ids else {}

    def _begin(self, begin: Callable[[], ChatTurn], turns: list[ChatTurn]) -> None:
        """``turns.append(begin())``; a refusal ends the turns begun so far (no conversation stays busy)."""
        try:
            turns.append(begin())
        except BaseException:
            for turn in turns:
                self.sessions.end(turn)
            raise

    # ---------------------------------------------------------------- /v1/completions
    async def completions(self, req: CompletionRequest, on_close: Callable[[], None]
                          ) -> dict[str, Any] | SSEResponse:
        """The response body, or with ``stream: true`` the event stream (``on_close`` runs when it ends)."""
        self._check_common(req)
        limits = self.config.limits
        entries = req.prompts()
        if len(entries) > limits.max_batch:
            raise ApiError(400, f"at most {limits.max_batch} prompts per request", param="prompt")
        if req.session_id is not None and len(entries) != 1:
            raise ApiError(400, "session_id continues one conversation: send one prompt", param="session_id")
        prompts = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in entries]
        for ids in prompts:
            self._check_prompt(ids)
        if sum(len(ids) for ids in prompts) * req.n > limits.max_request_tokens:
            raise ApiError(413, f"the prompts hold more than {limits.max_request_tokens} tokens", param="prompt")
        params = self._params(req, req.max_tokens, req.logprobs)
        turns: list[ChatTurn] = []
        for ids in prompts:
            self._begin(lambda: self.sessions.begin_tokens(ids, req.session_id, req.n, req.stream), turns)
        if req.stream:
            return await self._stream(StreamPlan(False, turns, params, req.logprobs is not None,
                                                 req.return_token_ids, self._include_usage(req)), on_close)
        with self.sessions.held(turns):
            groups = await self._generate(turns, params)
            for turn, group in zip(turns, groups):
                self.sessions.commit(turn, group[0], None)
        choices = []
        for i, (turn, group) in enumerate(zip(turns, groups)):
            for t in group:
                logprobs = None if req.logprobs is None else \
                    self.renderer.completion_logprobs(t.token_ids, t.logprobs, t.top_logprobs)[0]
                choice: dict[str, Any] = {"index": i * req.n + t.sample_index, "text": self.renderer.text(t),
                                          "logprobs": logprobs, "finish_reason": t.finish_reason}
                if req.return_token_ids:
                    choice["prompt_token_ids"] = turn.prompt_ids   # per choice, as vLLM (a batch has several)
                if turn.committed:
                    choice["session_id"] = turn.session_id
                choices.append(dict(choice, **self._extensions(req, t)))
        body: dict[str, Any] = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                                "created": int(time.time()), "model": self.config.model_name, "choices": choices,
                                "usage": self._usage(turns, groups)}
        if len(turns) == 1:
            if req.return_token_ids:
                body["prompt_token_ids"] = turns[0].prompt_ids
            if turns[0].committed:
                body["session_id"] = turns[0].session_id
        return body

    # ---------------------------------------------------------------- /v1/chat/completions
    async def chat_completions(self, req: ChatCompletionRequest, on_close: Callable[[], None]
                               ) -> dict[str, Any] | SSEResponse:
        self._check_common(req)
        if req.top_logprobs and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        use_tools = self._tool_choice(req)
        try:
            messages = [m.template_dict() for m in req.messages]
        except ValueError as e:   # an assistant tool call whose arguments are not a JSON object
            raise ApiError(400, str(e), param="messages") from None
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if use_tools else None
        # Token-exact sessions (rollout/chat_sessions.py): the prompt continues the conversation it extends.
        turns: list[ChatTurn] = []
        self._begin(lambda: self.sessions.begin_chat(messages, tools, req.session_id, req.n, req.stream), turns)
        try:
            params = self._chat_params(req, turns[0].prompt_ids)
        except BaseException:
            self.sessions.end(turns[0])
            raise
        if req.stream:
            return await self._stream(StreamPlan(True, turns, params, req.logprobs, req.return_token_ids,
                                                 self._include_usage(req), use_tools), on_close)
        with self.sessions.held(turns):
            return await self._chat_turn(req, turns[0], params, use_tools)

    def _chat_params(self, req: ChatCompletionRequest, ids: list[int]) -> SamplingParams:
        self._check_prompt(ids)
        # Unset: to the end of the context (OpenAI's behaviour), within the protocol's max_new_tokens.
        max_tokens = (req.max_completion_tokens or req.max_tokens
                      or min(self.config.max_model_len - len(ids), self.config.limits.max_new_tokens))
        if max_tokens < 1 or len(ids) + max_tokens > self.config.max_model_len:
            raise ApiError(413, f"the prompt ({len(ids)} tokens) plus max_completion_tokens ({max_tokens}) is over "
                                f"the model's context of {self.config.max_model_len} tokens", param="messages",
                           code="context_length_exceeded")
        return self._params(req, max_tokens, req.top_logprobs if req.logprobs else None)

    async def _chat_turn(self, req: ChatCompletionRequest, turn: ChatTurn, params: SamplingParams,
                         use_tools: bool) -> dict[str, Any]:
        group = (await self._generate([turn], params))[0]
        choices = []
        for t in group:
            message, finish_reason = chat_message(self.renderer.text(t), t.finish_reason, use_tools)
            choice: dict[str, Any] = {"index": t.sample_index, "message": message,
                                      "logprobs": self.renderer.chat_logprobs(t.token_ids, t.logprobs, t.top_logprobs)
                                      if req.logprobs else None, "finish_reason": finish_reason}
            choices.append(dict(choice, **self._extensions(req, t)))
        self.sessions.commit(turn, group[0], choices[0]["message"])
        body: dict[str, Any] = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                                "created": int(time.time()), "model": self.config.model_name, "choices": choices,
                                "usage": self._usage([turn], [group])}
        if req.return_token_ids:
            body["prompt_token_ids"] = turn.prompt_ids
        if turn.committed:
            body["session_id"] = turn.session_id
        return body

    @staticmethod
    def _include_usage(req: CompletionRequest | ChatCompletionRequest) -> bool:
        return req.stream_options is not None and req.stream_options.include_usage

    @staticmethod
    def _tool_choice(req: ChatCompletionRequest) -> bool:
        """Whether the tools are rendered and calls parsed: ``tool_choice`` "auto" (the default when tools are
        given) yes, "none" no; other choices are not built yet."""
        choice = req.tool_choice
        if choice is None:
            return bool(req.tools)
        if choice == "none":
            return False
        if choice != "auto":
            raise ApiError(400, f"tool_choice {choice!r} is not supported yet (only 'auto' and 'none')",
                           param="tool_choice")
        if not req.tools:
            raise ApiError(400, "tool_choice 'auto' needs tools", param="tool_choice")
        return True

    # ---------------------------------------------------------------- /v1/models, /health
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.config.model_name, "object": "model", "created": self.created,
                                            "owned_by": "rollout-service", "max_model_len": self.config.max_model_len}]}

    async def health(self) -> tuple[int, dict[str, Any]]:
        try:
            h = await self.backend.health()
        except RolloutError as e:
            return 503, {"ok": False, "error": e.message}
        return (200 if h.get("ok") else 503), {"ok": bool(h.get("ok")), "version": h.get("version")}
