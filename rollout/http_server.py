"""An OpenAI-compatible HTTP front end (FastAPI) over any ``RolloutBackend`` (docs/openai.md).

    client --HTTP/JSON--> FastAPI handler (asyncio) --> ChatSessions (match / record a conversation)
                 --await--> backend.step_session / generate (LocalBackend: EngineLoop futures, so concurrent
                            requests batch in one engine; RolloutPool: Ray workers)
      stream: true --> rollout.http_streaming --> backend.step_session_stream / generate_stream (per-step deltas)

Text is handled only here, at the edge: prompts are tokenized (chat messages through the tokenizer's chat
template, with the request's tools), outputs detokenized (``rollout.openai_render``) and parsed for Hermes/Qwen
``<tool_call>`` blocks (``rollout.tool_calls``); the backend sees token ids in, token ids out. Routes:
``GET /health``, ``GET /v1/models``, ``GET /metrics`` (``rollout.http_metrics``), ``POST /v1/completions``,
``POST /v1/chat/completions``, ``DELETE /v1/sessions/{session_id}`` (close a conversation now). At most
``HttpConfig.max_in_flight`` completions run at once; past it: 429. The request -> backend -> response logic is
``rollout.openai_frontend``; conversations (token-exact sessions) are ``rollout.chat_sessions``.

Every error is in OpenAI's format (``{"error": {"message", "type", "param", "code"}}``), FastAPI's 422 for a
malformed body included (400 here, as OpenAI answers). With an API key every ``/v1`` route needs
``Authorization: Bearer <key>`` (401 otherwise); ``/health`` stays open for probes and reveals nothing.
"""
from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from rollout.backend import RolloutBackend, RolloutError
from rollout.chat_sessions import SessionError
from rollout.http_config import ApiError, HttpConfig, from_session_error
from rollout.http_metrics import CONTENT_TYPE, MetricsMiddleware
from rollout.http_streaming import SSEResponse
from rollout.openai_frontend import OpenAIFrontEnd
from rollout.openai_schema import ChatCompletionRequest, CompletionRequest, describe_validation_errors

__all__ = ["ApiError", "HttpConfig", "OpenAIFrontEnd", "create_app"]


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
        return from_session_error(e).response()

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

    @app.delete("/v1/sessions/{session_id}")
    async def close_session(request: Request, session_id: str) -> dict[str, Any]:
        """Close a conversation now (its backend session's KV is freed before the answer): 404 unknown, expired
        or already closed; 409 while a turn of it runs."""
        authorize(request)
        await front.sessions.close(session_id)
        return {"id": session_id, "object": "session", "deleted": True}

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

