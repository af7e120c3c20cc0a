"""The ZeroMQ wire format: one msgpack map per message, typed and strictly validated (docs/protocol.md).

Request  ``{"v": 2, "id": <str|int>, "op": <name>, "ts": <unix s>, "nonce": <bin>, ...op fields}``
Reply    ``{"v": 2, "id": <echoed|nil>, "nonce": <echoed>, "ok": true, "result": {...}}``
         ``{"v": 2, "id": <echoed|nil>, "nonce": <echoed>, "ok": false, "error": {"code": <ErrorCode>, "message": str}}``

``ts`` and ``nonce`` are required when the server has an auth secret (they are inside the signed body, so a
captured message cannot be resent: ``ReplayGuard``) and optional otherwise; a reply echoes the request's nonce.

Decoding never evaluates anything (msgpack only, no pickle, no ext types) and every length is capped
*before* allocation (``msgpack.unpackb`` ``max_*_len``). A bad message raises ``ProtocolError`` whose
code is ``bad_request`` (wrong type, missing/unknown field, bad value), ``too_large`` (over a
``ProtocolLimits`` figure) or ``unknown_operation``; the message names the field (``params.top_p``,
``prompt_ids[3]``). The same dataclasses encode requests on the client side (``to_wire``). The field parsers and
``ProtocolLimits`` live in ``rollout.protocol_fields``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import heapq
import hmac
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import msgpack

from engine.sampling_params import SamplingParams
from rollout.backend import ErrorCode, RolloutError
from rollout.protocol_fields import (Parser, ProtocolError, ProtocolLimits, RequestId, bad_value, is_int, p_choice,
                                     p_kwargs, p_name, p_new_token_ids, p_optional_name, p_optional_version, p_params,
                                     p_positive_number, p_request_id, p_stream, p_token_ids, p_turns, params_to_wire,
                                     short_repr, too_large)

PROTOCOL_VERSION = 2                # 2: ts + nonce in the envelope, replies echo the nonce (issue 18)
MAC_BYTES = 32                      # HMAC-SHA256 digest, the last frame of a signed message
NONCE_BYTES = (8, 64)               # accepted nonce sizes; the Python clients send 16 random bytes
_REQUIRED = dataclasses.MISSING


def _field(parse: Parser, default: Any = _REQUIRED, *, wire: Callable[[Any], Any] = lambda x: x) -> Any:
    return field(default=default, metadata={"parse": parse, "wire": wire})


@dataclass(frozen=True)
class Request:
    """Base of the per-op requests; fields are the op's wire fields (see docs/protocol.md)."""

    op: ClassVar[str] = ""

    def to_wire(self, request_id: RequestId, *, nonce: bytes | None = None,
                ts: float | None = None) -> dict[str, Any]:
        msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id, "op": self.op}
        if nonce is not None:
            msg["nonce"] = nonce
            msg["ts"] = time.time() if ts is None else ts
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is _REQUIRED or value != f.default:
                msg[f.name] = f.metadata["wire"](value)
        return msg


@dataclass(frozen=True)
class GenerateRequest(Request):
    op: ClassVar[str] = "generate"
    # Exactly one of prompt_ids (one prompt) and prompts (a batch) is set; the reply holds
    # len(prompts) * n trajectories, prompt-major.
    prompt_ids: Optional[list[int]] = _field(lambda v, p, lim: None if v is None else p_token_ids(v, p, lim), None)
    prompts: Optional[list[list[int]]] = _field(lambda v, p, lim: None if v is None else _p_prompts(v, p, lim), None)
    params: SamplingParams = _field(p_params, SamplingParams(), wire=params_to_wire)
    stream: bool = _field(p_stream, False)

    def all_prompts(self) -> list[list[int]]:
        return [self.prompt_ids] if self.prompt_ids is not None else list(self.prompts or [])


