"""Clients of the ZeroMQ front end: ``RolloutClient`` (blocking) and ``AsyncRolloutClient`` (asyncio).

Both speak over one DEALER socket and match replies to requests by ``id`` (so a late reply to a
request that timed out is recognised and dropped, never handed to the next call). Error replies
raise ``RolloutError`` with the server's code; no reply within ``timeout_s`` raises ``TimeoutError``
(the request may still run on the server). Methods mirror the ops of docs/protocol.md and return
``Trajectory`` objects. Neither client is thread-safe: one per thread (or per event loop).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, Optional, Sequence

import zmq
import zmq.asyncio

from engine.sampling_params import SamplingParams
from rollout import protocol as P
from rollout.backend import ErrorCode, RolloutError
from rollout.trajectory import Trajectory

logger = logging.getLogger(__name__)


class _Codec:
    """Framing shared by both clients: [b"", body(, mac)] out, the same back.

    Every request carries a fresh random ``nonce`` and its send time ``ts`` (protocol version 2); the server
    echoes the nonce, and a reply is only taken as the answer to a request whose nonce it carries. With a
    secret, a reply must be signed (error replies included) and carry the nonce: anything else is dropped.
    """

    def __init__(self, auth_secret: Optional[bytes], max_reply_bytes: int) -> None:
        self.auth_secret = auth_secret
        self.max_reply_bytes = max_reply_bytes
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        return next(self._ids)

    def encode(self, request: P.Request, request_id: P.RequestId) -> tuple[list[bytes], bytes]:
        """The frames to send and the request's nonce (the reply must echo it)."""
        nonce = P.new_nonce()
        body = P.pack(request.to_wire(request_id, nonce=nonce))
        frames = [b"", body]
        if self.auth_secret is not None:
            frames.append(P.sign(self.auth_secret, body))
        return frames, nonce

    def decode(self, frames: list[bytes]) -> Optional[dict[str, Any]]:
        """A reply map, or None for anything that is not a well-formed (and, with a secret, signed) reply."""
        if frames and frames[0] == b"":
            frames = frames[1:]
        if not frames or len(frames[0]) > self.max_reply_bytes:
            return None
        body = frames[0]
        if self.auth_secret is not None and (len(frames) != 2 or not P.verify(self.auth_secret, body, frames[1])):
            # NOTE: error replies too: an unsigned "error" could come from anyone able to reach our socket.
            logger.warning("dropping a reply that is not signed with our secret")
            return None
        try:
            reply = P.unpack(body, P.ProtocolLimits(max_message_bytes=self.max_reply_bytes))
        except P.ProtocolError:
            return None
        if not isinstance(reply, dict) or reply.get("v") != P.PROTOCOL_VERSION or "ok" not in reply:
            return None
        if self.auth_secret is not None and not isinstance(reply.get("nonce"), bytes):
            return None    # a signed reply always echoes the request's nonce
        return reply

    @staticmethod
    def answers(reply: dict[str, Any], request_id: P.RequestId, nonce: bytes, sole: bool) -> bool:
        """Is ``reply`` the answer to the request (``request_id``, ``nonce``)? A reply that carries a nonce must
        carry this one (and this id, or nil when the server could not read it); one without (the server could
        not read the message at all) is taken by id, or when nil and an error, by the ``sole`` request pending."""
        got = reply.get("nonce")
        if got is not None:
            return got == nonce and reply.get("id") in (request_id, None)
        if reply.get("id") is None:
            return sole and reply.get("ok") is False
        return reply.get("id") == request_id


def _result(reply: dict[str, Any]) -> Any:
    err = P.reply_error(reply)
    if err is not None:
        raise err
    return reply.get("result")


def _traj(result: dict[str, Any]) -> Trajectory:
    return Trajectory.from_dict(result["trajectory"])


def _requests(prompt_ids: Optional[Sequence[int]], prompts: Optional[Sequence[Sequence[int]]],
              params: Optional[SamplingParams]) -> P.GenerateRequest:
    return P.GenerateRequest(prompt_ids=None if prompt_ids is None else list(prompt_ids),
                             prompts=None if prompts is None else [list(p) for p in prompts],
                             params=params or SamplingParams())


