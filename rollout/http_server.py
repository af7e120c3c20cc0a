"""An OpenAI-compatible HTTP front end (FastAPI) over any ``RolloutBackend`` (docs/openai.md).

    client --HTTP/JSON--> FastAPI handler (asyncio) --await--> backend.generate(prompt_ids, params)
                                                                   (LocalBackend: EngineLoop futures, so
                                                                    concurrent requests batch in one engine)
                          stream: true --> rollout.http_streaming --> backend.generate_stream (per-step deltas)

Text is handled only here, at the edge: prompts are tokenized (chat messages through the tokenizer's chat
template, with the request's tools), outputs detokenized (``rollout.openai_render``) and parsed for Hermes/Qwen
``<tool_call>`` blocks (``rollout.tool_calls``); the backend sees token ids in, token ids out. Routes:
``GET /health``, ``GET /v1/models``, ``GET /metrics`` (``rollout.http_metrics``), ``POST /v1/completions``,
``POST /v1/chat/completions``. At most ``HttpConfig.max_in_flight`` completions run at once; past it: 429.

Every error is in OpenAI's format (``{"error": {"message", "type", "param", "code"}}``), FastAPI's 422 for a
malformed body included (400 here, as OpenAI answers). With an API key every ``/v1`` route needs
``Authorization: Bearer <key>`` (401 otherwise); ``/health`` stays open for probes and reveals nothing.
"""
from __future__ import annotations

import hmac
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.sampling import SamplingParams
from rollout.backend import ErrorCode, RolloutBackend, RolloutError, gather_or_cancel
from rollout.chat_sessions import ChatSessions, ChatTurn, SessionConfig, SessionError, cached_prompt_tokens
from rollout.http_metrics import CONTENT_TYPE, HttpMetrics, MetricsMiddleware
from rollout.http_streaming import SSEResponse, StreamPlan, open_stream
from rollout.openai_render import Renderer, usage
from rollout.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    describe_validation_errors,
    error_body,
)
from rollout.protocol import ProtocolLimits
from rollout.tool_calls import openai_tool_calls, parse_tool_calls
from rollout.trajectory import Trajectory

# RolloutError code -> (HTTP status, OpenAI error type)
_STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.BAD_REQUEST: (400, "invalid_request_error"),

    ErrorCode.TOO_LARGE: (413, "invalid_request_error"),
    ErrorCode.ABORTED: (503, "server_error"),
    ErrorCode.WORKER_DIED: (503, "server_error"),
    ErrorCode.UNAVAILABLE: (503, "server_error"),
}


