"""Fuzzing the front end: random and mutated messages; every message gets exactly one reply carrying the id
the message's (parseable) id, and the server stays up. ``ROLLOUT_FUZZ_MESSAGES=100000`` for a long run."""
from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from typing import Any, Optional

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout import protocol as P
from rollout.server import FrontEnd
from tests.rollout.stub_backend import StubBackend
from tests.rollout.test_server import Raw

NUM_MESSAGES = int(os.environ.get("ROLLOUT_FUZZ_MESSAGES", "20000"))
LIMITS = P.ProtocolLimits(max_message_bytes=8192, max_prompt_tokens=64, max_request_tokens=128, max_batch=4,
                          max_new_tokens=16, max_n=3, max_turns=3, max_kwargs_items=32)
WINDOW = 200    # messages in flight at once (well under the socket's high-water marks)

VALID = [
    {"op": "generate", "prompt_ids": [1, 2, 3], "params": {"max_tokens": 4, "n": 2, "temperature": 0.5}},
    {"op": "generate", "prompts": [[1], [2, 3]], "params": {"max_tokens": 2}},
    {"op": "open_session", "session_id": "s", "ttl_s": 5.0},
    {"op": "step_session", "session_id": "s", "new_token_ids": [4, 5], "params": {"max_tokens": 3}},
    {"op": "close_session", "session_id": "s"},
    {"op": "run_episode", "env": "echo", "env_kwargs": {"prompt": [1]}, "max_turns": 2, "params": {"max_tokens": 2}},
    {"op": "abort", "request_id": 3},
    {"op": "update_weights", "loader": "stub", "loader_kwargs": {}, "mode": "keep"},
    {"op": "stats"},
    {"op": "health"},
]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12 if depth < 4 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, 1, -1, 2 ** 31, 2 ** 63 - 1, -(2 ** 63), 2 ** 64 - 1, rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.0, -1.5, 1e308, float("nan"), float("inf"), rng.random()])
    if kind == 4:
        return "".join(rng.choice("abcé\x00 _") for _ in range(rng.randrange(0, 20)))
    if kind == 5:
        return rng.randbytes(rng.randrange(0, 20))
    if kind == 6:
        return rng.choice(["generate", "health", "s", "echo", "keep", ""])
    if kind == 7:
        return msgpack.ExtType(rng.randrange(0, 128), rng.randbytes(3))
    if kind in (8, 9):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 6))]
    return {rng.choice(["a", "op", "id", "v", "params", "max_tokens"]): random_value(rng, depth + 1)
            for _ in range(rng.randrange(0, 5))}


def mutate(rng: random.Random, msg: dict) -> dict:
    msg = dict(msg)
    for _ in range(rng.randrange(1, 4)):
        action = rng.randrange(6)
        keys = list(msg)
        if action == 0 and keys:
            del msg[rng.choice(keys)]
        elif action == 1 and keys:
            msg[rng.choice(keys)] = random_value(rng)
        elif action == 2:
            msg[rng.choice(["extra", "stream", "params", "prompt_ids", "v", "op", "id", "nonce", "ts"])] = \
                random_value(rng)
        elif action == 3 and isinstance(msg.get("params"), dict):
            params = dict(msg["params"])
            params[rng.choice(["temperature", "top_p", "top_k", "n", "max_tokens", "seed", "stop_token_ids",
                               "logprobs", "stop", "include_stop_str_in_output", "bogus"])] = random_value(rng)
            msg["params"] = params
        elif action == 4:
            msg["op"] = rng.choice(["genrate", "", "GENERATE", "health ", "__init__", "x" * 300])
        elif action == 5:
            msg[rng.choice(["prompt_ids", "new_token_ids"])] = rng.choice(
                [[-1], [2 ** 40], list(range(100)), [[1]], "abc", [], [1.5], [True]])
    return msg


def byte_mutate(rng: random.Random, body: bytes) -> bytes:
    b = bytearray(body)
    for _ in range(rng.randrange(1, 4)):
        if b and rng.random() < 0.6:
            b[rng.randrange(len(b))] = rng.randrange(256)
        else:
            pos = rng.randrange(len(b) + 1)
            b[pos:pos] = rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdf\x7f\xff\xff\xff", b"\xdb\xff\xff\xff\xf0",
                                     b"\xc6\xff\xff\xff\xff", b"\xc1", b"\xd9\xff"])
    return bytes(b)


