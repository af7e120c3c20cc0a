"""Front end + clients end to end over a stub backend: every op, error codes, concurrency, framing, shutdown and
auth. Loopback only; every wait is bounded. (A real LocalBackend and the CLI: test_server_local.py.)"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

import msgpack
import pytest
import zmq
import zmq.asyncio

from engine.sampling import SamplingParams
from rollout import protocol as P
from rollout.backend import ErrorCode, RolloutError
from rollout.client import AsyncRolloutClient, RolloutClient
from rollout.server import BackgroundFrontEnd, FrontEnd, is_loopback
from tests.rollout.stub_backend import FAIL_INTERNAL, FAIL_VALUE, FAIL_WORKER, StubBackend, fake_tokens

BIND = "tcp://127.0.0.1:*"
SECRET = b"s" * 32


def run(coro, timeout_s: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


@contextlib.asynccontextmanager
async def serving(backend=None, **kw):
    fe = FrontEnd(backend or StubBackend(), BIND, **kw)
    await fe.start()
    try:
        yield fe
    finally:
        await fe.shutdown(timeout_s=5)


class Raw:
    """A bare DEALER for framing tests: send frames, collect decoded replies."""

    def __init__(self, address: str) -> None:
        self.sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    async def send(self, *frames: bytes) -> None:
        await self.sock.send_multipart(list(frames))

    async def send_msg(self, msg, delimiter: bool = True) -> None:
        body = msgpack.packb(msg, use_bin_type=True)
        await self.send(*([b"", body] if delimiter else [body]))

    async def recv(self, timeout_s: float = 5.0) -> tuple[list[bytes], dict]:
        frames = await asyncio.wait_for(self.sock.recv_multipart(), timeout_s)
        body = frames[1] if frames[0] == b"" else frames[0]
        return frames, msgpack.unpackb(body, raw=False)

    async def recv_n(self, n: int, timeout_s: float = 10.0) -> list[dict]:
        return [(await self.recv(timeout_s))[1] for _ in range(n)]

    async def nothing_more(self, wait_s: float = 0.2) -> bool:
        return not await self.sock.poll(int(wait_s * 1000))

    def close(self) -> None:
        self.sock.close(0)


# ------------------------------------------------------------------ every op, sync client
def test_every_op_sync_client():
    backend = StubBackend()
    with BackgroundFrontEnd(lambda: backend, BIND, allow_update_weights=True) as fe, \
            RolloutClient(fe.address, timeout_s=10) as c:
        h = c.health()
        assert h["ok"] is True and h["frontend"] == {"accepting": True, "in_flight": 0}   # not counting itself
        p = SamplingParams(max_tokens=4, n=3)
        trajs = c.generate([5, 6, 7], p)
        assert [t.sample_index for t in trajs] == [0, 1, 2]
        assert all(t.token_ids == fake_tokens([5, 6, 7], t.sample_index, 4) for t in trajs)
        batch = c.generate_batch([[1], [2, 3]], SamplingParams(max_tokens=2, n=2))
        assert [t.prompt_ids for t in batch] == [[1], [1], [2, 3], [2, 3]]
        sid = c.open_session("my-session", ttl_s=30)
        assert sid == "my-session"
        t1 = c.step_session(sid, [1, 2], SamplingParams(max_tokens=3))
        t2 = c.step_session(sid, [9], SamplingParams(max_tokens=3))
        assert t1.session_id == sid and t2.prompt_ids == [9]
        whole = c.close_session(sid)
        assert whole.token_ids == t1.token_ids + [9] + t2.token_ids and whole.loss_mask == [1, 1, 1, 0, 1, 1, 1]
        ep = c.run_episode("echo", {"prompt": [4, 5]}, SamplingParams(max_tokens=2), max_turns=3)
        assert ep.turns == 3 and ep.reward == 3.0 and ep.loss_mask == [1, 1, 0, 0, 1, 1, 0, 0, 1, 1]
        assert c.update_weights("stub", version=7) == {"version": 7, "seconds": 0.0, "num_bytes": 0}
        assert c.generate([1], SamplingParams(max_tokens=2))[0].versions == [7, 7]
        assert c.abort("not-running") is False
        s = c.stats()
        assert s["backend"]["weight_version"] == 7 and s["frontend"]["ok"] >= 10


def test_error_codes_sync_client():
    with BackgroundFrontEnd(StubBackend, BIND, allow_update_weights=False) as fe, \
            RolloutClient(fe.address, timeout_s=10) as c:
        cases = [
            (lambda: c.step_session("nope", [1]), ErrorCode.UNKNOWN_SESSION, "nope"),
            (lambda: c.generate([FAIL_WORKER]), ErrorCode.WORKER_DIED, "died"),
            (lambda: c.generate([FAIL_INTERNAL]), ErrorCode.INTERNAL, "RuntimeError: stub exploded"),
            (lambda: c.generate([FAIL_VALUE]), ErrorCode.BAD_REQUEST, "vocabulary"),
            (lambda: c.generate([]), ErrorCode.BAD_REQUEST, "prompt_ids must not be empty"),
            (lambda: c.generate([1], SamplingParams(max_tokens=10 ** 6)), ErrorCode.TOO_LARGE, "params.max_tokens"),
            (lambda: c.update_weights("stub"), ErrorCode.DISABLED, "update_weights"),
            (lambda: c.run_episode("nope"), ErrorCode.BAD_REQUEST, "unknown environment"),
            (lambda: c.request(P.StepSessionRequest("s", [1], stream=True)), ErrorCode.BAD_REQUEST, "stream"),
        ]
        for call, code, needle in cases:
            with pytest.raises(RolloutError) as info:
                call()
            assert info.value.code is code and needle in info.value.message, info.value
        assert c.health()["ok"]   # still serving


def test_update_failed_and_timeout():
    async def main():
        backend = StubBackend(delay_s=2.0)
        async with serving(backend, request_timeout_s=0.2, allow_update_weights=True) as fe:
            async with AsyncRolloutClient(fe.address, timeout_s=5) as c:
                with pytest.raises(RolloutError) as info:
                    await c.update_weights("martian")
                assert info.value.code is ErrorCode.UPDATE_FAILED
                start = time.monotonic()
                with pytest.raises(RolloutError) as info:
                    await c.generate([1])
                assert info.value.code is ErrorCode.ABORTED and "timed out" in info.value.message
                assert time.monotonic() - start < 1.5
                assert (await c.health())["ok"]
        assert backend.cancelled == 1
    run(main())


def test_client_timeout_and_late_reply_is_dropped():
    async def main():
        backend = StubBackend()
        async with serving(backend) as fe:
            backend.hold()
            loop = asyncio.get_running_loop()
            # the sync client blocks: run it in a thread while this loop serves
            with RolloutClient(fe.address, timeout_s=0.3) as c:
                with pytest.raises(TimeoutError):
                    await loop.run_in_executor(None, c.generate, [1])
                backend.release()
                await asyncio.sleep(0.1)               # the late reply arrives now
                backend.gate = None
                t = await loop.run_in_executor(None, c.generate, [2])
                assert t[0].prompt_ids == [2]          # not the late reply to [1]
    run(main())


# ------------------------------------------------------------------ concurrency
def test_100_concurrent_requests_exactly_one_reply_each():
    async def main():
        backend = StubBackend(delay_s=0.05)
        async with serving(backend) as fe:
            raw = Raw(fe.address)
            ids = [f"r{i}" for i in range(50)] + list(range(50))
            for i, rid in enumerate(ids):
                await raw.send_msg({"v": 2, "id": rid, "op": "generate", "prompt_ids": [i + 1],
                                    "params": {"max_tokens": 2}}, delimiter=bool(i % 2))
            replies = await raw.recv_n(100)
            assert await raw.nothing_more()
            assert Counter(r["id"] for r in replies) == Counter(ids)
            assert all(r["ok"] and r["v"] == 2 for r in replies)
            by_id = {r["id"]: r for r in replies}
            for i, rid in enumerate(ids):
                assert by_id[rid]["result"]["trajectories"][0]["token_ids"] == fake_tokens([i + 1], 0, 2)
            raw.close()

            async with AsyncRolloutClient(fe.address, timeout_s=10) as c:
                results = await asyncio.gather(*(c.generate([i], SamplingParams(max_tokens=3)) for i in range(100)))
            assert [r[0].prompt_ids for r in results] == [[i] for i in range(100)]
            assert fe.counters["received"] == fe.counters["replied"] == 200
    run(main())


def test_in_flight_limit_replies_unavailable():
    async def main():
        backend = StubBackend()
        async with serving(backend, max_in_flight=3) as fe:
            backend.hold()
            raw = Raw(fe.address)
            for i in range(5):
                await raw.send_msg({"v": 2, "id": i, "op": "generate", "prompt_ids": [1]})
            await raw.send_msg({"v": 2, "id": "h", "op": "health"})   # health is never turned away
            early = await raw.recv_n(3)
            assert {r["id"] for r in early} == {3, 4, "h"}
            assert [r["error"]["code"] for r in early if r["id"] != "h"] == ["unavailable"] * 2
            backend.release()
            late = await raw.recv_n(3)
            assert sorted(r["id"] for r in late) == [0, 1, 2] and all(r["ok"] for r in late)
            raw.close()
    run(main())


def test_duplicate_in_flight_id_and_abort_by_wire_id():
    async def main():
        backend = StubBackend()
        async with serving(backend) as fe:
            backend.hold()
            async with AsyncRolloutClient(fe.address, timeout_s=5) as c:
                task = asyncio.create_task(c.generate([1], request_id="long"))
                await asyncio.sleep(0.1)
                raw = Raw(fe.address)   # another connection may reuse the id
                await raw.send_msg({"v": 2, "id": "long", "op": "health"})
                assert (await raw.recv())[1]["ok"]
                with pytest.raises(ValueError, match="already in flight"):
                    await c.generate([2], request_id="long")
                assert await c.abort("long") is True
                with pytest.raises(RolloutError) as info:
                    await task
                assert info.value.code is ErrorCode.ABORTED
                assert await c.abort("long") is False      # gone: not found
                assert backend.cancelled == 1 and backend.calls["abort"] == 0
                raw.close()
    run(main())


def test_same_id_twice_on_one_connection_is_refused_while_in_flight():
    async def main():
        backend = StubBackend()
        async with serving(backend) as fe:
            backend.hold()
            raw = Raw(fe.address)
            await raw.send_msg({"v": 2, "id": 5, "op": "generate", "prompt_ids": [1]})
            await raw.send_msg({"v": 2, "id": 5, "op": "generate", "prompt_ids": [2]})
            first = (await raw.recv())[1]
            # the refusal has id nil: a client cannot take it for the first request's reply
            assert first["id"] is None and first["error"]["code"] == "bad_request"
            assert "id 5 is already in flight" in first["error"]["message"]
            backend.release()
            second = (await raw.recv())[1]
            assert second["ok"] and second["result"]["trajectories"][0]["prompt_ids"] == [1]
            raw.close()
    run(main())


# ------------------------------------------------------------------ framing and garbage
def test_framing_and_garbage_get_error_replies():
    async def main():
        async with serving(limits=P.ProtocolLimits(max_message_bytes=1024)) as fe:
            raw = Raw(fe.address)
            cases = [
                ([b"", b"\xc1garbage"], None, "bad_request", "not one valid msgpack"),
                ([b"\x92\x01\x02"], None, "bad_request", "must be a msgpack map"),
                ([b"", b"a", b"b"], None, "bad_request", "expected one body frame"),
                ([b""], None, "bad_request", "got 0 frames"),
                ([b"", P.pack({"v": 2, "id": 3, "op": "nope"})], 3, "unknown_operation", "nope"),
                ([P.pack({"v": 2, "id": 4, "op": "generate", "prompt_ids": [1] * 2000})], None, "too_large", "1024"),
                ([b"", P.pack({"v": 2, "id": "x", "op": "close_session", "session_id": "zz"})], "x",
                 "unknown_session", "zz"),
            ]
            for frames, rid, code, needle in cases:
                await raw.send(*frames)
                got_frames, reply = await raw.recv()
                assert (got_frames[0] == b"") == (frames[0] == b"")   # the reply mirrors the delimiter
                assert reply["id"] == rid and reply["ok"] is False
                assert reply["error"]["code"] == code and needle in reply["error"]["message"], reply
            await raw.send_msg({"v": 2, "id": 1, "op": "health"}, delimiter=False)
            frames, reply = await raw.recv()
            assert len(frames) == 1 and reply["ok"]
            raw.close()
    run(main())


def test_req_socket_client_works():
    with BackgroundFrontEnd(StubBackend, BIND) as fe:
        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sock.connect(fe.address)
        sock.send(P.pack({"v": 2, "id": 1, "op": "health"}))
        assert msgpack.unpackb(sock.recv())["ok"] is True
        sock.close(0)


# ------------------------------------------------------------------ graceful shutdown
def test_graceful_shutdown_replies_to_in_flight_and_refuses_new():
    async def main():
        backend = StubBackend()
        fe = FrontEnd(backend, BIND)
        await fe.start()
        backend.hold()
        raw = Raw(fe.address)
        for i in range(10):
            await raw.send_msg({"v": 2, "id": i, "op": "generate", "prompt_ids": [i + 1]})
        await asyncio.sleep(0.1)
        assert fe.num_in_flight == 10
        stopping = asyncio.create_task(fe.shutdown(timeout_s=5))
        await asyncio.sleep(0.05)
        await raw.send_msg({"v": 2, "id": "late", "op": "generate", "prompt_ids": [1]})
        refused = (await raw.recv())[1]
        assert refused["id"] == "late" and refused["error"]["code"] == "unavailable"
        await raw.send_msg({"v": 2, "id": "h", "op": "health"})          # health still answers while draining
        health = (await raw.recv())[1]
        assert health["ok"] and health["result"]["frontend"] == {"accepting": False, "in_flight": 10}
        backend.release()
        replies = await raw.recv_n(10)
        assert sorted(r["id"] for r in replies) == list(range(10)) and all(r["ok"] for r in replies)
        await asyncio.wait_for(stopping, 5)
        assert await raw.nothing_more()
        raw.close()
    run(main())


def test_shutdown_deadline_fails_what_is_left():
    async def main():
        backend = StubBackend()
        fe = FrontEnd(backend, BIND)
        await fe.start()
        backend.hold()
        raw = Raw(fe.address)
        for i in range(5):
            await raw.send_msg({"v": 2, "id": i, "op": "generate", "prompt_ids": [1]})
        await asyncio.sleep(0.1)
        start = time.monotonic()
        await fe.shutdown(timeout_s=0.3)
        assert time.monotonic() - start < 2
        replies = await raw.recv_n(5)
        assert sorted(r["id"] for r in replies) == list(range(5))
        assert {r["error"]["code"] for r in replies} == {"unavailable"}
        assert backend.cancelled == 5
        raw.close()
    run(main())


# ------------------------------------------------------------------ security hooks
def test_is_loopback():
    for a in ("tcp://127.0.0.1:5555", "tcp://127.0.0.2:1", "tcp://localhost:5", "tcp://[::1]:5", "ipc:///tmp/x",
              "inproc://x", "tcp://127.0.0.1:*"):
        assert is_loopback(a), a
    for a in ("tcp://*:5555", "tcp://0.0.0.0:5555", "tcp://10.0.0.1:5", "tcp://eth0:5", "tcp://example.com:5",
              "udp://127.0.0.1:5"):
        assert not is_loopback(a), a


def test_refuses_non_loopback_without_secret():
    with pytest.raises(ValueError, match="not a loopback address and no auth_secret"):
        FrontEnd(StubBackend(), "tcp://0.0.0.0:5555")
    with pytest.raises(ValueError, match="auth_secret must be bytes"):
        FrontEnd(StubBackend(), BIND, auth_secret=b"short")
    FrontEnd(StubBackend(), "tcp://0.0.0.0:5555", auth_secret=SECRET)   # allowed (not started)


def test_hmac_auth_refuses_unauthenticated_clients():
    backend = StubBackend()
    with BackgroundFrontEnd(lambda: backend, BIND, auth_secret=SECRET) as fe:
        with RolloutClient(fe.address, timeout_s=5, auth_secret=SECRET) as good:
            assert good.generate([1], SamplingParams(max_tokens=2))[0].token_ids == fake_tokens([1], 0, 2)
        with RolloutClient(fe.address, timeout_s=5) as bad:
            with pytest.raises(RolloutError, match="unauthenticated") as info:
                bad.generate([1])
            assert info.value.code is ErrorCode.BAD_REQUEST
        # A client holding a (wrong) secret drops the server's unsigned refusal like any unsigned reply.
        with RolloutClient(fe.address, timeout_s=0.5, auth_secret=b"w" * 32) as bad, pytest.raises(TimeoutError):
            bad.generate([1])
        assert backend.calls["generate"] == 1   # refused messages never reach the backend

        async def replies_are_signed():
            raw = Raw(fe.address)
            body = P.pack(P.HealthRequest().to_wire(1, nonce=P.new_nonce()))
            await raw.send(b"", body, P.sign(SECRET, body))
            frames, reply = await raw.recv()
            assert reply["ok"] and P.verify(SECRET, frames[1], frames[2])
            raw.close()
            return frames
        frames = run(replies_are_signed())
    # a client holding the secret drops a reply whose HMAC does not verify, and unsigned ok replies
    from rollout.client import _Codec
    codec = _Codec(SECRET, 1 << 20)
    assert codec.decode(frames) is not None
    assert codec.decode([b"", frames[1], P.sign(b"w" * 32, frames[1])]) is None
    assert codec.decode([b"", frames[1]]) is None