@dataclass(frozen=True)
class HttpConfig:
    model_name: str                                # the one name /v1/models lists and requests must send
    max_model_len: int                             # context length: prompt + output tokens
    api_key: Optional[str] = None                  # None: no auth (the CLI allows that only on loopback)
    limits: ProtocolLimits = field(default_factory=ProtocolLimits)   # the ZeroMQ protocol's per-request caps
    max_in_flight: int = 1024                      # completions being generated (streams included); past it: 429
    sessions: SessionConfig = field(default_factory=SessionConfig)  # token-exact chat sessions (chat_sessions.py)

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"HttpConfig.model_name must be a non-empty str, got {self.model_name!r}")
        if isinstance(self.max_model_len, bool) or not isinstance(self.max_model_len, int) or self.max_model_len < 2:
            raise ValueError(f"HttpConfig.max_model_len must be an int >= 2, got {self.max_model_len!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("HttpConfig.api_key must be None or a non-empty str")
        if isinstance(self.max_in_flight, bool) or not isinstance(self.max_in_flight, int) or self.max_in_flight < 1:
            raise ValueError(f"HttpConfig.max_in_flight must be an int >= 1, got {self.max_in_flight!r}")


class ApiError(Exception):
    """A request answered with an error in OpenAI's format."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        headers = {401: {"WWW-Authenticate": "Bearer"}, 429: {"Retry-After": "1"}}.get(self.status)
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status, headers=headers)


def _from_rollout_error(e: RolloutError) -> ApiError:
    status, type_ = _STATUS.get(e.code, (500, "server_error"))
    return ApiError(status, e.message, type_, code=e.code.value)


class OpenAIFrontEnd:
    """Requests -> token ids + SamplingParams -> backend -> OpenAI response bodies. Holds no engine state."""

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
        return _from_rollout_error(e)

    async def _stream(self, plan: StreamPlan, on_close: Callable[[], None]) -> SSEResponse:
        try:
            return await open_stream(self, plan, on_close)
        except RolloutError as e:
            raise _from_rollout_error(e) from None

    # ---------------------------------------------------------------- checks shared by both endpoints
    def _check_common(self, req: Union[CompletionRequest, ChatCompletionRequest]) -> None:
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
        if req.stream and not hasattr(self.backend, "generate_stream"):
            raise ApiError(400, f"stream: true needs a backend that streams tokens; {type(self.backend).__name__} "
                                "does not yet (serve with --local)", param="stream")
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

    async def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Trajectory]]:
        try:
            return await gather_or_cancel(*(self.backend.generate(ids, params) for ids in prompts))
        except RolloutError as e:
            raise _from_rollout_error(e) from None

    def _usage(self, prompts: list[list[int]], groups: list[list[Trajectory]]) -> dict[str, int]:
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(len(t.token_ids) for g in groups for t in g)
        self.metrics.add_tokens(prompt_tokens, completion_tokens)
        return usage(prompt_tokens, completion_tokens)

    def _extensions(self, req: CompletionRequest | ChatCompletionRequest, t: Trajectory) -> dict[str, Any]:
        """A choice's extension fields: its token ids and their policy versions (with return_token_ids)."""
        return {"token_ids": list(t.token_ids), "versions": list(t.versions)} if req.return_token_ids else {}

    # ---------------------------------------------------------------- /v1/completions
    async def completions(self, req: CompletionRequest, on_close: Callable[[], None]
                          ) -> dict[str, Any] | SSEResponse:
        """The response body, or with ``stream: true`` the event stream (``on_close`` runs when it ends)."""
        self._check_common(req)
        limits = self.config.limits
        entries = req.prompts()
        if len(entries) > limits.max_batch:
            raise ApiError(400, f"at most {limits.max_batch} prompts per request", param="prompt")
        prompts = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in entries]
        for ids in prompts:
            self._check_prompt(ids)
        if sum(len(ids) for ids in prompts) * req.n > limits.max_request_tokens:
            raise ApiError(413, f"the prompts hold more than {limits.max_request_tokens} tokens", param="prompt")
        params = self._params(req, req.max_tokens, req.logprobs)
        if req.stream:
            return await self._stream(StreamPlan(False, prompts, params, req.logprobs is not None,
                                                 req.return_token_ids, self._include_usage(req)), on_close)
        groups = await self._generate(prompts, params)
        choices = []
        for i, (ids, group) in enumerate(zip(prompts, groups)):
            for t in group:
                logprobs = None if req.logprobs is None else \
                    self.renderer.completion_logprobs(t.token_ids, t.logprobs, t.top_logprobs)[0]
                choice: dict[str, Any] = {"index": i * req.n + t.sample_index, "text": self.renderer.text(t),
                                          "logprobs": logprobs, "finish_reason": t.finish_reason}
                if req.return_token_ids:
                    choice["prompt_token_ids"] = ids      # per choice, as vLLM (a batch has several prompts)
                choices.append(dict(choice, **self._extensions(req, t)))
        body: dict[str, Any] = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                                "created": int(time.time()), "model": self.config.model_name, "choices": choices,
                                "usage": self._usage(prompts, groups)}
        if req.return_token_ids and len(prompts) == 1:
            body["prompt_token_ids"] = prompts[0]
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
        if req.stream:
            if req.session_id is not None:
                raise ApiError(400, "session_id with stream: true is not supported yet (sessions are "
                                    "non-streaming)", param="session_id")
            from engine.smollm2 import chat_prompt_ids
            try:
                ids = chat_prompt_ids(self.tokenizer, messages, tools)
            except Exception as e:  # noqa: BLE001 - a template that refuses the messages (jinja raise_exception)
                raise ApiError(400, f"the chat template refused the messages: {type(e).__name__}: {e}",
                               param="messages") from None
            params = self._chat_params(req, ids)
            return await self._stream(StreamPlan(True, [ids], params, req.logprobs, req.return_token_ids,
                                                 self._include_usage(req), use_tools), on_close)
        # Token-exact sessions (rollout/chat_sessions.py): the prompt continues the conversation it extends.
        async with self.sessions.turn(messages, tools, req.session_id, req.n) as turn:
            body = await self._chat_turn(req, turn, use_tools)
        if turn.session_id is not None:
            body["session_id"] = turn.session_id
        return body

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

    async def _chat_turn(self, req: ChatCompletionRequest, turn: ChatTurn, use_tools: bool) -> dict[str, Any]:
        ids = turn.prompt_ids
        params = self._chat_params(req, ids)
        try:
            group = await self.sessions.generate(turn, params)
        except RolloutError as e:
            raise _from_rollout_error(e) from None
        choices = []
        for t in group:
            message: dict[str, Any] = {"role": "assistant", "content": self.renderer.text(t)}
            finish_reason = t.finish_reason
            if use_tools:
                parsed = parse_tool_calls(message["content"])
                if parsed.tool_calls:
                    message = {"role": "assistant", "content": parsed.content,
                               "tool_calls": openai_tool_calls(parsed.tool_calls)}
                    finish_reason = "tool_calls"
            choice: dict[str, Any] = {"index": t.sample_index, "message": message,
                                      "logprobs": self.renderer.chat_logprobs(t.token_ids, t.logprobs, t.top_logprobs)
                                      if req.logprobs else None, "finish_reason": finish_reason}
            choices.append(dict(choice, **self._extensions(req, t)))
        self.sessions.commit(turn, group[0], choices[0]["message"])
        body: dict[str, Any] = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                                "created": int(time.time()), "model": self.config.model_name, "choices": choices,
                                "usage": self._usage([ids], [group])}
        body["usage"]["prompt_tokens_details"] = {"cached_tokens": cached_prompt_tokens(ids, group)}
        if req.return_token_ids:
            body["prompt_token_ids"] = ids
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