SECRET = b"f" * 32


def envelope(rng: random.Random, seen: list[bytes]) -> dict:
    """Protocol v2's ts + nonce: fresh, a replay of an earlier nonce, stale, malformed or absent."""
    roll = rng.random()
    if roll < 0.6:
        nonce = P.new_nonce()
        seen.append(nonce)
        return {"nonce": nonce, "ts": time.time()}
    if roll < 0.7 and seen:
        return {"nonce": rng.choice(seen), "ts": time.time()}                 # a replay
    if roll < 0.8:
        return {"nonce": P.new_nonce(), "ts": time.time() - rng.choice([31.0, -31.0, 1e9])}   # stale
    if roll < 0.9:
        return {"nonce": rng.choice([b"", b"short", "a str nonce", 7, b"x" * 65]), "ts": random_value(rng)}
    return {}


def make_message(rng: random.Random, i: int, seen: list[bytes], secret: bytes | None = None) -> list[bytes]:
    """Frames after the routing id (the DEALER adds nothing); with ``secret``, a valid HMAC of whatever the body
    is (garbage included), so the signed server decodes it."""
    kind = rng.randrange(10)
    base = {"v": 2, "id": i, **rng.choice(VALID), **envelope(rng, seen)}
    if kind == 0:
        body = rng.randbytes(rng.randrange(0, 64))
    elif kind == 1:
        body = P.pack(base)[: rng.randrange(1, len(P.pack(base)))]           # truncated
    elif kind == 2:
        body = byte_mutate(rng, P.pack(base))
    elif kind == 3:
        body = rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff",
                           b"\xc6\xff\xff\xff\xff\x00", b"\x91" * rng.randrange(100, 3000),
                           b"\x81\xa1a" * rng.randrange(1, 2000)])                 # huge lengths, deep nesting
    elif kind == 4:
        body = msgpack.packb(random_value(rng), use_bin_type=True)               # nested garbage
    elif kind == 5:
        body = P.pack({"v": 2, "id": i, "op": "generate", "prompt_ids": [1] * rng.randrange(4000, 6000)})
    elif kind in (6, 7, 8):
        body = msgpack.packb(mutate(rng, base), use_bin_type=True)
    else:
        body = P.pack(base)
    mac = [P.sign(secret, body)] if secret is not None else []
    roll = rng.random()
    if roll < 0.05:
        return [b"", body, *mac, rng.randbytes(3)]                               # one frame too many
    return [b"", body, *mac] if roll < 0.6 else [body, *mac]


def expected_id(frames: list[bytes], signed: bool = False) -> Optional[Any]:
    """The id the reply must echo: the request's, when its single body frame (+ its HMAC when ``signed``) decodes
    to a map with a valid id."""
    body_frames = frames[1:] if frames[0] == b"" else frames
    if len(body_frames) != 1 + signed:
        return None
    try:
        return P.peek_id(P.unpack(body_frames[0], LIMITS), LIMITS)
    except P.ProtocolError:
        return None


async def fuzz(num_messages: int, seed: int, secret: bytes | None = None) -> tuple[Counter, Counter, dict]:
    rng = random.Random(seed)
    seen: list[bytes] = []
    fe = FrontEnd(StubBackend(), "tcp://127.0.0.1:*", limits=LIMITS, max_in_flight=64, allow_update_weights=True,
                  auth_secret=secret)
    await fe.start()
    raw = Raw(fe.address)
    want: Counter = Counter()
    got: Counter = Counter()
    try:
        sent = 0
        while sent < num_messages:
            batch = [make_message(rng, sent + k, seen, secret) for k in range(min(WINDOW, num_messages - sent))]
            for frames in batch:
                want[expected_id(frames, secret is not None)] += 1
                await raw.send(*frames)
            for reply in await raw.recv_n(len(batch), timeout_s=20):
                assert reply["v"] == 2 and isinstance(reply["ok"], bool)
                if not reply["ok"]:
                    assert reply["error"]["code"] in {c.value for c in P.ErrorCode} and reply["error"]["message"]
                got[reply["id"]] += 1
                message = reply.get("error", {}).get("message", "")
                if reply["id"] is None and "is already in flight on this connection" in message:
                    got["<duplicate id refused>"] += 1     # its reply has id nil (never taken for the first's)
                if "nonce was already used" in message or "ts is stale" in message:
                    got["<replay or stale refused>"] += 1
            sent += len(batch)
        assert await raw.nothing_more(0.3), "a message got more than one reply"
        final = {"v": 2, "id": "final", "op": "health", "nonce": P.new_nonce(), "ts": time.time()}
        body = P.pack(final)
        await raw.send(b"", body, *([P.sign(secret, body)] if secret is not None else []))
        health = (await raw.recv())[1]
        assert fe._recv_task is not None and not fe._recv_task.done()
        return want, got, {"health": health, "counters": dict(fe.counters)}
    finally:
        raw.close()
        await fe.shutdown(timeout_s=5)


