"""The wire protocol's field parsers (rollout.protocol holds the envelope and the request types): each takes
(value, path, limits) and returns the typed value or raises ``ProtocolError`` naming the field's path
(``params.top_p``, ``prompt_ids[3]``); ``ProtocolLimits`` holds every cap they check."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from engine.sampling_params import SamplingParams
from rollout.backend import ErrorCode, RolloutError

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


def bad_value(path: str, why: str, value: object = dataclasses.MISSING) -> ProtocolError:
    shown = "" if value is dataclasses.MISSING else f", got {short_repr(value)}"
    return ProtocolError(ErrorCode.BAD_REQUEST, f"{path} {why}{shown}")


def too_large(path: str, what: str) -> ProtocolError:
    return ProtocolError(ErrorCode.TOO_LARGE, f"{path} {what}")


def short_repr(value: object) -> str:
    s = repr(value)
    return s if len(s) <= 80 else s[:77] + "..."


# ------------------------------------------------------------------ field parsers
# A parser takes (value, path, limits) and returns the typed value or raises ProtocolError.
Parser = Callable[[Any, str, ProtocolLimits], Any]


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def p_name(v: Any, path: str, limits: ProtocolLimits) -> str:
    if not isinstance(v, str) or not v:
        raise bad_value(path, "must be a non-empty str", v)
    if len(v) > limits.max_name_chars:
        raise too_large(path, f"has {len(v)} chars; the limit is {limits.max_name_chars}")
    return v


def p_optional_name(v: Any, path: str, limits: ProtocolLimits) -> Optional[str]:
    return None if v is None else p_name(v, path, limits)


def p_request_id(v: Any, path: str, limits: ProtocolLimits) -> RequestId:
    if is_int(v):
        if not _INT64[0] <= v <= _INT64[1]:
            raise bad_value(path, "must fit in a signed 64-bit int", v)
        return v
    if isinstance(v, str):
        return p_name(v, path, limits)
    raise bad_value(path, "must be a str or an int", v)


def p_bool(v: Any, path: str, limits: ProtocolLimits) -> bool:
    if not isinstance(v, bool):
        raise bad_value(path, "must be a bool", v)
    return v


def p_stream(v: Any, path: str, limits: ProtocolLimits) -> bool:
    if p_bool(v, path, limits):
        # NOTE: RolloutBackend exposes no token stream yet; faking one (a single frame at the end)
        # would mislead clients that time their work on it.
        raise bad_value(path, "true is not supported yet (this server has no token streaming); send false or omit it")
    return False


def p_token_ids(v: Any, path: str, limits: ProtocolLimits, *, allow_empty: bool = False) -> list[int]:
    if not isinstance(v, list):
        raise bad_value(path, "must be a list of token ids", v)
    if len(v) > limits.max_prompt_tokens:
        raise too_large(path, f"has {len(v)} tokens; the limit is {limits.max_prompt_tokens}")
    if not v and not allow_empty:
        raise bad_value(path, "must not be empty")
    hi = limits.max_token_id
    for i, t in enumerate(v):
        if not is_int(t) or not 0 <= t <= hi:
            raise bad_value(f"{path}[{i}]", f"must be an int in [0, {hi}]", t)
    return v


def p_new_token_ids(v: Any, path: str, limits: ProtocolLimits) -> list[int]:
    return p_token_ids(v, path, limits, allow_empty=True)


def p_positive_number(v: Any, path: str, limits: ProtocolLimits) -> Optional[float]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise bad_value(path, "must be a finite number > 0 or nil", v)
    return float(v)


def p_turns(v: Any, path: str, limits: ProtocolLimits) -> int:
    if not is_int(v) or v < 1:
        raise bad_value(path, "must be an int >= 1", v)
    if v > limits.max_turns:
        raise too_large(path, f"is {v}; the limit is {limits.max_turns}")
    return v


def p_optional_version(v: Any, path: str, limits: ProtocolLimits) -> Optional[int]:
    if v is None:
        return None
    if not is_int(v) or not 0 <= v <= _INT64[1]:
        raise bad_value(path, "must be an int >= 0 or nil", v)
    return v


def p_choice(*choices: str) -> Parser:
    def parse(v: Any, path: str, limits: ProtocolLimits) -> str:
        if v not in choices or not isinstance(v, str):
            raise bad_value(path, f"must be one of {list(choices)}", v)
        return v
    return parse


def p_kwargs(v: Any, path: str, limits: ProtocolLimits) -> dict[str, Any]:
    """A map of str keys to plain msgpack values (nil, bool, int, float, str, bin, list, map),
    bounded in items and depth; passed to an environment or a weight loader. nil -> {}."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad_value(path, "must be a map", v)
    budget = [limits.max_kwargs_items]

    def check(x: Any, p: str, depth: int) -> None:
        if isinstance(x, (dict, list)):
            if depth > limits.max_kwargs_depth:
                raise too_large(p, f"nests maps/lists deeper than {limits.max_kwargs_depth} levels")
            budget[0] -= len(x)
            if budget[0] < 0:
                raise too_large(path, f"has more than {limits.max_kwargs_items} items in all")
        if isinstance(x, dict):
            for k, item in x.items():
                if not isinstance(k, str):
                    raise bad_value(p, "keys must be str", k)
                check(item, f"{p}.{k}", depth + 1)
        elif isinstance(x, list):
            for i, item in enumerate(x):
                check(item, f"{p}[{i}]", depth + 1)
        elif isinstance(x, float) and not math.isfinite(x):
            raise bad_value(p, "must be finite", x)
        elif x is not None and not isinstance(x, (bool, int, float, str, bytes)):
            raise bad_value(p, "must be a plain msgpack value", x)

    check(v, path, 1)
    return v


