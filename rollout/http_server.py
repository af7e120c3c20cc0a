"""An OpenAI-compatible HTTP front end (FastAPI) over any ``RolloutBackend`` (docs/openai.md).

    client --HTTP/JSON--> FastAPI handler (asyncio) --await--> backend.generate(prompt_ids, params)
                                                                   (LocalBackend: EngineLoop futures, so
                                                                    concurrent requests batch in one engine)

Text is handled only here, at the edge: prompts are tokenized (chat messages through the tokenizer's chat
template, with the request's tools), outputs detokenized and parsed for Hermes/Qwen ``<tool_call>`` blocks
(``rollout.tool_calls``); the backend sees token ids in, token ids out. This increment is non-streaming:
``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

Every error is in OpenAI's format (``{"error": {"message", "type", "param", "code"}}``), FastAPI's 422 for a
malformed body included (400 here, as OpenAI answers). With an API key every ``/v1`` route needs
``Authorization: Bearer <key>`` (401 otherwise); ``/health`` stays open for probes and reveals nothing.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.sampling import SamplingParams
from rollout.backend import ErrorCode, RolloutBackend, RolloutError, gather_or_cancel
from rollout.chat_sessions import ChatSessions, ChatTurn, SessionConfig, SessionError, cached_prompt_tokens
from rollout.openai_schema import (ChatCompletionRequest, CompletionRequest, describe_validation_errors,
                                   error_body)
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
    sessions: SessionConfig = field(default_factory=SessionConfig)  # token-exact chat sessions (chat_sessions.py)

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"HttpConfig.model_name must be a non-empty str, got {self.model_name!r}")
        if isinstance(self.max_model_len, bool) or not isinstance(self.max_model_len, int) or self.max_model_len < 2:
            raise ValueError(f"HttpConfig.max_model_len must be an int >= 2, got {self.max_model_len!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("HttpConfig.api_key must be None or a non-empty str")


class ApiError(Exception):
    """A request answered with an error in OpenAI's format."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
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
        self.config = config
        self.created = int(time.time())
        self.sessions = ChatSessions(backend, tokenizer, config.sessions)

    # ---------------------------------------------------------------- checks shared by both endpoints
    def _check_common(self, req: Union[CompletionRequest, ChatCompletionRequest]) -> None:
        if req.stream:
            raise ApiError(400, "stream: true is not supported yet (non-streaming responses only)", param="stream")
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
        try:
            return SamplingParams(temperature=req.temperature, top_p=req.top_p, n=req.n, seed=req.seed,
                                  max_tokens=max_tokens, stop=tuple(stop), logprobs=top_logprobs or None)
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

    def _text(self, t: Trajectory) -> str:
        # With stop strings the engine detokenized incrementally and cut before the match; else decode here,
        # as the engine does (special tokens such as EOS dropped, no clean-up of spaces).
        if t.text is not None:
            return t.text
        return self.tokenizer.decode(t.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @staticmethod
    def _usage(prompts: list[list[int]], groups: list[list[Trajectory]]) -> dict[str, int]:
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(len(t.token_ids) for g in groups for t in g)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # ---------------------------------------------------------------- /v1/completions
    async def completions(self, req: CompletionRequest) -> dict[str, Any]:
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
        groups = await self._generate(prompts, self._params(req, req.max_tokens, req.logprobs))
        choices = []
        for i, (ids, group) in enumerate(zip(prompts, groups)):
            for t in group:
                choice: dict[str, Any] = {"index": i * req.n + t.sample_index, "text": self._text(t),
                                          "logprobs": None if req.logprobs is None else self._completion_logprobs(t),
                                          "finish_reason": t.finish_reason}
                if req.return_token_ids:
                    choice["prompt_token_ids"] = ids      # per choice, as vLLM (a batch has several prompts)
                    choice["token_ids"] = list(t.token_ids)
                choices.append(choice)
        body: dict[str, Any] = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                                "created": int(time.time()), "model": self.config.model_name, "choices": choices,
                                "usage": self._usage(prompts, groups)}
        if req.return_token_ids and len(prompts) == 1:
            body["prompt_token_ids"] = prompts[0]
        return body

    def _completion_logprobs(self, t: Trajectory) -> dict[str, Any]:
        tokens = [self._token_text(tok) for tok in t.token_ids]
        offsets, pos = [], 0
        for text in tokens:
            offsets.append(pos)
            pos += len(text)
        tops = t.top_logprobs
        return {"tokens": tokens, "token_logprobs": list(t.logprobs), "text_offset": offsets,
                "top_logprobs": [{self._token_text(tok): lp for tok, lp in row} for row in tops] if tops
                else [{} for _ in tokens]}

    # ---------------------------------------------------------------- /v1/chat/completions
    async def chat_completions(self, req: ChatCompletionRequest) -> dict[str, Any]:
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
        async with self.sessions.turn(messages, tools, req.session_id, req.n) as turn:
            body = await self._chat_turn(req, turn, use_tools)
        if turn.session_id is not None:
            body["session_id"] = turn.session_id
        return body

    async def _chat_turn(self, req: ChatCompletionRequest, turn: ChatTurn, use_tools: bool) -> dict[str, Any]:
        ids = turn.prompt_ids
        self._check_prompt(ids)
        # Unset: to the end of the context (OpenAI's behaviour), within the protocol's max_new_tokens.
        max_tokens = (req.max_completion_tokens or req.max_tokens
                      or min(self.config.max_model_len - len(ids), self.config.limits.max_new_tokens))
        if max_tokens < 1 or len(ids) + max_tokens > self.config.max_model_len:
            raise ApiError(413, f"the prompt ({len(ids)} tokens) plus max_completion_tokens ({max_tokens}) is over "
                                f"the model's context of {self.config.max_model_len} tokens", param="messages",
                           code="context_length_exceeded")
        params = self._params(req, max_tokens, req.top_logprobs if req.logprobs else None)
        try:
            group = await self.sessions.generate(turn, params)
        except RolloutError as e:
            raise _from_rollout_error(e) from None
        choices = []
        for t in group:
            message: dict[str, Any] = {"role": "assistant", "content": self._text(t)}
            finish_reason = t.finish_reason
            if use_tools:
                parsed = parse_tool_calls(message["content"])
                if parsed.tool_calls:
                    message = {"role": "assistant", "content": parsed.content,
                               "tool_calls": openai_tool_calls(parsed.tool_calls)}
                    finish_reason = "tool_calls"
            choice: dict[str, Any] = {"index": t.sample_index, "message": message,
                                      "logprobs": self._chat_logprobs(t) if req.logprobs else None,
                                      "finish_reason": finish_reason}
            if req.return_token_ids:
                choice["token_ids"] = list(t.token_ids)
            choices.append(choice)
        self.sessions.commit(turn, group[0], choices[0]["message"])
        body: dict[str, Any] = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                                "created": int(time.time()), "model": self.config.model_name, "choices": choices,
                                "usage": self._usage([ids], [group])}
        body["usage"]["prompt_tokens_details"] = {"cached_tokens": cached_prompt_tokens(ids, group)}
        if req.return_token_ids:
            body["prompt_token_ids"] = ids
        return body

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

    def _chat_logprobs(self, t: Trajectory) -> dict[str, Any]:
        def entry(tok: int, lp: float) -> dict[str, Any]:
            text = self._token_text(tok)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
        tops = t.top_logprobs or [[] for _ in t.token_ids]
        return {"content": [dict(entry(tok, lp), top_logprobs=[entry(a, b) for a, b in row])
                            for tok, lp, row in zip(t.token_ids, t.logprobs, tops)]}

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

    # NOTE: auth runs before the body is validated (the route takes the raw request), so a caller without the
    # key learns nothing about the request format.
    @app.post("/v1/completions")
    async def completions(request: Request) -> dict[str, Any]:
        authorize(request)
        return await front.completions(await _parse(request, CompletionRequest))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> dict[str, Any]:
        authorize(request)
        return await front.chat_completions(await _parse(request, ChatCompletionRequest))

    return app


