"""``FrontEnd``: the ZeroMQ ROUTER in front of any ``RolloutBackend`` (docs/protocol.md).

One asyncio loop owns the socket. The receive loop decodes each message and either answers it at once
(malformed, over a limit, over capacity, shutting down) or starts one task for it; that task calls the
backend and sends the reply. Invariant: every message received gets exactly one reply — the task's
``finally`` path sends an error if the backend raised, timed out, was aborted or the front end shut
down (only a peer past the socket's hard size cap is disconnected without one: ZMQ drops it).

NOTE: replies are sent without awaiting (``_send``): a ROUTER never blocks on send, and a reply sent
from a cancelled task must not depend on a further await.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import zmq
import zmq.asyncio

from rollout import protocol as P
from rollout.backend import ErrorCode, RolloutBackend, RolloutError, gather_or_cancel
from rollout.frontend_limits import (
    Admission,
    AdmissionLimits,
    BoundedMessage,
    read_bounded,
    request_work,
)
from rollout.protocol_fields import naming_prompt, wire_names

logger = logging.getLogger(__name__)

DEFAULT_BIND = "tcp://127.0.0.1:5555"
MIN_SECRET_BYTES = 16
SEND_HWM = 10_000      # replies queued per peer before ZMQ drops (a client that never reads)
MAX_FRAMES = 3         # after the routing id: [empty delimiter,] body[, HMAC]


def is_loopback(address: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on 127.0.0.0/8, ::1 or localhost (not '*' or 0.0.0.0)."""
    transport, _, rest = address.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False   # '*', an interface name or a host name


@dataclass
class _Pending:
    """One request being served: where its reply goes, and its task."""

    peer: bytes                        # ROUTER routing id of the client
    delimiter: bool                    # the client sent an empty frame before the body; mirror it
    request_id: P.RequestId
    op: str
    nonce: bytes | None = None      # the request's nonce, echoed in its reply
    work: int | None = None            # tokens admitted (frontend_limits.request_work); None: not counted (health)
    task: Optional[asyncio.Task] = None
    cancel_code: ErrorCode = ErrorCode.UNAVAILABLE   # reply code if the task gets cancelled
    replied: bool = False