def _p_prompts(v: Any, path: str, limits: ProtocolLimits) -> list[list[int]]:
    if not isinstance(v, list) or not v:
        raise bad_value(path, "must be a non-empty list of token-id lists", v)
    if len(v) > limits.max_batch:
        raise too_large(path, f"has {len(v)} prompts; the limit is {limits.max_batch}")
    return [p_token_ids(p, f"{path}[{i}]", limits) for i, p in enumerate(v)]


@dataclass(frozen=True)
class OpenSessionRequest(Request):
    op: ClassVar[str] = "open_session"
    session_id: Optional[str] = _field(p_optional_name, None)   # nil: the server picks one
    ttl_s: Optional[float] = _field(p_positive_number, None)    # nil: the server's default TTL


@dataclass(frozen=True)
class StepSessionRequest(Request):
    op: ClassVar[str] = "step_session"
    session_id: str = _field(p_name)
    new_token_ids: list[int] = _field(p_new_token_ids)         # user message / observation (loss mask 0)
    params: SamplingParams = _field(p_params, SamplingParams(), wire=params_to_wire)
    stream: bool = _field(p_stream, False)


@dataclass(frozen=True)
class CloseSessionRequest(Request):
    op: ClassVar[str] = "close_session"
    session_id: str = _field(p_name)


@dataclass(frozen=True)
class RunEpisodeRequest(Request):
    op: ClassVar[str] = "run_episode"
    env: str = _field(p_name)                                   # a registered environment's name
    env_kwargs: dict[str, Any] = _field(p_kwargs, None)         # nil/absent -> {}
    params: SamplingParams = _field(p_params, SamplingParams(), wire=params_to_wire)
    max_turns: int = _field(p_turns, 8)

    def __post_init__(self) -> None:
        if self.env_kwargs is None:
            object.__setattr__(self, "env_kwargs", {})


@dataclass(frozen=True)
class AbortRequest(Request):
    op: ClassVar[str] = "abort"
    # The "id" of an in-flight request sent on this same connection (ZeroMQ routing id); nothing else is reachable.
    request_id: RequestId = _field(p_request_id)


@dataclass(frozen=True)
class UpdateWeightsRequest(Request):
    op: ClassVar[str] = "update_weights"
    loader: str = _field(p_name)                                # registered weight_sync loader name
    loader_kwargs: dict[str, Any] = _field(p_kwargs, None)      # nil/absent -> {}
    version: Optional[int] = _field(p_optional_version, None)
    mode: str = _field(p_choice("keep", "drain", "abort"), "keep")
    kv: str = _field(p_choice("keep", "recompute"), "keep")

    def __post_init__(self) -> None:
        if self.loader_kwargs is None:
            object.__setattr__(self, "loader_kwargs", {})


@dataclass(frozen=True)
class StatsRequest(Request):
    op: ClassVar[str] = "stats"


@dataclass(frozen=True)
class HealthRequest(Request):
    op: ClassVar[str] = "health"


REQUEST_TYPES: dict[str, type[Request]] = {cls.op: cls for cls in (
    GenerateRequest, OpenSessionRequest, StepSessionRequest, CloseSessionRequest, RunEpisodeRequest,
    AbortRequest, UpdateWeightsRequest, StatsRequest, HealthRequest)}
_ENVELOPE = ("v", "id", "op", "ts", "nonce")


# ------------------------------------------------------------------ bytes <-> messages
def unpack(body: bytes, limits: ProtocolLimits) -> Any:
    """msgpack bytes -> Python value, with every length capped before allocation."""
    if len(body) > limits.max_message_bytes:
        raise too_large("message", f"has {len(body)} bytes; the limit is {limits.max_message_bytes}")
    n = len(body)
    try:
        # NOTE: strict_map_key=False so that a message with a non-str key still yields its id for the error
        # reply; decode_request refuses non-str keys at the top level, p_params / p_kwargs below it.
        return msgpack.unpackb(body, raw=False, strict_map_key=False, use_list=True,
                               max_str_len=n, max_bin_len=n, max_array_len=n, max_map_len=n // 2,
                               max_ext_len=0, ext_hook=_refuse_ext)
    except Exception as e:   # ExtraData, FormatError, StackError, UnicodeDecodeError, ValueError, ...
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"message is not one valid msgpack value "
                                                   f"({type(e).__name__}: {short_repr(str(e))})") from None


