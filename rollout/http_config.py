"""The HTTP front end's configuration and its errors in OpenAI's format (``rollout.http_server``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from fastapi.responses import JSONResponse

from rollout.backend import ErrorCode, RolloutError
from rollout.chat_sessions import SessionConfig, SessionError
from rollout.openai_schema import error_body
from rollout.protocol import ProtocolLimits

# RolloutError code -> (HTTP status, OpenAI error type); any other code is a 500
_STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.BAD_REQUEST: (400, "invalid_request_error"),
    ErrorCode.UNKNOWN_SESSION: (404, "invalid_request_error"),
    ErrorCode.SESSION_BUSY: (409, "invalid_request_error"),
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
    sessions: SessionConfig = field(default_factory=SessionConfig)  # token-exact sessions (chat_sessions.py)

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


def from_rollout_error(e: RolloutError) -> ApiError:
    status, type_ = _STATUS.get(e.code, (500, "server_error"))
    return ApiError(status, e.message, type_, code=e.code.value)


def from_session_error(e: SessionError) -> ApiError:
    return ApiError(e.status, e.message, param=e.param, code=e.code)