def _check(want: Counter, got: Counter, info: dict, num_messages: int, start: float, signed: bool) -> None:
    # Every message got exactly one reply with its own id, except the ones refused because their id was already in
    # flight on the connection: those got one reply with id nil instead.
    dups = got.pop("<duplicate id refused>", 0)
    replays = got.pop("<replay or stale refused>", 0)
    missing = want - got
    assert sum(missing.values()) == dups and None not in missing and got[None] == want[None] + dups
    assert not got - want - Counter({None: dups}), "a reply with an id no message had, or one too many"
    assert info["health"]["ok"] is True and info["health"]["id"] == "final"
    c = info["counters"]
    assert c["received"] == c["replied"] == num_messages + 1
    assert c["ok"] > 0.05 * num_messages and c["bad_request"] > 0.3 * num_messages
    assert c.get("internal", 0) == 0, c
    if signed:   # most oversize bodies lack a nonce there, and are refused for that before their size is checked
        assert replays > 0.02 * num_messages, replays
    else:        # no secret: ts / nonce are only validated
        assert c["too_large"] > 0 and replays == 0
    print(f"fuzz{' (signed)' if signed else ''}: {num_messages} messages in {time.monotonic() - start:.1f} s: "
          f"{replays} replays/stale refused; {c}")


def test_fuzz_every_message_gets_exactly_one_reply():
    start = time.monotonic()
    want, got, info = asyncio.run(asyncio.wait_for(fuzz(NUM_MESSAGES, seed=1234), 60 + NUM_MESSAGES / 50))
    _check(want, got, info, NUM_MESSAGES, start, signed=False)


def test_fuzz_signed_server_refuses_replays_and_answers_every_message_once():
    """The same fuzz against a server with a secret: every body (garbage included) carries a valid HMAC, and the
    envelope's nonce / ts are fresh, replayed, stale, malformed or absent."""
    num = max(NUM_MESSAGES // 5, 2000)
    start = time.monotonic()
    want, got, info = asyncio.run(asyncio.wait_for(fuzz(num, seed=99, secret=SECRET), 60 + num / 50))
    _check(want, got, info, num, start, signed=True)


# ------------------------------------------------------------------ decoder properties (no sockets)
_MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 63), max_value=2 ** 64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(op=st.sampled_from(sorted(P.REQUEST_TYPES)), fields=st.dictionaries(
    st.sampled_from(["prompt_ids", "prompts", "params", "session_id", "new_token_ids", "env", "env_kwargs",
                     "max_turns", "request_id", "loader", "loader_kwargs", "version", "mode", "kv", "ttl_s",
                     "stream", "id", "v"]), _MSGPACK_VALUES, max_size=6))
def test_decode_raises_only_protocol_errors(op, fields):
    msg = {"v": 2, "id": 1, "op": op, **fields}
    try:
        P.decode_request(P.unpack(P.pack(msg), LIMITS), LIMITS)
    except P.ProtocolError as e:
        assert e.message


@settings(max_examples=400, deadline=None)
@given(body=st.binary(max_size=200))
def test_unpack_raises_only_protocol_errors(body):
    try:
        msg = P.unpack(body, LIMITS)
    except P.ProtocolError:
        return
    try:
        P.decode_request(msg, LIMITS)
    except P.ProtocolError:
        pass
