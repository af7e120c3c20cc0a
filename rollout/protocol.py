"""The ZeroMQ wire format: one msgpack map per message, typed and strictly validated (docs/protocol.md).

Request  ``{"v": 1, "id": <str|int>, "op": <name>, ...op fields}``
Reply    ``{"v": 1, "id": <echoed|nil>, "ok": true, "result": {...}}``
         ``{"v": 1, "id": <echoed|nil>, "ok": false, "error": {"code": <ErrorCode>, "message": str}}``

Decoding never evaluates anything (msgpack only, no pickle, no ext types) and every length is capped
*before* allocation (``msgpack.unpackb`` ``max_*_len``). A bad message raises ``ProtocolError`` whose
code is ``bad_request`` (wrong type, missing/unknown field, bad value), ``too_large`` (over a
``ProtocolLimits`` figure) or ``unknown_operation``; the message names the field (``params.top_p``,
``prompt_ids[3]``). The same dataclasses encode requests on the client side (``to_wire``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Union

import msgpack

from engine.sampling import SamplingParams
from rollout.backend import ErrorCode, RolloutError

PROTOCOL_VERSION = 1
MAC_BYTES = 32                      # HMAC-SHA256 digest, the last frame of a signed message
RequestId = Union[str, int]
_INT64 = (-(1 << 63), (1 << 63) - 1)


@dataclass(frozen=True)
class ProtocolLimits:
    """What one request may ask for. Over a limit -> ``too_large``; documented in docs/protocol.md."""

    max_message_bytes: int = 16 << 20     # msgpack body of one request
    max_prompt_tokens: int = 32_768       # one prompt / one turn's new tokens
    max_request_tokens: int = 262_144     # all prompts of one (batched) generate together
    max_batch: int = 256                  # prompts in one generate
    max_new_tokens: int = 32_768          # SamplingParams.max_tokens
    max_n: int = 64                       # SamplingParams.n
    max_stop_token_ids: int = 64
    max_stop_strings: int = 16            # SamplingParams.stop (the engine's own cap is 64)
    max_stop_chars: int = 256             # each stop string, in characters (the engine's own cap is 1,024)
    max_logprobs: int = 20                # SamplingParams.logprobs (top-k logprobs per token)
    max_token_id: int = (1 << 31) - 1     # the backend checks the model's vocabulary on top
    max_turns: int = 64                   # run_episode
    max_name_chars: int = 256             # request ids, session ids, env / loader names
    max_kwargs_items: int = 256           # keys+items over all levels of env_kwargs / loader_kwargs
    max_kwargs_depth: int = 8

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ProtocolLimits.{f.name} must be a positive int, got {v!r}")

    @property
    def hard_max_message_bytes(self) -> int:
        """Socket-level cap (ZMQ_MAXMSGSIZE): past it the peer is disconnected, no reply possible.
        Between max_message_bytes and this, the request gets a ``too_large`` reply."""
        return 2 * self.max_message_bytes + (1 << 16)


class ProtocolError(Exception):
    """A request that cannot be served as sent. ``request_id`` is the echoed id (None if unknown)."""

    def __init__(self, code: ErrorCode, message: str, request_id: Optional[RequestId] = None) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


def _bad(path: str, why: str, value: object = dataclasses.MISSING) -> ProtocolError:
    shown = "" if value is dataclasses.MISSING else f", got {_short(value)}"
    return ProtocolError(ErrorCode.BAD_REQUEST, f"{path} {why}{shown}")


def _too_large(path: str, what: str) -> ProtocolError:
    return ProtocolError(ErrorCode.TOO_LARGE, f"{path} {what}")


def _short(value: object) -> str:
    s = repr(value)
    return s if len(s) <= 80 else s[:77] + "..."


# ------------------------------------------------------------------ field parsers
# A parser takes (value, path, limits) and returns the typed value or raises ProtocolError.
Parser = Callable[[Any, str, ProtocolLimits], Any]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def p_name(v: Any, path: str, limits: ProtocolLimits) -> str:
    if not isinstance(v, str) or not v:
        raise _bad(path, "must be a non-empty str", v)
    if len(v) > limits.max_name_chars:
        raise _too_large(path, f"has {len(v)} chars; the limit is {limits.max_name_chars}")
    return v


def p_optional_name(v: Any, path: str, limits: ProtocolLimits) -> Optional[str]:
    return None if v is None else p_name(v, path, limits)


def p_request_id(v: Any, path: str, limits: ProtocolLimits) -> RequestId:
    if _is_int(v):
        if not _INT64[0] <= v <= _INT64[1]:
            raise _bad(path, "must fit in a signed 64-bit int", v)
        return v
    if isinstance(v, str):
        return p_name(v, path, limits)
    raise _bad(path, "must be a str or an int", v)


def p_bool(v: Any, path: str, limits: ProtocolLimits) -> bool:
    if not isinstance(v, bool):
        raise _bad(path, "must be a bool", v)
    return v


def p_stream(v: Any, path: str, limits: ProtocolLimits) -> bool:
    if p_bool(v, path, limits):
        # NOTE: RolloutBackend exposes no token stream yet; faking one (a single frame at the end)
        # would mislead clients that time their work on it.
        raise _bad(path, "true is not supported yet (this server has no token streaming); send false or omit it")
    return False


def p_token_ids(v: Any, path: str, limits: ProtocolLimits, *, allow_empty: bool = False) -> list[int]:
    if not isinstance(v, list):
        raise _bad(path, "must be a list of token ids", v)
    if len(v) > limits.max_prompt_tokens:
        raise _too_large(path, f"has {len(v)} tokens; the limit is {limits.max_prompt_tokens}")
    if not v and not allow_empty:
        raise _bad(path, "must not be empty")
    hi = limits.max_token_id
    for i, t in enumerate(v):
        if not _is_int(t) or not 0 <= t <= hi:
            raise _bad(f"{path}[{i}]", f"must be an int in [0, {hi}]", t)
    return v


def p_new_token_ids(v: Any, path: str, limits: ProtocolLimits) -> list[int]:
    return p_token_ids(v, path, limits, allow_empty=True)


def p_positive_number(v: Any, path: str, limits: ProtocolLimits) -> Optional[float]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise _bad(path, "must be a finite number > 0 or nil", v)
    return float(v)


def p_turns(v: Any, path: str, limits: ProtocolLimits) -> int:
    if not _is_int(v) or v < 1:
        raise _bad(path, "must be an int >= 1", v)
    if v > limits.max_turns:
        raise _too_large(path, f"is {v}; the limit is {limits.max_turns}")
    return v


def p_optional_version(v: Any, path: str, limits: ProtocolLimits) -> Optional[int]:
    if v is None:
        return None
    if not _is_int(v) or not 0 <= v <= _INT64[1]:
        raise _bad(path, "must be an int >= 0 or nil", v)
    return v


def p_choice(*choices: str) -> Parser:
    def parse(v: Any, path: str, limits: ProtocolLimits) -> str:
        if v not in choices or not isinstance(v, str):
            raise _bad(path, f"must be one of {list(choices)}", v)
        return v
    return parse


def p_kwargs(v: Any, path: str, limits: ProtocolLimits) -> dict[str, Any]:
    """A map of str keys to plain msgpack values (nil, bool, int, float, str, bin, list, map),
    bounded in items and depth; passed to an environment or a weight loader. nil -> {}."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _bad(path, "must be a map", v)
    budget = [limits.max_kwargs_items]

    def check(x: Any, p: str, depth: int) -> None:
        if isinstance(x, (dict, list)):
            if depth > limits.max_kwargs_depth:
                raise _too_large(p, f"nests maps/lists deeper than {limits.max_kwargs_depth} levels")
            budget[0] -= len(x)
            if budget[0] < 0:
                raise _too_large(path, f"has more than {limits.max_kwargs_items} items in all")
        if isinstance(x, dict):
            for k, item in x.items():
                if not isinstance(k, str):
                    raise _bad(p, "keys must be str", k)
                check(item, f"{p}.{k}", depth + 1)
        elif isinstance(x, list):
            for i, item in enumerate(x):
                check(item, f"{p}[{i}]", depth + 1)
        elif isinstance(x, float) and not math.isfinite(x):
            raise _bad(p, "must be finite", x)
        elif x is not None and not isinstance(x, (bool, int, float, str, bytes)):
            raise _bad(p, "must be a plain msgpack value", x)

    check(v, path, 1)
    return v