def create_app(backend: RolloutBackend, tokenizer: Any, config: HttpConfig) -> FastAPI:
    """The FastAPI app. It does not own the backend: whoever built it shuts it down after the server stops."""
    front = OpenAIFrontEnd(backend, tokenizer, config)
    app = FastAPI(title="rollout-service (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.front = front

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # NOTE: compare_digest on bytes: constant time, and no TypeError on non-ASCII header text.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(SessionError)
    async def _session_error(request: Request, e: SessionError) -> JSONResponse:
        return ApiError(e.status, e.message, param=e.param, code=e.code).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(list(e.errors()))
        return ApiError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if e.status_code < 500 else "server_error"
        return ApiError(e.status_code, str(e.detail), type_).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(e).__name__}", "server_error").response()

    @app.get("/health")
    async def health() -> JSONResponse:
        status, body = await front.health()
        return JSONResponse(body, status)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return front.models()

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        authorize(request)
        try:
            stats = (await backend.stats()).get("total")
        except RolloutError:
            stats = None
        return Response(front.metrics.render(front.in_flight, config.max_in_flight, stats), media_type=CONTENT_TYPE)

    # NOTE: auth runs before the body is validated (the route takes the raw request), so a caller without the
    # key learns nothing about the request format; the in-flight limit (429) too, so overload costs no parsing.
    async def generation(request: Request, model: type, handler: Callable) -> Any:
        authorize(request)
        release = front.admit()
        try:
            result = await handler(await _parse(request, model), release)
        except BaseException:
            release()
            raise
        if not isinstance(result, SSEResponse):   # a stream releases its slot when it ends
            release()
        return result

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generation(request, CompletionRequest, front.completions)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generation(request, ChatCompletionRequest, front.chat_completions)

    routes = frozenset(r.path for r in app.routes if hasattr(r, "path"))
    app.add_middleware(MetricsMiddleware, metrics=front.metrics, endpoints=routes)
    return app


async def _parse(request: Request, model: type):
    """The body validated as ``model``; malformed JSON and wrong types raise RequestValidationError (-> 400)."""
    from pydantic import ValidationError
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None

