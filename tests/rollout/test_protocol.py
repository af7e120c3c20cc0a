"""Wire format: encode/decode round trips and every validation path (no sockets)."""
from __future__ import annotations

import dataclasses

import msgpack
import pytest

from engine.sampling import SamplingParams
from rollout import protocol as P
from rollout.backend import ErrorCode

LIMITS = P.ProtocolLimits(max_message_bytes=4096, max_prompt_tokens=32, max_request_tokens=48, max_batch=4,
                          max_new_tokens=64, max_n=4, max_stop_token_ids=3, max_logprobs=5, max_token_id=1000,
                          max_turns=5, max_name_chars=16, max_kwargs_items=10, max_kwargs_depth=3)


def decode(msg, limits=LIMITS):
    return P.decode_request(P.unpack(P.pack(msg), limits), limits)


def err(msg, limits=LIMITS) -> P.ProtocolError:
    with pytest.raises(P.ProtocolError) as info:
        decode(msg, limits)
    return info.value


def gen(**fields):
    return {"v": 2, "id": 7, "op": "generate", "prompt_ids": [1, 2, 3], **fields}


ALL_REQUESTS = [
    P.GenerateRequest(prompt_ids=[1, 2], params=SamplingParams(max_tokens=5, temperature=0.7, seed=3, n=2,
                                                              stop_token_ids=(4, 5), logprobs=2)),
    P.GenerateRequest(prompts=[[1], [2, 3]]),
    P.OpenSessionRequest(),
    P.OpenSessionRequest("s1", 2.5),
    P.StepSessionRequest("s1", [], SamplingParams(top_k=3, top_p=0.5, min_p=0.1, ignore_eos=True)),
    P.CloseSessionRequest("s1"),
    P.RunEpisodeRequest("calculator", {"question": "1+1", "nested": {"a": [1, 2.5, None, True, b"x"]}},
                        SamplingParams(max_tokens=8), 3),
    P.AbortRequest(12),
    P.AbortRequest("req-3"),
    P.UpdateWeightsRequest("safetensors", {"path": "/tmp/x"}, 4, "drain", "recompute"),
    P.StatsRequest(),
    P.HealthRequest(),
]


@pytest.mark.parametrize("request_", ALL_REQUESTS, ids=lambda r: r.op)
@pytest.mark.parametrize("request_id", [0, -5, "abc", (1 << 63) - 1])
def test_round_trip(request_, request_id):
    got_id, got = decode(request_.to_wire(request_id))
    assert got_id == request_id and type(got) is type(request_) and got == request_


def test_to_wire_sends_only_non_defaults():
    msg = P.GenerateRequest(prompt_ids=[1], params=SamplingParams(max_tokens=3)).to_wire(1)
    assert msg == {"v": 2, "id": 1, "op": "generate", "prompt_ids": [1], "params": {"max_tokens": 3}}
    assert P.HealthRequest().to_wire("h") == {"v": 2, "id": "h", "op": "health"}


def test_every_op_has_a_request_type():
    assert sorted(P.REQUEST_TYPES) == sorted(["generate", "open_session", "step_session", "run_episode",
                                              "close_session", "abort", "stats", "health", "update_weights"])