def _refuse_ext(code: int, data: bytes) -> Any:
    # NOTE: max_ext_len=0 stops every ext with a payload, but a zero-length ext (e.g. ExtType(0, b"")) fits it;
    # without this hook it would decode to an ExtType object and reach the field parsers.
    raise ValueError(f"msgpack ext type {code} is not allowed")


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def peek_nonce(msg: Any) -> bytes | None:
    """The request's nonce if it has a well-formed one (echoed in the reply, even an error reply), else None."""
    if isinstance(msg, dict):
        nonce = msg.get("nonce")
        if isinstance(nonce, bytes) and NONCE_BYTES[0] <= len(nonce) <= NONCE_BYTES[1]:
            return nonce
    return None


def new_nonce() -> bytes:
    return os.urandom(16)


def check_envelope_auth(msg: Any, required: bool) -> tuple[bytes, float] | None:
    """``(nonce, ts)`` of a request, or None when both are absent and not ``required``; ProtocolError naming the
    field otherwise. Required on a server with an auth secret (replay protection)."""
    if not isinstance(msg, dict):
        if required:   # NOTE: a signed body that is not a map must still get its (one) reply
            raise bad_value("message", "must be a msgpack map", msg)
        return None
    if "nonce" not in msg and "ts" not in msg and not required:
        return None
    nonce, ts = msg.get("nonce"), msg.get("ts")
    if not isinstance(nonce, bytes) or not NONCE_BYTES[0] <= len(nonce) <= NONCE_BYTES[1]:
        why = "is required on a server with an auth secret (replay protection); " if required and nonce is None else ""
        raise bad_value("nonce", f"{why}must be bin of {NONCE_BYTES[0]}..{NONCE_BYTES[1]} bytes, unique per message",
                        nonce)
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        raise bad_value("ts", "is required with nonce and must be a number: the send time in Unix seconds", ts)
    return nonce, float(ts)


class ReplayGuard:
    """Refuses a signed message seen before (its nonce) or sent outside ``window_s`` of the server's clock.

    A nonce is remembered until its message would be stale anyway (``ts + window_s``), so memory is bounded by
    the messages of one window, and capped at ``max_nonces`` (past it new messages get ``unavailable``)."""

    def __init__(self, window_s: float = 30.0, max_nonces: int = 1 << 19,
                 clock: Callable[[], float] = time.time) -> None:
        if not window_s > 0 or max_nonces < 1:
            raise ValueError(f"ReplayGuard needs window_s > 0 and max_nonces >= 1, got {window_s!r}, {max_nonces!r}")
        self.window_s = window_s
        self.max_nonces = max_nonces
        self.clock = clock
        self._seen: set[bytes] = set()
        self._expiry: list[tuple[float, bytes]] = []     # heap of (ts + window_s, nonce)

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, nonce: bytes, ts: float) -> None:
        now = self.clock()
        while self._expiry and self._expiry[0][0] < now:
            self._seen.discard(heapq.heappop(self._expiry)[1])
        if abs(now - ts) > self.window_s:
            raise bad_value("ts", f"is stale: {now - ts:+.1f} s from the server's clock; the window is "
                                  f"±{self.window_s:g} s (check the client's clock)", ts)
        if nonce in self._seen:
            raise bad_value("nonce", "was already used: a replayed message is refused")
        if len(self._seen) >= self.max_nonces:
            raise ProtocolError(ErrorCode.UNAVAILABLE, f"{len(self._seen)} messages in the last "
                                                       f"{self.window_s:g} s (the replay cache is full); retry later")
        self._seen.add(nonce)
        heapq.heappush(self._expiry, (ts + self.window_s, nonce))


def peek_id(msg: Any, limits: Optional[ProtocolLimits] = None) -> Optional[RequestId]:
    """The request's id if it has a valid one, else None (the error reply then carries nil)."""
    if isinstance(msg, dict):
        try:
            return p_request_id(msg.get("id"), "id", limits or ProtocolLimits())
        except ProtocolError:
            return None
    return None