class FrontEnd:
    """Serve ``backend`` on a ROUTER socket. ``await start()``, then ``await shutdown()``.

    ``auth_secret``: when set, every message carries an HMAC-SHA256 of its body as a last frame and
    replies are signed the same way; required to bind anything but loopback.
    ``allow_update_weights``: ``None`` (the default) = on iff ``auth_secret`` is set. Without a secret any local
    user who can reach a loopback port or an ``ipc://`` path could make the server load weights, so
    ``update_weights`` over the wire needs an explicit ``True`` there (``rollout serve --allow-update-weights``).
    ``max_in_flight``: requests served at once; past it new ones get ``unavailable`` (health excepted).
    ``max_in_flight_tokens``, ``max_in_flight_per_client``, ``max_tokens_per_client``: the same in work (prompt
    tokens + n x max_tokens) and per connection (``rollout.frontend_limits.AdmissionLimits``).
    A client that vanished is noticed when a reply to it cannot be delivered (``ROUTER_MANDATORY``): its other
    requests are then cancelled (the backend aborts them and frees their KV).
    ``request_timeout_s``: backend calls taking longer are cancelled and answered ``aborted``.
    ``replay_window_s``: with a secret, a message whose ``ts`` is further than this from the server's clock is
    refused as stale, and one whose ``nonce`` was seen within it as replayed (``rollout.protocol.ReplayGuard``).
    """

    def __init__(self, backend: RolloutBackend, bind: str = DEFAULT_BIND, *,
                 limits: P.ProtocolLimits = P.ProtocolLimits(), allow_update_weights: bool | None = None,
                 auth_secret: Optional[bytes] = None, max_in_flight: int = 1024,
                 request_timeout_s: float | None = None, replay_window_s: float = 30.0,
                 max_in_flight_tokens: int = AdmissionLimits.max_in_flight_tokens,
                 max_in_flight_per_client: int = AdmissionLimits.max_in_flight_per_client,
                 max_tokens_per_client: int = AdmissionLimits.max_tokens_per_client) -> None:
        if auth_secret is not None and (not isinstance(auth_secret, bytes) or len(auth_secret) < MIN_SECRET_BYTES):
            raise ValueError(f"auth_secret must be bytes of length >= {MIN_SECRET_BYTES}")
        if not is_loopback(bind) and auth_secret is None:
            raise ValueError(f"refusing to bind {bind!r}: not a loopback address and no auth_secret is set "
                             "(anyone who can reach it could drive the engines)")
        self._admission = Admission(AdmissionLimits(max_in_flight, max_in_flight_tokens, max_in_flight_per_client,
                                                    max_tokens_per_client))
        self.backend = backend
        self.bind = bind
        self.limits = limits
        self.allow_update_weights = auth_secret is not None if allow_update_weights is None else allow_update_weights
        self.auth_secret = auth_secret
        self.max_in_flight = max_in_flight
        self.request_timeout_s = request_timeout_s
        self._replay = P.ReplayGuard(replay_window_s) if auth_secret is not None else None
        self.address: Optional[str] = None          # the bound endpoint (a '*' port resolved)
        self._ctx: Optional[zmq.asyncio.Context] = None
        self._sock: Optional[zmq.asyncio.Socket] = None
        self._sync: Optional[zmq.Socket] = None      # a synchronous shadow of _sock (same thread only)
        self._recv_task: Optional[asyncio.Task] = None
        self._pending: dict[tuple[bytes, P.RequestId], _Pending] = {}
        self._accepting = False
        self._idle = asyncio.Event()
        self.counters: Counter[str] = Counter()     # received, replied, ok, <error code>

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> str:
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.hard_max_message_bytes)
        # NOTE: abort reaches only the requests of the sender's own routing id; with handover off (the default,
        # set here on purpose) a peer that claims the ROUTING_ID of a connected one is refused by ZeroMQ.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 0)
        # A reply to a peer that is gone raises EHOSTUNREACH instead of vanishing: its other work is then cancelled.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            sock.bind(self.bind)
        except zmq.ZMQError:
            sock.close(0)
            self._ctx.term()
            raise
        self._sock = sock
        self._sync = zmq.Socket.shadow(sock.underlying)
        self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._accepting = True
        self._idle.set()
        self._recv_task = asyncio.create_task(self._receive_loop(), name="frontend-recv")
        logger.info("front end listening on %s (auth %s, update_weights %s)", self.address,
                    "hmac-sha256" if self.auth_secret else "off",
                    "on" if self.allow_update_weights else "off")
        return self.address

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop accepting (new requests get ``unavailable``), wait up to ``timeout_s`` for in-flight
        replies, cancel what is left (each still gets its ``unavailable`` reply), close the socket."""
        if self._sock is None:
            return
        self._accepting = False
        if self._pending:
            logger.info("front end: shutting down, waiting for %d in-flight requests", len(self._pending))
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except asyncio.TimeoutError:
                logger.warning("front end: %d requests still running after %.1f s; failing them",
                               len(self._pending), timeout_s)
                tasks = [p.task for p in self._pending.values() if p.task is not None]
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        assert self._recv_task is not None
        self._recv_task.cancel()
        await asyncio.gather(self._recv_task, return_exceptions=True)
        self._sock.close(linger=1000)
        self._ctx.term()
        self._sock = self._ctx = self._sync = None
        logger.info("front end closed (%s)", dict(self.counters))

    async def __aenter__(self) -> "FrontEnd":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    @property
    def num_in_flight(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ receive
    async def _receive_loop(self) -> None:
        assert self._sock is not None and self._sync is not None
        max_bytes = self.limits.hard_max_message_bytes + P.MAC_BYTES
        while True:
            msg = await read_bounded(self._sock, self._sync, MAX_FRAMES, max_bytes)
            try:
                if msg.over is None:
                    self._on_message(msg.frames)
                else:
                    self._on_oversize(msg)
            except Exception:   # never let one message end the loop
                logger.exception("front end: unexpected error on a message")

    def _on_oversize(self, msg: BoundedMessage) -> None:
        """A message past MAX_FRAMES or the byte cap: its frames were dropped as they were read; one reply."""
        self.counters["received"] += 1
        self._send_error(msg.frames[0], msg.delimiter, None, msg.over_code,
                         f"message {msg.over} ({msg.num_frames} frames, {msg.num_bytes} bytes): refused unread",
                         sign=False)

    def _on_message(self, frames: list[bytes]) -> None:
        self.counters["received"] += 1
        peer, rest = frames[0], frames[1:]
        delimiter = bool(rest) and rest[0] == b""
        if delimiter:
            rest = rest[1:]
        expected = 2 if self.auth_secret else 1
        if len(rest) != expected:
            what = "unauthenticated: expected body and HMAC frames" if self.auth_secret else "expected one body frame"
            self._send_error(peer, delimiter, None, ErrorCode.BAD_REQUEST,
                             f"{what} after the optional empty delimiter, got {len(rest)} frames", sign=False)
            return
        body = rest[0]
        if self.auth_secret is not None and not P.verify(self.auth_secret, body, rest[1]):
            # NOTE: the body of an unauthenticated message is never decoded.
            self._send_error(peer, delimiter, None, ErrorCode.BAD_REQUEST, "unauthenticated: bad or missing HMAC",
                             sign=False)
            return
        request_id = nonce = None
        try:
            msg = P.unpack(body, self.limits)
            request_id, nonce = P.peek_id(msg, self.limits), P.peek_nonce(msg)
            if self._replay is not None:
                # NOTE: before the request is parsed, so a signed message is used up even when it is malformed.
                self._replay.check(*P.check_envelope_auth(msg, required=True))
            request_id, request = P.decode_request(msg, self.limits)
        except P.ProtocolError as e:
            self._send_error(peer, delimiter, e.request_id if e.request_id is not None else request_id,
                             e.code, e.message, nonce=nonce)
            return
        key = (peer, request_id)
        if key in self._pending:
            # NOTE: id nil, so that this refusal can never be taken for the first request's reply (which follows).
            self._send_error(peer, delimiter, None, ErrorCode.BAD_REQUEST,
                             f"id {request_id!r} is already in flight on this connection: this message is refused "
                             f"(this reply has id nil); the first request with that id keeps its own reply",
                             nonce=nonce)
            return
        if not self._accepting and request.op != "health":   # health still answers (accepting: false)
            self._send_error(peer, delimiter, request_id, ErrorCode.UNAVAILABLE, "the server is shutting down",
                             nonce=nonce)
            return
        work = None
        if request.op != "health":
            work = request_work(request)
            refusal = self._admission.refusal(peer, work)
            if refusal is not None:
                self._send_error(peer, delimiter, request_id, *refusal, nonce=nonce)
                return
            self._admission.admit(peer, work)
        pending = _Pending(peer, delimiter, request_id, request.op, nonce, work)
        self._pending[key] = pending
        self._idle.clear()
        pending.task = asyncio.create_task(self._serve(pending, request))

    # ------------------------------------------------------------------ serve one request
    async def _serve(self, pending: _Pending, request: P.Request) -> None:
        try:
            call = self._dispatch(pending, request)
            if self.request_timeout_s is not None and request.op not in ("health", "update_weights"):
                result = await asyncio.wait_for(call, self.request_timeout_s)
            else:
                result = await call
            self._reply(pending, P.ok_reply(pending.request_id, result))
        except asyncio.CancelledError:
            why = "aborted by request" if pending.cancel_code is ErrorCode.ABORTED else "the server is shutting down"
            self._reply(pending, P.error_reply(pending.request_id, pending.cancel_code, why))
            raise
        except asyncio.TimeoutError:
            self._reply(pending, P.error_reply(pending.request_id, ErrorCode.ABORTED,
                                               f"timed out after {self.request_timeout_s} s"))
        except RolloutError as e:
            self._reply(pending, P.error_reply(pending.request_id, e.code, wire_names(e.message, request.op)))
        except ValueError as e:   # engine-side validation (vocabulary, context length) names the field
            self._reply(pending, P.error_reply(pending.request_id, ErrorCode.BAD_REQUEST, wire_names(str(e), request.op)))
        except Exception as e:
            logger.exception("front end: %s request %r failed", pending.op, pending.request_id)
            self._reply(pending, P.error_reply(pending.request_id, ErrorCode.INTERNAL,
                                               f"{type(e).__name__}: {e}"))
        finally:
            if not pending.replied:   # belt and braces: the invariant is one reply per request
                self._reply(pending, P.error_reply(pending.request_id, ErrorCode.INTERNAL, "no reply produced"))
            if self._pending.pop((pending.peer, pending.request_id), None) is not None and pending.work is not None:
                self._admission.release(pending.peer, pending.work)
            if not self._pending:
                self._idle.set()

    async def _dispatch(self, pending: _Pending, req: P.Request) -> Any:
        b = self.backend
        if isinstance(req, P.GenerateRequest):
            prompts = req.all_prompts()
            if req.prompts is None:
                groups = [await b.generate(prompts[0], req.params)]
            else:
                groups = await gather_or_cancel(*(naming_prompt(i, b.generate(p, req.params))
                                                  for i, p in enumerate(prompts)))
            return {"trajectories": [t.to_dict() for group in groups for t in group]}
        if isinstance(req, P.OpenSessionRequest):
            return {"session_id": await b.open_session(req.session_id, req.ttl_s)}
        if isinstance(req, P.StepSessionRequest):
            traj = await b.step_session(req.session_id, req.new_token_ids, req.params)
            return {"trajectory": traj.to_dict()}
        if isinstance(req, P.CloseSessionRequest):
            return {"trajectory": (await b.close_session(req.session_id)).to_dict()}
        if isinstance(req, P.RunEpisodeRequest):
            traj = await b.run_episode(req.env, req.env_kwargs, req.params, req.max_turns)
            return {"trajectory": traj.to_dict()}
        if isinstance(req, P.AbortRequest):
            return {"found": await self._abort(pending.peer, req.request_id)}
        if isinstance(req, P.UpdateWeightsRequest):
            if not self.allow_update_weights:
                raise RolloutError(ErrorCode.DISABLED, self._update_weights_off_reason())
            return await b.update_weights(req.loader, req.loader_kwargs, req.version, req.mode, req.kv)
        if isinstance(req, P.StatsRequest):
            return {"backend": await b.stats(), "frontend": self._frontend_stats()}
        if isinstance(req, P.HealthRequest):
            health = dict(await b.health())
            health["frontend"] = {"accepting": self._accepting, "in_flight": len(self._pending) - 1}   # not itself
            return health
        raise RolloutError(ErrorCode.UNKNOWN_OPERATION, f"op {req.op!r} has no handler")

    async def _abort(self, peer: bytes, target: P.RequestId) -> bool:
        """A request of this connection by its wire id: its task is cancelled (it gets ``aborted``, after this
        abort's own reply, and the backend call sees CancelledError). Nothing else: another connection's
        requests and backend request ids (``Trajectory.request_id``, guessable) are out of reach."""
        pending = self._pending.get((peer, target))
        if pending is not None and pending.task is not None and pending.op != "abort":
            pending.cancel_code = ErrorCode.ABORTED
            pending.task.cancel()
            return True
        return False

    def _update_weights_off_reason(self) -> str:
        if self.auth_secret is None:
            return ("update_weights is off on this server: it has no auth secret, so any local user could reach it; "
                    "start it with --auth-secret-file or --allow-update-weights (docs/protocol.md, Security)")
        return "update_weights is switched off on this server (--no-update-weights)"

    def _frontend_stats(self) -> dict[str, Any]:
        # in_flight: the requests being served besides the stats request that asks
        return {"in_flight": len(self._pending) - 1, "in_flight_tokens": self._admission.work,
                "accepting": self._accepting, **self.counters}

    # ------------------------------------------------------------------ send
    def _reply(self, pending: _Pending, reply: dict[str, Any]) -> None:
        if pending.replied:
            return
        pending.replied = True
        if pending.nonce is not None:
            reply["nonce"] = pending.nonce
        try:
            body = P.pack(reply)
        except Exception as e:   # a backend result msgpack cannot carry
            logger.exception("front end: cannot encode the reply to %r", pending.request_id)
            reply = P.error_reply(pending.request_id, ErrorCode.INTERNAL, f"unencodable result: {type(e).__name__}",
                                  pending.nonce)
            body = P.pack(reply)
        self._count(reply)
        self._send(pending.peer, pending.delimiter, body, sign=True)

    def _send_error(self, peer: bytes, delimiter: bool, request_id: Optional[P.RequestId], code: ErrorCode,
                    message: str, *, sign: bool = True, nonce: bytes | None = None) -> None:
        reply = P.error_reply(request_id, code, message, nonce)
        self._count(reply)
        self._send(peer, delimiter, P.pack(reply), sign=sign)

    def _count(self, reply: dict[str, Any]) -> None:
        self.counters["replied"] += 1
        self.counters["ok" if reply["ok"] else reply["error"]["code"]] += 1

    def _send(self, peer: bytes, delimiter: bool, body: bytes, *, sign: bool) -> None:
        if self._sock is None:
            return
        frames = [peer, b"", body] if delimiter else [peer, body]
        if sign and self.auth_secret is not None:
            frames.append(P.sign(self.auth_secret, body))
        # NOTE: NOBLOCK, so the returned future is already done (pyzmq tries the send at once).
        fut = self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=len(body) < 65536)
        error = fut.exception()
        if isinstance(error, zmq.Again):                     # the peer's queue is full (SEND_HWM): dropped
            self.counters["replies_dropped"] += 1
        elif isinstance(error, zmq.ZMQError) and error.errno == zmq.EHOSTUNREACH:
            self.counters["replies_undeliverable"] += 1
            self._peer_gone(peer)
        elif error is not None:
            logger.warning("front end: a reply could not be sent: %s", error)

    def _peer_gone(self, peer: bytes) -> None:
        """A reply to ``peer`` could not be delivered (it disconnected): no later reply can be, so its requests
        still running are cancelled (aborted at the backend, their KV freed)."""
        doomed = [p for p in self._pending.values() if p.peer == peer and not p.replied and p.task is not None
                  and p.cancel_code is not ErrorCode.ABORTED]      # not those already being cancelled
        if doomed:
            logger.info("front end: a client went away; aborting its %d requests in flight", len(doomed))
        for p in doomed:
            p.cancel_code = ErrorCode.ABORTED
            p.task.cancel()
            self.counters["aborted_for_vanished_client"] += 1


def __getattr__(name: str) -> Any:
    # BackgroundFrontEnd lives in rollout.background_frontend (which imports FrontEnd from here); loaded on first use.
    if name == "BackgroundFrontEnd":
        from rollout.background_frontend import BackgroundFrontEnd
        return BackgroundFrontEnd
    raise AttributeError(f"module 'rollout.server' has no attribute {name!r}")