class RolloutClient:
    """Blocking client: one request at a time over a DEALER."""

    def __init__(self, address: str = "tcp://127.0.0.1:5555", *, timeout_s: float = 120.0,
                 auth_secret: Optional[bytes] = None, max_reply_bytes: int = 256 << 20,
                 context: Optional[zmq.Context] = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._codec = _Codec(auth_secret, max_reply_bytes)
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(address)

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> "RolloutClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, request: P.Request, timeout_s: Optional[float] = None) -> Any:
        """Send one typed request and return its ``result`` (raises RolloutError / TimeoutError)."""
        request_id = self._codec.next_id()
        frames, nonce = self._codec.encode(request, request_id)
        self._sock.send_multipart(frames)
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not self._sock.poll(left_ms, zmq.POLLIN):
                raise TimeoutError(f"no reply to {request.op} (id {request_id}) from {self.address} "
                                   f"within {timeout_s or self.timeout_s} s")
            reply = self._codec.decode(self._sock.recv_multipart())
            if reply is not None and self._codec.answers(reply, request_id, nonce, sole=True):
                return _result(reply)
            # else: not ours (a late reply to an earlier request that timed out, or not signed by our server)

    # ------------------------------------------------------------------ ops
    def generate(self, prompt_ids: Sequence[int], params: Optional[SamplingParams] = None) -> list[Trajectory]:
        """One prompt, ``params.n`` trajectories."""
        res = self.request(_requests(prompt_ids, None, params))
        return [Trajectory.from_dict(d) for d in res["trajectories"]]

    def generate_batch(self, prompts: Sequence[Sequence[int]],
                       params: Optional[SamplingParams] = None) -> list[Trajectory]:
        """Many prompts in one request: ``len(prompts) * n`` trajectories, prompt-major."""
        res = self.request(_requests(None, prompts, params))
        return [Trajectory.from_dict(d) for d in res["trajectories"]]

    def open_session(self, session_id: Optional[str] = None, ttl_s: Optional[float] = None) -> str:
        return self.request(P.OpenSessionRequest(session_id, ttl_s))["session_id"]

    def step_session(self, session_id: str, new_token_ids: Sequence[int],
                     params: Optional[SamplingParams] = None) -> Trajectory:
        return _traj(self.request(P.StepSessionRequest(session_id, list(new_token_ids), params or SamplingParams())))

    def close_session(self, session_id: str) -> Trajectory:
        return _traj(self.request(P.CloseSessionRequest(session_id)))

    def run_episode(self, env: str, env_kwargs: Optional[dict[str, Any]] = None,
                    params: Optional[SamplingParams] = None, max_turns: int = 8) -> Trajectory:
        return _traj(self.request(P.RunEpisodeRequest(env, env_kwargs or {}, params or SamplingParams(), max_turns)))

    def abort(self, request_id: P.RequestId) -> bool:
        return self.request(P.AbortRequest(request_id))["found"]

    def update_weights(self, loader: str, loader_kwargs: Optional[dict[str, Any]] = None,
                       version: Optional[int] = None, mode: str = "keep", kv: str = "keep") -> dict[str, Any]:
        return self.request(P.UpdateWeightsRequest(loader, loader_kwargs or {}, version, mode, kv))

    def stats(self) -> dict[str, Any]:
        return self.request(P.StatsRequest())

    def health(self, timeout_s: Optional[float] = None) -> dict[str, Any]:
        return self.request(P.HealthRequest(), timeout_s)


class AsyncRolloutClient:
    """asyncio client: many concurrent requests over one DEALER, replies matched by id.

    Every method takes an optional ``request_id`` (the wire id; default: the next int) so that a
    request can be aborted from another task: ``await client.abort(that_id)``.
    """

    def __init__(self, address: str = "tcp://127.0.0.1:5555", *, timeout_s: float = 120.0,
                 auth_secret: Optional[bytes] = None, max_reply_bytes: int = 256 << 20,
                 context: Optional[zmq.asyncio.Context] = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._codec = _Codec(auth_secret, max_reply_bytes)
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.connect(address)
        self._waiting: dict[P.RequestId, tuple[asyncio.Future, bytes]] = {}   # id -> (future, nonce)
        self._reader: Optional[asyncio.Task] = None

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        for fut, _ in self._waiting.values():
            if not fut.done():
                fut.set_exception(RolloutError(ErrorCode.UNAVAILABLE, "client closed"))
        self._sock.close(0)

    async def __aenter__(self) -> "AsyncRolloutClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read(self) -> None:
        while True:
            reply = self._codec.decode(await self._sock.recv_multipart())
            if reply is not None:
                self._deliver(reply)

    def _deliver(self, reply: dict[str, Any]) -> None:
        """Hand a decoded reply to the request it answers (by id, or by nonce when the id is nil); drop it else."""
        rid = reply.get("id")
        if rid is None and isinstance(reply.get("nonce"), bytes):
            rid = next((i for i, (_, n) in self._waiting.items() if n == reply["nonce"]), None)
        elif rid is None and len(self._waiting) == 1:
            rid = next(iter(self._waiting))        # an unreadable request: only one could be ours
        entry = self._waiting.get(rid)
        if entry is not None and not entry[0].done() and self._codec.answers(reply, rid, entry[1], sole=True):
            entry[0].set_result(reply)

    async def request(self, request: P.Request, *, request_id: Optional[P.RequestId] = None,
                      timeout_s: Optional[float] = None) -> Any:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(), name="rollout-client-reader")
        if request_id is None:
            request_id = self._codec.next_id()
        if request_id in self._waiting:
            raise ValueError(f"request id {request_id!r} is already in flight on this client")
        fut = asyncio.get_running_loop().create_future()
        frames, nonce = self._codec.encode(request, request_id)
        self._waiting[request_id] = (fut, nonce)
        try:
            await self._sock.send_multipart(frames)
            limit = self.timeout_s if timeout_s is None else timeout_s
            try:
                reply = await asyncio.wait_for(fut, limit)
            except asyncio.TimeoutError:
                raise TimeoutError(f"no reply to {request.op} (id {request_id!r}) from {self.address} "
                                   f"within {limit} s") from None
        finally:
            self._waiting.pop(request_id, None)
        return _result(reply)

    # ------------------------------------------------------------------ ops
    async def generate(self, prompt_ids: Sequence[int], params: Optional[SamplingParams] = None,
                       **kw: Any) -> list[Trajectory]:
        res = await self.request(_requests(prompt_ids, None, params), **kw)
        return [Trajectory.from_dict(d) for d in res["trajectories"]]

    async def generate_batch(self, prompts: Sequence[Sequence[int]], params: Optional[SamplingParams] = None,
                             **kw: Any) -> list[Trajectory]:
        res = await self.request(_requests(None, prompts, params), **kw)
        return [Trajectory.from_dict(d) for d in res["trajectories"]]

    async def open_session(self, session_id: Optional[str] = None, ttl_s: Optional[float] = None, **kw: Any) -> str:
        return (await self.request(P.OpenSessionRequest(session_id, ttl_s), **kw))["session_id"]

    async def step_session(self, session_id: str, new_token_ids: Sequence[int],
                           params: Optional[SamplingParams] = None, **kw: Any) -> Trajectory:
        req = P.StepSessionRequest(session_id, list(new_token_ids), params or SamplingParams())
        return _traj(await self.request(req, **kw))

    async def close_session(self, session_id: str, **kw: Any) -> Trajectory:
        return _traj(await self.request(P.CloseSessionRequest(session_id), **kw))

    async def run_episode(self, env: str, env_kwargs: Optional[dict[str, Any]] = None,
                          params: Optional[SamplingParams] = None, max_turns: int = 8, **kw: Any) -> Trajectory:
        req = P.RunEpisodeRequest(env, env_kwargs or {}, params or SamplingParams(), max_turns)
        return _traj(await self.request(req, **kw))

    async def abort(self, request_id: P.RequestId, **kw: Any) -> bool:
        return (await self.request(P.AbortRequest(request_id), **kw))["found"]

    async def update_weights(self, loader: str, loader_kwargs: Optional[dict[str, Any]] = None,
                             version: Optional[int] = None, mode: str = "keep", kv: str = "keep",
                             **kw: Any) -> dict[str, Any]:
        return await self.request(P.UpdateWeightsRequest(loader, loader_kwargs or {}, version, mode, kv), **kw)

    async def stats(self, **kw: Any) -> dict[str, Any]:
        return await self.request(P.StatsRequest(), **kw)

    async def health(self, **kw: Any) -> dict[str, Any]:
        return await self.request(P.HealthRequest(), **kw)
