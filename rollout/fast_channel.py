"""The fast control channel for CUDA IPC weight updates: the pool talks to a worker on its node over ZeroMQ,
not through a Ray actor call (which cost 2.7 ms to reach the worker's method and 1.5 ms to come back on an
H200 host, more than the engine's copy of a 0.5B model's weights).

    pool's event loop (rollout.fast_channel_client)        worker process (Ray actor)
    FastChannels.call(slot, request) ──DEALER──ipc──ROUTER──> FastChannelServer thread (poll loop)
        races the reply against the worker's death            handler(FastUpdate) -> concurrent Future
        (WORKER_DIED), the pool's shutdown (UNAVAILABLE)        (RolloutWorker._update: the engine thread)
        and an overall timeout                               <── reply once the Future resolves (done-callback
                                                                 wakes the poll loop through a socket pair)

Messages are msgpack maps (``rollout.protocol.pack`` / ``unpack``: lengths capped, no ext types, no pickle):
request ``{id, version, mode, kv, payload}`` with ``payload`` = ``CudaIpcPayload.to_wire()`` (IPC handles, their
classes and dtypes by name, rebuilt from allow-lists by ``CudaIpcPayload.from_wire``); reply ``{id, ok: report}``
or ``{id, error: {code, message}}`` with the codes the Ray path raises (``rollout.backend.ErrorCode``). That one
update is all the channel serves.

Trust boundary: the socket is ``ipc://<dir>/<name>.sock`` with ``<dir>`` from ``tempfile.mkdtemp`` (mode 0700), so
only processes of the same OS user on the same node can connect. Those can already signal the worker (and, where
ptrace is allowed, read its memory), so the channel adds no authentication of its own; what a peer can make the
worker do is map CUDA IPC handles and copy from them into its weights, so never bind it to anything wider. The pool uses a worker's channel only when that worker is on the pool's node and
its socket file is there (else, or with ``RolloutPool(fast_channel=False)``, the update goes through Ray). A
restarted worker binds a new socket; the pool reads the address from that incarnation's ``ready()``.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from rollout import protocol as P
from rollout.backend import ErrorCode
from weight_sync.cuda_ipc import CudaIpcPayload

logger = logging.getLogger(__name__)

POLL_S = 0.2                  # the server's poll timeout: how often it looks at its closing flag (close also wakes it)
# None: the pool waits for the reply or the worker's death, as a Ray call does. A finite bound would have to
# count a silent worker as an unknown outcome, not as a rejection (pool_weights has no such outcome yet).
DEFAULT_TIMEOUT_S = None
LIMITS = P.ProtocolLimits()   # 16 MiB a message: a payload is handles and a layout, tens of KB for an 8B model
DIR_PREFIX = "rollout-fast-"  # of every server's socket directory
_REQUEST_KEYS = ("id", "version", "mode", "kv", "payload")


@dataclass(frozen=True)
class FastUpdate:
    """A decoded request: apply ``payload`` at ``version`` with the engine's in-flight and KV policies."""
    version: int
    mode: str
    kv: str
    payload: CudaIpcPayload


def decode_request(body: bytes) -> tuple[Any, FastUpdate]:
    """msgpack bytes -> (id, FastUpdate); ``P.ProtocolError`` (BAD_REQUEST / TOO_LARGE) naming the bad field, with
    the id when it was readable."""
    msg = P.unpack(body, LIMITS)
    rid = msg.get("id") if isinstance(msg, dict) else None

    def bad(message: str) -> P.ProtocolError:
        return P.ProtocolError(ErrorCode.BAD_REQUEST, message, rid)
    if not isinstance(msg, dict) or set(msg) != set(_REQUEST_KEYS):
        keys = sorted(map(str, msg)) if isinstance(msg, dict) else type(msg).__name__
        raise bad(f"a request is a map with exactly the keys {list(_REQUEST_KEYS)}, got {keys}")
    for key, typ in (("id", int), ("version", int), ("mode", str), ("kv", str)):
        if not isinstance(msg[key], typ) or isinstance(msg[key], bool):
            raise bad(f"{key}: must be {typ.__name__}, got {type(msg[key]).__name__}")
    try:
        payload = CudaIpcPayload.from_wire(msg["payload"])
    except ValueError as e:
        raise bad(f"payload: {e}") from None
    return rid, FastUpdate(msg["version"], msg["mode"], msg["kv"], payload)


def _error_of(exc: BaseException) -> dict[str, str]:
    """The reply's error: a RolloutError's (or WorkerError's) code and message, else INTERNAL."""
    code, message = getattr(exc, "code", None), getattr(exc, "message", None)
    if isinstance(code, ErrorCode):
        code = code.value
    if code not in {c.value for c in ErrorCode} or not isinstance(message, str):
        code, message = ErrorCode.INTERNAL.value, f"{type(exc).__name__}: {exc}"
    return {"code": code, "message": message}


