"""Memory and load bounds of the ZeroMQ front end (rollout/frontend_limits.py): a multi-frame message over the
caps is read and dropped frame by frame, admission counts work (prompt tokens + n x max_tokens) as well as
requests, per connection too, and the work of a client that vanished is aborted once a reply to it cannot be
delivered. Loopback only; every wait is bounded or waits on an explicit event."""
from __future__ import annotations

import asyncio
import tracemalloc

import pytest
import zmq
import zmq.utils.monitor

from rollout import protocol as P
from rollout.frontend_limits import AdmissionLimits, request_work
from rollout.server import FrontEnd
from tests.rollout.stub_backend import StubBackend
from tests.rollout.test_server import Raw

BIND = "tcp://127.0.0.1:*"
V = P.PROTOCOL_VERSION
LIMITS = P.ProtocolLimits(max_message_bytes=4096)


def run(coro, timeout_s: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def gen(rid, prompt_len: int, max_tokens: int, n: int = 1) -> dict:
    return {"v": V, "id": rid, "op": "generate", "prompt_ids": [1] * prompt_len,
            "params": {"max_tokens": max_tokens, "n": n}}


async def until(predicate, what: str, limit_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_oversize_multi_frame_message_is_refused_with_bounded_memory():
    """400 frames of 64 KiB (25 MiB) in one message, each frame under the socket's per-frame cap: refused with
    one reply while the server held at most one frame of it at a time (Python allocations measured); then a
    message with too many (small) frames."""
    chunk = b"\x00" * 65536

    async def main():
        fe = FrontEnd(StubBackend(), BIND, limits=LIMITS)
        await fe.start()
        raw = Raw(fe.address)
        try:
            tracemalloc.start()
            await raw.send(b"", *([chunk] * 400))
            many = (await raw.recv())[1]
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            await raw.send(b"", b"{}", b"x" * 32, b"y")      # 4 small frames after the routing id
            heavy = (await raw.recv())[1]
            await raw.send_msg({"v": V, "id": "after", "op": "health"})
            after = (await raw.recv())[1]
            return many, peak, heavy, after, dict(fe.counters)
        finally:
            raw.close()
            await fe.shutdown(timeout_s=5)
    many, peak, heavy, after, counters = run(main())
    assert many["ok"] is False and many["id"] is None and many["error"]["code"] == "too_large"
    cap = LIMITS.hard_max_message_bytes + P.MAC_BYTES
    assert f"more than {cap} bytes (401 frames, 26214400 bytes)" in many["error"]["message"], many
    assert peak < 4 << 20, f"the server held {peak / 2**20:.1f} MiB of a refused 25 MiB message"
    assert heavy["error"]["code"] == "bad_request" and "more than 3 frames" in heavy["error"]["message"], heavy
    assert after["ok"] is True and counters["received"] == counters["replied"] == 3


def test_request_work_counts_prompt_tokens_and_every_sample():
    def decode(msg):
        return P.decode_request(msg, P.ProtocolLimits())[1]
    assert request_work(decode(gen(1, 10, 30, n=4))) == 10 + 4 * 30
    assert request_work(decode({"v": V, "id": 1, "op": "generate", "prompts": [[1, 2], [3]],
                                "params": {"max_tokens": 5, "n": 2}})) == 3 + 2 * 2 * 5
    assert request_work(decode({"v": V, "id": 1, "op": "step_session", "session_id": "s", "new_token_ids": [1, 2],
                                "params": {"max_tokens": 7}})) == 9
    assert request_work(decode({"v": V, "id": 1, "op": "run_episode", "env": "e", "max_turns": 3,
                                "params": {"max_tokens": 4}})) == 12
    assert request_work(decode({"v": V, "id": 1, "op": "health"})) == 0
    with pytest.raises(ValueError, match="max_in_flight_tokens"):
        AdmissionLimits(max_in_flight_tokens=0)


def test_back_pressure_counts_work_and_per_client_quotas():
    async def main():
        backend = StubBackend()
        fe = FrontEnd(backend, BIND, max_in_flight_tokens=100, max_tokens_per_client=90, max_in_flight_per_client=3)
        await fe.start()
        a, b = Raw(fe.address), Raw(fe.address)
        try:
            backend.hold()
            await a.send_msg(gen("a1", 10, 30))                 # work 40: in
            await a.send_msg(gen("a2", 10, 30))                 # 80 for a: in
            await until(lambda: fe._admission.work == 80, "a's work admitted")
            refusals = []
            for sock, msg in ((a, gen("a3", 10, 10)),           # a: 80 + 20 > 90 (its quota)
                              (b, gen("b1", 10, 20, n=2)),      # all: 80 + 50 > 100
                              (b, gen("b2", 50, 51)),           # alone over max_tokens_per_client: never fits
                              (b, gen("b3", 10, 90, n=2))):     # alone over max_in_flight_tokens
                await sock.send_msg(msg)
                refusals.append((await sock.recv())[1])
            await b.send_msg(gen("b4", 5, 10))                  # 80 + 15 <= 100: in
            await b.send_msg({"v": V, "id": "h", "op": "health"})
            health = (await b.recv())[1]                        # health is never turned away
            await b.send_msg(gen("b5", 1, 1))                   # b's 2nd: in (work 97)
            await b.send_msg(gen("b6", 1, 1))                   # b's 3rd: in (work 99), max 3 per connection
            await b.send_msg(gen("b7", 1, 1))                   # b's 4th: refused by count, though work fits
            opened = [(await b.recv())[1]]
            backend.release()
            done = await a.recv_n(2) + await b.recv_n(3)
            await a.send_msg(gen("a3", 10, 10))                 # retried once the work drained: in
            retried = (await a.recv())[1]
            return refusals, health, opened, done, retried, fe._admission.work, fe._admission.requests
        finally:
            a.close()
            b.close()
            await fe.shutdown(timeout_s=5)
    refusals, health, opened, done, retried, work_left, requests_left = run(main())
    codes = [(r["id"], r["error"]["code"]) for r in refusals]
    assert codes == [("a3", "unavailable"), ("b1", "unavailable"), ("b2", "too_large"), ("b3", "too_large")], codes
    assert "max_tokens_per_client 90" in refusals[0]["error"]["message"]
    assert "max_in_flight_tokens 100" in refusals[1]["error"]["message"]
    assert "work (prompt tokens + n x max_tokens) is 101 tokens" in refusals[2]["error"]["message"]
    assert health["ok"] is True
    assert opened[0]["id"] == "b7" and opened[0]["error"]["code"] == "unavailable"
    assert "max_in_flight_per_client 3" in opened[0]["error"]["message"]
    assert sorted(r["id"] for r in done) == ["a1", "a2", "b4", "b5", "b6"] and all(r["ok"] for r in done)
    assert retried["ok"] is True and work_left == 0 and requests_left == 0


class _LateBackend(StubBackend):
    """generate([77]) waits for ``late`` (not for the stub's gate) and returns no trajectories."""

    async def generate(self, prompt_ids, params):
        if prompt_ids == [77]:
            await self.late.wait()
            return []
        return await super().generate(prompt_ids, params)


def test_vanished_clients_work_is_aborted_once_a_reply_cannot_be_delivered():
    """A client with 3 held requests and one that finishes later closes its socket. Once the server has seen the
    disconnect, the late request's reply cannot be delivered (ROUTER_MANDATORY: EHOSTUNREACH), so the 3 held ones
    are cancelled at the backend (which aborts them and frees their KV); another client's request runs on."""
    async def main():
        backend = _LateBackend()
        backend.late = asyncio.Event()
        fe = FrontEnd(backend, BIND)
        await fe.start()
        monitor = fe._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        gone, stays = Raw(fe.address), Raw(fe.address)
        try:
            backend.hold()
            for i in range(3):
                await gone.send_msg(gen(f"held{i}", 2, 4))
            await gone.send_msg(gen("late", 1, 4) | {"prompt_ids": [77]})
            await stays.send_msg(gen("other", 2, 4))
            await until(lambda: len(backend._running) == 4 and fe.num_in_flight == 5, "5 requests in flight")
            gone.close()
            event = zmq.utils.monitor.parse_monitor_message(await asyncio.wait_for(monitor.recv_multipart(), 5))
            assert event["event"] == zmq.EVENT_DISCONNECTED
            # NOTE: one ZeroMQ I/O thread handles both connections in order: by the time it has passed on this
            # round trip of the other client, it has told the ROUTER that the gone peer's pipe is closing.
            await stays.send_msg({"v": V, "id": "ping", "op": "health"})
            assert (await stays.recv())[1]["id"] == "ping"
            backend.late.set()                   # the late reply now goes to a peer that is gone
            await until(lambda: backend.cancelled == 3, "the gone client's 3 held requests cancelled")
            backend.release()
            other = (await stays.recv())[1]
            return other, dict(fe.counters), fe._admission.requests
        finally:
            stays.close()
            monitor.close(0)
            await fe.shutdown(timeout_s=5)
    other, counters, left = run(main())
    assert other["id"] == "other" and other["ok"] is True
    assert counters["aborted_for_vanished_client"] == 3 and counters["replies_undeliverable"] >= 1 and left == 0