# ------------------------------------------------------------------ envelope
@pytest.mark.parametrize("msg, code, needle, echoed", [
    ({"id": 1, "op": "health"}, ErrorCode.BAD_REQUEST, "v is required", 1),
    ({"v": 1, "id": 1, "op": "health"}, ErrorCode.BAD_REQUEST, "v must be 2 (version 1 is no longer served", 1),
    ({"v": 3, "id": 1, "op": "health"}, ErrorCode.BAD_REQUEST, "v must be 2, got 3", 1),
    ({"v": True, "id": 1, "op": "health"}, ErrorCode.BAD_REQUEST, "v must be 2", 1),
    ({"v": 2.0, "id": 1, "op": "health"}, ErrorCode.BAD_REQUEST, "v must be 2", 1),
    ({"v": 2, "id": 1, "op": "health", "nonce": b"short"}, ErrorCode.BAD_REQUEST, "nonce must be bin of 8..64", 1),
    ({"v": 2, "id": 1, "op": "health", "nonce": b"n" * 16}, ErrorCode.BAD_REQUEST, "ts is required with nonce", 1),
    ({"v": 2, "id": 1, "op": "health", "nonce": b"n" * 16, "ts": "now"}, ErrorCode.BAD_REQUEST, "ts is required", 1),
    ({"v": 2, "op": "health"}, ErrorCode.BAD_REQUEST, "id is required", None),
    ({"v": 2, "id": 1.5, "op": "health"}, ErrorCode.BAD_REQUEST, "id must be a str or an int", None),
    ({"v": 2, "id": True, "op": "health"}, ErrorCode.BAD_REQUEST, "id must be a str or an int", None),
    ({"v": 2, "id": [1], "op": "health"}, ErrorCode.BAD_REQUEST, "id must be a str or an int", None),
    ({"v": 2, "id": "", "op": "health"}, ErrorCode.BAD_REQUEST, "id must be a non-empty str", None),
    ({"v": 2, "id": "x" * 17, "op": "health"}, ErrorCode.TOO_LARGE, "id has 17 chars", None),
    ({"v": 2, "id": 1 << 63, "op": "health"}, ErrorCode.BAD_REQUEST, "64-bit", None),
    ({"v": 2, "id": 1}, ErrorCode.BAD_REQUEST, "op is required", 1),
    ({"v": 2, "id": 1, "op": 5}, ErrorCode.BAD_REQUEST, "op is required", 1),
    ({"v": 2, "id": "q", "op": "explode"}, ErrorCode.UNKNOWN_OPERATION, "explode", "q"),
    ({"v": 2, "id": 1, "op": "health", "extra": 1}, ErrorCode.BAD_REQUEST, "unknown fields ['extra']", 1),
    ({"v": 2, "id": 1, "op": "close_session"}, ErrorCode.BAD_REQUEST, "session_id is required", 1),
    ({"v": 2, "id": 1, "op": "step_session", "session_id": "s"}, ErrorCode.BAD_REQUEST,
     "new_token_ids is required", 1),
])
def test_envelope_errors(msg, code, needle, echoed):
    e = err(msg)
    assert e.code is code and needle in e.message and e.request_id == echoed


def test_top_level_must_be_a_map():
    for value in ([1, 2], "health", 3, None, b"x"):
        with pytest.raises(P.ProtocolError, match="must be a msgpack map") as info:
            P.decode_request(value, LIMITS)
        assert info.value.request_id is None


# ------------------------------------------------------------------ generate
@pytest.mark.parametrize("fields, code, needle", [
    ({"prompt_ids": None}, ErrorCode.BAD_REQUEST, "prompt_ids xor prompts"),
    ({"prompts": [[1]]}, ErrorCode.BAD_REQUEST, "prompt_ids xor prompts"),
    ({"prompt_ids": []}, ErrorCode.BAD_REQUEST, "prompt_ids must not be empty"),
    ({"prompt_ids": "abc"}, ErrorCode.BAD_REQUEST, "prompt_ids must be a list"),
    ({"prompt_ids": [1, -1]}, ErrorCode.BAD_REQUEST, "prompt_ids[1] must be an int in [0, 1000]"),
    ({"prompt_ids": [1, 1001]}, ErrorCode.BAD_REQUEST, "prompt_ids[1]"),
    ({"prompt_ids": [True]}, ErrorCode.BAD_REQUEST, "prompt_ids[0]"),
    ({"prompt_ids": [1.0]}, ErrorCode.BAD_REQUEST, "prompt_ids[0]"),
    ({"prompt_ids": [[1]]}, ErrorCode.BAD_REQUEST, "prompt_ids[0]"),
    ({"prompt_ids": list(range(33))}, ErrorCode.TOO_LARGE, "prompt_ids has 33 tokens"),
    ({"prompt_ids": None, "prompts": []}, ErrorCode.BAD_REQUEST, "prompts must be a non-empty list"),
    ({"prompt_ids": None, "prompts": [[1]] * 5}, ErrorCode.TOO_LARGE, "prompts has 5 prompts"),
    ({"prompt_ids": None, "prompts": [[1], [2, -3]]}, ErrorCode.BAD_REQUEST, "prompts[1][1]"),
    ({"prompt_ids": None, "prompts": [[1] * 30, [1] * 30]}, ErrorCode.TOO_LARGE, "60 tokens in all"),
    ({"stream": True}, ErrorCode.BAD_REQUEST, "stream true is not supported"),
    ({"stream": 1}, ErrorCode.BAD_REQUEST, "stream must be a bool"),
    ({"params": [1]}, ErrorCode.BAD_REQUEST, "params must be a map"),
    ({"params": {"temprature": 1.0}}, ErrorCode.BAD_REQUEST, "unknown fields ['temprature']"),
])
def test_generate_errors(fields, code, needle):
    e = err(gen(**fields))
    assert e.code is code and needle in e.message and e.request_id == 7