class FastChannelServer:
    """Worker side: a ROUTER on ``ipc://<private dir>/<name>.sock`` served by one daemon thread. ``handler``
    takes a ``FastUpdate`` and returns a ``concurrent.futures.Future`` of the report; it must not block (the reply
    goes out when the Future resolves). ``close()`` stops the thread and removes the socket file and its dir."""

    def __init__(self, handler: Callable[[FastUpdate], "concurrent.futures.Future[dict]"], name: str) -> None:
        self._handler = handler
        self._dir = tempfile.mkdtemp(prefix=DIR_PREFIX)     # mode 0700: the trust boundary
        self.path = os.path.join(self._dir, f"{name}.sock")
        self.address = f"ipc://{self.path}"
        self._ctx = zmq.Context()
        try:
            self._sock = self._ctx.socket(zmq.ROUTER)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.MAXMSGSIZE, 2 * LIMITS.max_message_bytes)
            self._sock.bind(self.address)
        except BaseException:
            self._ctx.destroy(linger=0)
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        # Replies are made on whatever thread resolves the Future (the engine's); only the poll thread touches the
        # ZMQ socket, so they queue here and a byte on the socket pair wakes the poll.
        self._replies: "queue.SimpleQueue[tuple[bytes, bytes]]" = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._closing = threading.Event()
        # NOTE: the socket was made on this thread and is used only by the poll thread from here on; starting the
        # thread is the memory barrier ZMQ asks for when a socket changes threads.
        self._thread = threading.Thread(target=self._serve, name=f"fast-channel-{name}", daemon=True)
        self._thread.start()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:   # full (a wake-up is pending anyway) or closed (the server is gone)
            pass

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        try:
            while not self._closing.is_set():
                events = dict(poller.poll(POLL_S * 1000))
                if self._wake_r.fileno() in events:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                while self._sock in events:
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_request(frames)
                self._send_replies()    # the engine thread's, and refusals made just now
        except Exception:  # noqa: BLE001 - log it: the pool's calls then time out or see the worker die
            logger.exception("fast channel %s: the poll loop failed", self.address)
        finally:
            self._sock.close(linger=0)
            self._ctx.term()

    def _send_replies(self) -> None:
        while True:
            try:
                peer, body = self._replies.get_nowait()
            except queue.Empty:
                return
            try:
                self._sock.send_multipart([peer, body], zmq.NOBLOCK)
            except zmq.ZMQError as e:   # the peer is gone (a closed pool): nobody waits for it
                logger.warning("fast channel %s: a reply was dropped (%s)", self.address, e)

    def _on_request(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return   # not a DEALER's one-frame message: no way to tell who to answer
        peer, body = frames
        rid = None
        received = time.monotonic()
        try:
            rid, update = decode_request(body)
            decoded = time.monotonic()
            fut = self._handler(update)
        except P.ProtocolError as e:
            self._replies.put((peer, P.pack({"id": e.request_id, "error": _error_of(e)})))
            return
        except Exception as e:  # noqa: BLE001 - a handler that refused at once
            self._replies.put((peer, P.pack({"id": rid, "error": _error_of(e)})))
            return
        fut.add_done_callback(lambda f: self._reply(peer, rid, f, {"channel_received": received,
                                                                    "channel_decoded": decoded}))

    def _reply(self, peer: bytes, rid: int, fut: "concurrent.futures.Future[dict]", stamps: dict) -> None:
        """On the thread that resolved ``fut``: queue the reply and wake the poll loop. ``stamps``: when the
        request came off the socket and was decoded (time.monotonic(), for the report's timeline)."""
        if fut.cancelled():
            msg = {"id": rid, "error": {"code": ErrorCode.ABORTED.value, "message": "the update was cancelled"}}
        elif fut.exception() is not None:
            msg = {"id": rid, "error": _error_of(fut.exception())}
        else:
            report = fut.result()
            if isinstance(report.get("timeline"), dict):
                report["timeline"].update(stamps)
            msg = {"id": rid, "ok": report}
        try:
            body = P.pack(msg)
        except Exception as e:  # noqa: BLE001 - a report that is not plain msgpack values
            body = P.pack({"id": rid, "error": _error_of(e)})
        self._replies.put((peer, body))
        self._wake()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the poll thread (within one poll, woken at once) and remove the socket file and its dir."""
        self._closing.set()
        self._wake()
        self._thread.join(timeout_s)
        self._wake_w.close()
        self._wake_r.close()
        shutil.rmtree(self._dir, ignore_errors=True)