_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def p_params(v: Any, path: str, limits: ProtocolLimits) -> SamplingParams:
    if not isinstance(v, dict):
        raise _bad(path, "must be a map of SamplingParams fields", v)
    unknown = sorted(str(k) for k in v if k not in _PARAM_FIELDS)
    if unknown:
        raise _bad(path, f"has unknown fields {unknown}; known: {list(_PARAM_FIELDS)}")
    stops = v.get("stop_token_ids", [])
    if isinstance(stops, list) and len(stops) > limits.max_stop_token_ids:
        raise _too_large(f"{path}.stop_token_ids", f"has {len(stops)} ids; the limit is {limits.max_stop_token_ids}")
    if isinstance(stops, list):
        for i, t in enumerate(stops):   # SamplingParams checks >= 0; the upper bound is ours
            if _is_int(t) and t > limits.max_token_id:
                raise _bad(f"{path}.stop_token_ids[{i}]", f"must be an int in [0, {limits.max_token_id}]", t)
    stop = v.get("stop", [])
    if isinstance(stop, list):      # a str is one stop string; other types: SamplingParams names the field
        if len(stop) > limits.max_stop_strings:
            raise _too_large(f"{path}.stop", f"has {len(stop)} strings; the limit is {limits.max_stop_strings}")
        for i, text in enumerate(stop):
            if isinstance(text, str) and len(text) > limits.max_stop_chars:
                raise _too_large(f"{path}.stop[{i}]", f"has {len(text)} chars; the limit is {limits.max_stop_chars}")
    elif isinstance(stop, str) and len(stop) > limits.max_stop_chars:
        raise _too_large(f"{path}.stop", f"has {len(stop)} chars; the limit is {limits.max_stop_chars}")
    try:
        params = SamplingParams(**v)
    except (ValueError, TypeError) as e:
        # "SamplingParams.top_p must be ..." -> "params.top_p must be ..."
        raise ProtocolError(ErrorCode.BAD_REQUEST, str(e).replace("SamplingParams.", f"{path}.", 1)) from None
    for name, limit in (("max_tokens", limits.max_new_tokens), ("n", limits.max_n),
                        ("logprobs", limits.max_logprobs)):
        value = getattr(params, name)
        if value is not None and value > limit:
            raise _too_large(f"{path}.{name}", f"is {value}; the limit is {limit}")
    if params.seed is not None and not _INT64[0] <= params.seed <= _INT64[1]:
        raise _bad(f"{path}.seed", "must fit in a signed 64-bit int", params.seed)
    return params