def test_generate_stream_false_is_accepted():
    assert decode(gen(stream=False))[1].stream is False


@pytest.mark.parametrize("name, value", [
    ("temperature", -1.0), ("temperature", "hot"), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", 0), ("top_k", 2.0), ("min_p", 2.0), ("max_tokens", 0), ("max_tokens", True), ("n", 0),
    ("seed", 1.5), ("stop_token_ids", "ab"), ("stop_token_ids", [-1]), ("ignore_eos", 1), ("logprobs", -1),
])
def test_params_errors_name_the_field(name, value):
    e = err(gen(params={name: value}))
    assert e.code is ErrorCode.BAD_REQUEST and f"params.{name}" in e.message, e.message


@pytest.mark.parametrize("name, value", [("max_tokens", 65), ("n", 5), ("logprobs", 6),
                                         ("stop_token_ids", [1, 2, 3, 4])])
def test_params_over_limits_are_too_large(name, value):
    e = err(gen(params={name: value}))
    assert e.code is ErrorCode.TOO_LARGE and f"params.{name}" in e.message, e.message


def test_params_seed_and_stop_ids_bounds():
    assert err(gen(params={"seed": (1 << 64) - 1})).code is ErrorCode.BAD_REQUEST
    assert "params.stop_token_ids[0]" in err(gen(params={"stop_token_ids": [1001]})).message
    _, ok = decode(gen(params={"seed": -3, "stop_token_ids": [1000], "temperature": 1}))
    assert ok.params == SamplingParams(seed=-3, stop_token_ids=(1000,), temperature=1.0)


# ------------------------------------------------------------------ other ops
def req(op, **fields):
    return {"v": 2, "id": "r", "op": op, **fields}


@pytest.mark.parametrize("msg, code, needle", [
    (req("open_session", session_id=""), ErrorCode.BAD_REQUEST, "session_id must be a non-empty str"),
    (req("open_session", session_id=3), ErrorCode.BAD_REQUEST, "session_id"),
    (req("open_session", session_id="s" * 17), ErrorCode.TOO_LARGE, "session_id has 17 chars"),
    (req("open_session", ttl_s=0), ErrorCode.BAD_REQUEST, "ttl_s must be a finite number > 0"),
    (req("open_session", ttl_s=float("inf")), ErrorCode.BAD_REQUEST, "ttl_s"),
    (req("open_session", ttl_s="1"), ErrorCode.BAD_REQUEST, "ttl_s"),
    (req("step_session", session_id="s", new_token_ids=[-2]), ErrorCode.BAD_REQUEST, "new_token_ids[0]"),
    (req("step_session", session_id="s", new_token_ids=[1], stream=True), ErrorCode.BAD_REQUEST, "stream"),
    (req("step_session", session_id="s", new_token_ids=[1], params={"n": "2"}), ErrorCode.BAD_REQUEST, "params.n"),
    (req("close_session", session_id=None), ErrorCode.BAD_REQUEST, "session_id"),
    (req("run_episode"), ErrorCode.BAD_REQUEST, "env is required"),
    (req("run_episode", env="e", max_turns=0), ErrorCode.BAD_REQUEST, "max_turns must be an int >= 1"),
    (req("run_episode", env="e", max_turns=6), ErrorCode.TOO_LARGE, "max_turns is 6"),
    (req("run_episode", env="e", env_kwargs=[1]), ErrorCode.BAD_REQUEST, "env_kwargs must be a map"),
    (req("run_episode", env="e", env_kwargs={b"k": 1}), ErrorCode.BAD_REQUEST, "keys must be str"),
    (req("run_episode", env="e", env_kwargs={"a": {"b": {"c": {"d": 1}}}}), ErrorCode.TOO_LARGE, "env_kwargs.a.b.c"),
    (req("run_episode", env="e", env_kwargs={"a": list(range(11))}), ErrorCode.TOO_LARGE, "more than 10 items"),
    (req("run_episode", env="e", env_kwargs={"a": [float("nan")]}), ErrorCode.BAD_REQUEST, "env_kwargs.a[0] must be finite"),
    (req("abort"), ErrorCode.BAD_REQUEST, "request_id is required"),
    (req("abort", request_id=1.5), ErrorCode.BAD_REQUEST, "request_id must be a str or an int"),
    (req("update_weights"), ErrorCode.BAD_REQUEST, "loader is required"),
    (req("update_weights", loader="x", mode="now"), ErrorCode.BAD_REQUEST, "mode must be one of"),
    (req("update_weights", loader="x", kv=["keep"]), ErrorCode.BAD_REQUEST, "kv must be one of"),
    (req("update_weights", loader="x", version=-1), ErrorCode.BAD_REQUEST, "version must be an int >= 0"),
    (req("update_weights", loader="x", loader_kwargs="p"), ErrorCode.BAD_REQUEST, "loader_kwargs must be a map"),
    (req("stats", verbose=True), ErrorCode.BAD_REQUEST, "unknown fields ['verbose']"),
])
def test_op_field_errors(msg, code, needle):
    e = err(msg)
    assert e.code is code and needle in e.message and e.request_id == "r", e.message