async def _parse(request: Request, model: type):
    """The body validated as ``model``; malformed JSON and wrong types raise RequestValidationError (-> 400)."""
    from pydantic import ValidationError
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None


def parse_host_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port); ValueError naming the flag otherwise."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--http must be HOST:PORT (e.g. 127.0.0.1:8000), got {address!r}")
    return host, int(port)


class HttpServer:
    """uvicorn serving ``app`` inside the caller's asyncio loop (next to the ZeroMQ front end), so the process
    keeps one loop and one set of signal handlers: the caller's (uvicorn's own are not installed)."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):   # the caller owns SIGINT/SIGTERM and calls shutdown()
                yield

        self._server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
        self._task: Optional[asyncio.Task] = None

    async def start(self, timeout_s: float = 30.0) -> str:
        """Bind and start serving; returns ``http://host:port`` (the real port when ``port`` was 0)."""
        self._task = asyncio.create_task(self._server.serve())
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if self._task.done():      # NOTE: uvicorn calls sys.exit when it cannot bind; the process ends
                raise OSError(f"the HTTP server could not start on {self._server.config.host}:"
                              f"{self._server.config.port}")
            if time.monotonic() > deadline:
                raise TimeoutError("the HTTP server did not start in time")
            await asyncio.sleep(0.01)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    async def shutdown(self) -> None:
        """Stop accepting connections and let the requests in flight finish (uvicorn's graceful exit)."""
        self._server.should_exit = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