def params_to_wire(params: SamplingParams) -> dict[str, Any]:
    """Only the fields that differ from the defaults (the server fills in the rest)."""
    default = SamplingParams()
    out = {}
    for name in _PARAM_FIELDS:
        value = getattr(params, name)
        if value != getattr(default, name):
            out[name] = list(value) if name in ("stop_token_ids", "stop") else value
    return out


# ------------------------------------------------------------------ requests
_REQUIRED = dataclasses.MISSING


def _field(parse: Parser, default: Any = _REQUIRED, *, wire: Callable[[Any], Any] = lambda x: x) -> Any:
    return field(default=default, metadata={"parse": parse, "wire": wire})


@dataclass(frozen=True)
class Request:
    """Base of the per-op requests; fields are the op's wire fields (see docs/protocol.md)."""

    op: ClassVar[str] = ""

    def to_wire(self, request_id: RequestId) -> dict[str, Any]:
        msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id, "op": self.op}
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
        raise _bad(path, "must be a non-empty list of token-id lists", v)
    if len(v) > limits.max_batch:
        raise _too_large(path, f"has {len(v)} prompts; the limit is {limits.max_batch}")
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
    # The "id" of an in-flight request sent on this same connection, or a backend request id
    # (Trajectory.request_id) as a str.
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
_ENVELOPE = ("v", "id", "op")