def decode_request(msg: Any, limits: ProtocolLimits) -> tuple[RequestId, Request]:
    """A decoded msgpack value -> (id, typed request), or ProtocolError carrying the id if known."""
    if not isinstance(msg, dict):
        raise bad_value("message", "must be a msgpack map", msg)
    request_id = peek_id(msg, limits)
    try:
        bad_key = next((k for k in msg if not isinstance(k, str)), None)
        if bad_key is not None:
            raise bad_value("message", "keys must be str", bad_key)
        if "v" not in msg:
            raise bad_value("v", f"is required (protocol version {PROTOCOL_VERSION})")
        if msg["v"] != PROTOCOL_VERSION or not is_int(msg["v"]):
            old = " (version 1 is no longer served: version 2 adds ts and nonce, see docs/protocol.md)" \
                if msg["v"] == 1 and is_int(msg["v"]) else ""
            raise bad_value("v", f"must be {PROTOCOL_VERSION}{old}", msg["v"])
        check_envelope_auth(msg, required=False)
        if "id" not in msg:
            raise bad_value("id", "is required (a str or an int, echoed in the reply)")
        p_request_id(msg["id"], "id", limits)
        op = msg.get("op")
        if not isinstance(op, str):
            raise bad_value("op", "is required and must be a str", op)
        cls = REQUEST_TYPES.get(op)
        if cls is None:
            raise ProtocolError(ErrorCode.UNKNOWN_OPERATION,
                                f"op {short_repr(op)} is not one of {sorted(REQUEST_TYPES)}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in msg if k not in fields and k not in _ENVELOPE)
        if unknown:
            raise bad_value(op, f"has unknown fields {unknown}; known: {sorted(fields)}")
        values = {}
        for name, f in fields.items():
            if name in msg:
                values[name] = f.metadata["parse"](msg[name], name, limits)
            elif f.default is _REQUIRED:
                raise bad_value(name, f"is required for op {op}")
        request = cls(**values)
        if isinstance(request, GenerateRequest):
            _check_generate(request, limits)
        return request_id, request
    except ProtocolError as e:
        e.request_id = request_id
        raise


def _check_generate(req: GenerateRequest, limits: ProtocolLimits) -> None:
    if (req.prompt_ids is None) == (req.prompts is None):
        raise bad_value("prompt_ids", "xor prompts is required (one prompt, or a batch)")
    total = sum(len(p) for p in req.all_prompts())
    if total > limits.max_request_tokens:
        raise too_large("prompts", f"have {total} tokens in all; the limit is {limits.max_request_tokens}")


def ok_reply(request_id: Optional[RequestId], result: Any, nonce: bytes | None = None) -> dict[str, Any]:
    reply = {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}
    if nonce is not None:
        reply["nonce"] = nonce
    return reply


def error_reply(request_id: Optional[RequestId], code: ErrorCode, message: str,
                nonce: bytes | None = None) -> dict[str, Any]:
    reply = {"v": PROTOCOL_VERSION, "id": request_id, "ok": False,
             "error": {"code": ErrorCode(code).value, "message": message}}
    if nonce is not None:
        reply["nonce"] = nonce
    return reply


def reply_error(reply: dict[str, Any]) -> Optional[RolloutError]:
    """The RolloutError an error reply stands for (None for an ok reply); unknown codes -> internal."""
    if reply.get("ok") is True:
        return None
    err = reply.get("error") if isinstance(reply.get("error"), dict) else {}
    try:
        code = ErrorCode(err.get("code"))
    except ValueError:
        code = ErrorCode.INTERNAL
    return RolloutError(code, str(err.get("message", "malformed error reply")))


# ------------------------------------------------------------------ signing (optional HMAC)
def sign(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).digest()


def verify(secret: bytes, body: bytes, mac: bytes) -> bool:
    return len(mac) == MAC_BYTES and hmac.compare_digest(sign(secret, body), mac)