_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def p_params(v: Any, path: str, limits: ProtocolLimits) -> SamplingParams:
    if not isinstance(v, dict):
        raise bad_value(path, "must be a map of SamplingParams fields", v)
    bad_key = next((k for k in v if not isinstance(k, str)), None)
    if bad_key is not None:
        raise bad_value(path, "keys must be str", bad_key)
    unknown = sorted(str(k) for k in v if k not in _PARAM_FIELDS)
    if unknown:
        raise bad_value(path, f"has unknown fields {unknown}; known: {list(_PARAM_FIELDS)}")
    stops = v.get("stop_token_ids", [])
    if isinstance(stops, list) and len(stops) > limits.max_stop_token_ids:
        raise too_large(f"{path}.stop_token_ids", f"has {len(stops)} ids; the limit is {limits.max_stop_token_ids}")
    if isinstance(stops, list):
        for i, t in enumerate(stops):   # SamplingParams checks >= 0; the upper bound is ours
            if is_int(t) and t > limits.max_token_id:
                raise bad_value(f"{path}.stop_token_ids[{i}]", f"must be an int in [0, {limits.max_token_id}]", t)
    stop = v.get("stop", [])
    if isinstance(stop, list):      # a str is one stop string; other types: SamplingParams names the field
        if len(stop) > limits.max_stop_strings:
            raise too_large(f"{path}.stop", f"has {len(stop)} strings; the limit is {limits.max_stop_strings}")
        for i, text in enumerate(stop):
            if isinstance(text, str) and len(text) > limits.max_stop_chars:
                raise too_large(f"{path}.stop[{i}]", f"has {len(text)} chars; the limit is {limits.max_stop_chars}")
    elif isinstance(stop, str) and len(stop) > limits.max_stop_chars:
        raise too_large(f"{path}.stop", f"has {len(stop)} chars; the limit is {limits.max_stop_chars}")
    try:
        params = SamplingParams(**v)
    except (ValueError, TypeError) as e:
        # "SamplingParams.top_p must be ..." -> "params.top_p must be ..."
        raise ProtocolError(ErrorCode.BAD_REQUEST, str(e).replace("SamplingParams.", f"{path}.", 1)) from None
    for name, limit in (("max_tokens", limits.max_new_tokens), ("n", limits.max_n),
                        ("logprobs", limits.max_logprobs)):
        value = getattr(params, name)
        if value is not None and value > limit:
            raise too_large(f"{path}.{name}", f"is {value}; the limit is {limit}")
    if params.seed is not None and not _INT64[0] <= params.seed <= _INT64[1]:
        raise bad_value(f"{path}.seed", "must fit in a signed 64-bit int", params.seed)
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


# ------------------------------------------------------------------ engine errors in wire terms
# The engine names what it checks after its own fields (engine.request_validation, SamplingParams); a wire client
# sent prompt_ids / new_token_ids / params.*, so error messages are rewritten to the names it knows.
_TOKEN_FIELD = {"generate": "prompt_ids", "step_session": "new_token_ids",
                "run_episode": "the environment's token ids (prompt_token_ids)"}


def wire_names(message: str, op: str) -> str:
    message = message.replace("SamplingParams.", "params.")
    wire = _TOKEN_FIELD.get(op)
    if wire is not None:
        message = message.replace("prompt_token_ids", wire)
    return message


async def naming_prompt(index: int, call: Any) -> Any:
    """One prompt of a batched generate: its errors name ``prompts[index]``."""
    try:
        return await call
    except RolloutError as e:
        raise RolloutError(e.code, e.message.replace("prompt_token_ids", f"prompts[{index}]")) from None
    except ValueError as e:
        raise ValueError(str(e).replace("prompt_token_ids", f"prompts[{index}]")) from None
