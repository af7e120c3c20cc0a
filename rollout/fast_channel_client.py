"""The pool's side of the fast channel (``rollout.fast_channel``: what it is, its messages, its trust boundary):
one DEALER per worker incarnation on the pool's event loop, and the call that races a reply against the worker's
death like ``rollout.pool_supervisor.Supervisor.call``."""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import time
from typing import Any, Optional

import zmq
import zmq.asyncio

from rollout import protocol as P
from rollout.backend import ErrorCode, RolloutError
from rollout.fast_channel import DEFAULT_TIMEOUT_S, DIR_PREFIX, LIMITS

logger = logging.getLogger(__name__)


class FastChannelClient:
    """Pool side, one worker incarnation: a DEALER on the pool's event loop; replies matched to calls by id.
    Create it on that loop (its reader task runs there)."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str) -> None:
        self.address = address
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, 2 * LIMITS.max_message_bytes)
        self._sock.connect(address)
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            try:
                body = await self._sock.recv()
            except (zmq.ZMQError, asyncio.CancelledError):
                return   # closed
            try:
                msg = P.unpack(body, LIMITS)
                fut = self._pending.get(msg["id"])
            except Exception as e:  # noqa: BLE001 - a reply we cannot read: nothing to match it to
                logger.warning("fast channel %s: an unreadable reply was dropped (%s: %s)", self.address,
                               type(e).__name__, e)
                continue
            if fut is None or fut.done():
                continue   # the reply of a call that stopped waiting (a timeout)
            if isinstance(msg.get("ok"), dict):
                fut.set_result(msg["ok"])
                continue
            error = msg.get("error") if isinstance(msg.get("error"), dict) else {}
            codes = {c.value: c for c in ErrorCode}
            fut.set_exception(RolloutError(codes.get(error.get("code"), ErrorCode.INTERNAL),
                                           str(error.get("message", f"a fast-channel reply without a report: {msg}"))))

    async def send(self, request: dict) -> tuple[int, asyncio.Future]:
        """Send ``request`` (without its id); -> (id, the Future of its reply). ``forget(id)`` once done with it."""
        rid = next(self._ids)
        fut = self._pending[rid] = asyncio.get_running_loop().create_future()
        try:
            await self._sock.send(P.pack({"id": rid, **request}), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            self.forget(rid)
            raise RolloutError(ErrorCode.UNAVAILABLE, f"the fast channel {self.address} took no request: {e}") \
                from None
        return rid, fut

    def forget(self, rid: int) -> None:
        fut = self._pending.pop(rid, None)
        if fut is not None and not fut.done():
            fut.cancel()

    def close(self) -> None:
        self._reader.cancel()
        self._sock.close(linger=0)
        for rid in list(self._pending):
            self.forget(rid)


class FastChannels:
    """The pool's clients, one per worker incarnation that advertised a channel it can reach (``reachable``).
    Owned by the pool's event loop. ``node_id``: the pool's Ray node (an ``ipc://`` socket is node-local)."""

    def __init__(self, node_id: Optional[str], timeout_s: Optional[float] = DEFAULT_TIMEOUT_S) -> None:
        self.node_id = node_id
        self.timeout_s = timeout_s
        self.calls = 0                      # updates this pool sent through a fast channel
        self._ctx: Optional[zmq.asyncio.Context] = None
        self._clients: dict[Any, FastChannelClient] = {}   # Incarnation (by identity) -> its client

    def reachable(self, actor: Any) -> Optional[str]:
        """``actor``'s (a ``pool_slots.Incarnation``) channel address, if it has one this process can reach."""
        info = actor.info or {}
        address = info.get("fast_address")
        if not isinstance(address, str) or not address.startswith("ipc://") or info.get("node_id") != self.node_id:
            return None
        return address if os.path.exists(address[len("ipc://"):]) else None   # same user, same file system

    def forget(self, actor: Any) -> None:
        """``actor`` died: close its client and remove the socket it left (a killed process cleans up nothing)."""
        client = self._clients.pop(actor, None)
        if client is not None:
            client.close()
        address = self.reachable(actor)
        folder = os.path.dirname(address[len("ipc://"):]) if address else ""
        if os.path.basename(folder).startswith(DIR_PREFIX):
            shutil.rmtree(folder, ignore_errors=True)

    def _client(self, actor: Any, address: str) -> FastChannelClient:
        if actor not in self._clients:
            self._ctx = self._ctx or zmq.asyncio.Context()
            self._clients[actor] = FastChannelClient(self._ctx, address)
        return self._clients[actor]

    async def call(self, slot: Any, request: dict) -> dict:
        """Send ``request`` to ``slot``'s worker; its report, or RolloutError — WORKER_DIED as soon as the worker
        is found dead, UNAVAILABLE on the pool's shutdown or past ``timeout_s`` (as ``Supervisor.call``)."""
        actor = slot.actor
        if actor.death.done() or slot.failed:
            raise RolloutError(ErrorCode.WORKER_DIED, f"worker {slot.index} is down")
        address = self.reachable(actor)
        if address is None:
            raise RolloutError(ErrorCode.UNAVAILABLE, f"worker {slot.index} has no fast channel this pool reaches")
        client = self._client(actor, address)
        sent = time.monotonic()    # before the encoding: everything after it until the worker has it is "wire"
        rid, reply = await client.send(request)
        self.calls += 1
        actor.inflight += 1
        try:
            await asyncio.wait({reply, actor.death}, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if reply.done() and not reply.cancelled():
                report = reply.result()
                if isinstance(report.get("timeline"), dict):
                    report["timeline"]["channel_sent"] = sent   # the way in, split (PushReport.stages)
                return report
            if actor.death.done() and not actor.death.cancelled():
                raise RolloutError(ErrorCode.WORKER_DIED, f"worker {slot.index} died with this request in flight")
            if actor.death.cancelled() or reply.cancelled():   # the pool shut down (and closed the channel)
                raise RolloutError(ErrorCode.UNAVAILABLE, "the pool shut down with this request in flight")
            raise RolloutError(ErrorCode.UNAVAILABLE, f"worker {slot.index} did not answer a weight update over its "
                                                      f"fast channel within {self.timeout_s} s; whether it applied "
                                                      f"version {request.get('version')} is unknown")
        finally:
            actor.inflight -= 1
            client.forget(rid)

    def close(self) -> None:
        """Close every socket (linger 0: nothing queued is kept) and the context."""
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None