def test_optional_fields_default():
    _, r = decode(req("run_episode", env="e"))
    assert r.env_kwargs == {} and r.max_turns == 8 and r.params == SamplingParams()
    _, r = decode(req("run_episode", env="e", env_kwargs=None))
    assert r.env_kwargs == {}
    _, r = decode(req("update_weights", loader="x"))
    assert (r.loader_kwargs, r.version, r.mode, r.kv) == ({}, None, "keep", "keep")
    _, r = decode(req("open_session", session_id=None, ttl_s=None))
    assert (r.session_id, r.ttl_s) == (None, None)


# ------------------------------------------------------------------ bytes
@pytest.mark.parametrize("body", [
    b"", b"\xc1", b"\x92\x01", b"\x81\xa1v", b"\xff" * 10, b"\x81\x91\x01\x02",   # never-used, truncated, list key
    b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff",   # huge declared lengths
    b"\x91" * 3000 + b"\x00",                                                    # nesting deeper than msgpack's stack
    b"\xd4\x05\x00", b"\xc7\x01\x05\x00",                                        # ext types
    b"\x80\x80",                                                                 # extra data after a value
    b"\x81\xa1v\xa2\xff\xfe",                                                    # invalid UTF-8
])
def test_unpack_rejects_garbage(body):
    with pytest.raises(P.ProtocolError) as info:
        P.unpack(body, LIMITS)
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_a_non_str_key_is_refused_with_the_readable_id():
    """A map key that is not a str is refused by decode_request (not by unpack), so the reply carries the id."""
    for msg, where in (({"v": 2, "id": 7, "op": "health", 1: 2}, "message keys must be str, got 1"),
                       ({"v": 2, "id": 7, "op": "generate", "prompt_ids": [1], "params": {b"n": 2}},
                        "params keys must be str, got b'n'")):
        with pytest.raises(P.ProtocolError) as info:
            P.decode_request(P.unpack(P.pack(msg), LIMITS), LIMITS)
        assert info.value.code is ErrorCode.BAD_REQUEST and info.value.request_id == 7
        assert where in info.value.message


def test_unpack_oversize_is_too_large():
    body = P.pack(gen(prompt_ids=[1] * 5000))
    with pytest.raises(P.ProtocolError, match="limit is 4096") as info:
        P.unpack(body, LIMITS)
    assert info.value.code is ErrorCode.TOO_LARGE


def test_bytes_map_keys_and_bin_values_are_rejected_by_validation():
    raw = msgpack.packb({b"v": 2, "id": 1, "op": "health"}, use_bin_type=True)
    e = err_raw(raw)
    assert e.code is ErrorCode.BAD_REQUEST and "message keys must be str, got b'v'" in e.message and e.request_id == 1
    e = err_raw(msgpack.packb({"v": 2, "id": 1, "op": b"health"}, use_bin_type=True))
    assert "op is required and must be a str" in e.message