# ------------------------------------------------------------------ bytes <-> messages
def unpack(body: bytes, limits: ProtocolLimits) -> Any:
    """msgpack bytes -> Python value, with every length capped before allocation."""
    if len(body) > limits.max_message_bytes:
        raise _too_large("message", f"has {len(body)} bytes; the limit is {limits.max_message_bytes}")
    n = len(body)
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True,
                               max_str_len=n, max_bin_len=n, max_array_len=n, max_map_len=n // 2,
                               max_ext_len=0, ext_hook=_refuse_ext)
    except Exception as e:   # ExtraData, FormatError, StackError, UnicodeDecodeError, ValueError, ...
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"message is not one valid msgpack value "
                                                   f"({type(e).__name__}: {_short(str(e))})") from None


def _refuse_ext(code: int, data: bytes) -> Any:
    # NOTE: max_ext_len=0 stops every ext with a payload, but a zero-length ext (e.g. ExtType(0, b"")) fits it;
    # without this hook it would decode to an ExtType object and reach the field parsers.
    raise ValueError(f"msgpack ext type {code} is not allowed")


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


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
        raise _bad("message", "must be a msgpack map", msg)
    request_id = peek_id(msg, limits)
    try:
        if "v" not in msg:
            raise _bad("v", "is required (protocol version 1)")
        if msg["v"] != PROTOCOL_VERSION or not _is_int(msg["v"]):
            raise _bad("v", f"must be {PROTOCOL_VERSION}", msg["v"])
        if "id" not in msg:
            raise _bad("id", "is required (a str or an int, echoed in the reply)")
        p_request_id(msg["id"], "id", limits)
        op = msg.get("op")
        if not isinstance(op, str):
            raise _bad("op", "is required and must be a str", op)
        cls = REQUEST_TYPES.get(op)
        if cls is None:
            raise ProtocolError(ErrorCode.UNKNOWN_OPERATION,
                                f"op {_short(op)} is not one of {sorted(REQUEST_TYPES)}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in msg if k not in fields and k not in _ENVELOPE)
        if unknown:
            raise _bad(op, f"has unknown fields {unknown}; known: {sorted(fields)}")
        values = {}
        for name, f in fields.items():
            if name in msg:
                values[name] = f.metadata["parse"](msg[name], name, limits)
            elif f.default is _REQUIRED:
                raise _bad(name, f"is required for op {op}")
        request = cls(**values)
        if isinstance(request, GenerateRequest):
            _check_generate(request, limits)
        return request_id, request
    except ProtocolError as e:
        e.request_id = request_id
        raise


def _check_generate(req: GenerateRequest, limits: ProtocolLimits) -> None:
    if (req.prompt_ids is None) == (req.prompts is None):
        raise _bad("prompt_ids", "xor prompts is required (one prompt, or a batch)")
    total = sum(len(p) for p in req.all_prompts())
    if total > limits.max_request_tokens:
        raise _too_large("prompts", f"have {total} tokens in all; the limit is {limits.max_request_tokens}")


def ok_reply(request_id: Optional[RequestId], result: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}


def error_reply(request_id: Optional[RequestId], code: ErrorCode, message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False,
            "error": {"code": ErrorCode(code).value, "message": message}}


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