def err_raw(raw: bytes) -> P.ProtocolError:
    with pytest.raises(P.ProtocolError) as info:
        P.decode_request(P.unpack(raw, LIMITS), LIMITS)
    return info.value


def test_peek_id():
    assert P.peek_id({"id": 3}) == 3 and P.peek_id({"id": "a"}) == "a"
    assert P.peek_id({"id": 1.0}) is None and P.peek_id([1]) is None and P.peek_id({}) is None


# ------------------------------------------------------------------ replies, limits, signing
def test_replies():
    assert P.ok_reply(1, {"x": 1}) == {"v": 2, "id": 1, "ok": True, "result": {"x": 1}}
    e = P.error_reply(None, ErrorCode.TOO_LARGE, "m")
    assert e == {"v": 2, "id": None, "ok": False, "error": {"code": "too_large", "message": "m"}}
    assert P.reply_error(P.ok_reply(1, None)) is None
    assert P.reply_error(e).code is ErrorCode.TOO_LARGE
    assert P.reply_error({"ok": False, "error": {"code": "martian"}}).code is ErrorCode.INTERNAL
    assert P.reply_error({"ok": False}).code is ErrorCode.INTERNAL


def test_limits_validate():
    with pytest.raises(ValueError, match="max_n"):
        P.ProtocolLimits(max_n=0)
    with pytest.raises(ValueError, match="max_batch"):
        P.ProtocolLimits(max_batch=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        P.ProtocolLimits().max_n = 3
    assert P.ProtocolLimits().hard_max_message_bytes > P.ProtocolLimits().max_message_bytes


def test_sign_verify():
    mac = P.sign(b"k" * 16, b"body")
    assert len(mac) == P.MAC_BYTES and P.verify(b"k" * 16, b"body", mac)
    assert not P.verify(b"k" * 16, b"bodY", mac) and not P.verify(b"j" * 16, b"body", mac)
    assert not P.verify(b"k" * 16, b"body", mac[:-1])


# ------------------------------------------------------------------ stop strings
STOP_LIMITS = dataclasses.replace(LIMITS, max_stop_strings=3, max_stop_chars=8)


def test_stop_strings_round_trip_and_normalise():
    sent = P.GenerateRequest(prompt_ids=[1], params=SamplingParams(stop=["###", "世界", "😀"],
                                                                   include_stop_str_in_output=True))
    wire = sent.to_wire(1)
    assert wire["params"] == {"stop": ["###", "世界", "😀"], "include_stop_str_in_output": True}
    assert decode(wire, STOP_LIMITS)[1] == sent
    assert decode(gen(params={"stop": "END"}), STOP_LIMITS)[1].params.stop == ("END",)   # one str = one stop


@pytest.mark.parametrize("value, needle", [
    (5, "params.stop must be a str or a sequence of str"), ([1], "params.stop[0] must be a non-empty str"),
    ([""], "params.stop[0] must be a non-empty str"), (["a", None], "params.stop[1] must be a non-empty str"),
    ({"a": 1}, "params.stop must be a str or a sequence of str"), (b"ab", "params.stop must be a str"),
    ([["a"]], "params.stop[0] must be a non-empty str"),
])
def test_stop_strings_bad_types_are_bad_requests(value, needle):
    e = err(gen(params={"stop": value}), STOP_LIMITS)
    assert e.code is ErrorCode.BAD_REQUEST and needle in e.message, e.message


@pytest.mark.parametrize("value, needle", [
    (["a", "b", "c", "d"], "params.stop has 4 strings; the limit is 3"),
    (["ok", "x" * 9], "params.stop[1] has 9 chars; the limit is 8"),
    ("y" * 9, "params.stop has 9 chars; the limit is 8"),
])
def test_stop_strings_over_limits_are_too_large(value, needle):
    e = err(gen(params={"stop": value}), STOP_LIMITS)
    assert e.code is ErrorCode.TOO_LARGE and needle in e.message, e.message
    assert e.request_id == 7


def test_stop_string_include_flag_must_be_a_bool():
    e = err(gen(params={"stop": ["a"], "include_stop_str_in_output": "yes"}), STOP_LIMITS)
    assert e.code is ErrorCode.BAD_REQUEST and "params.include_stop_str_in_output" in e.message
