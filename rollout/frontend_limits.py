"""What the ZeroMQ front end lets in: a bounded read of one message, and admission by requests and by work.

``read_bounded``: ZeroMQ hands a multipart message over only once all of it has arrived (each frame is capped by
``ZMQ_MAXMSGSIZE``; the number of frames is not). The server reads it frame by frame (``RCVMORE``) and keeps at
most ``max_frames`` frames and ``max_bytes`` bytes of it: past either, the rest is received and dropped one
frame at a time, so the Python side never holds more than one frame of a message over its limits.

``Admission``: a request's *work* is the tokens it may make the engines hold, prompt tokens + n x max_tokens
(``request_work``). The front end admits a request while the requests and the work in flight stay under the
server's caps and under the sender's own (a client is one ZeroMQ routing id: one connection). Refusals are
``unavailable`` (retry later) unless the request alone is over a cap (``too_large``: it would never fit).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import zmq

from rollout import protocol as P
from rollout.backend import ErrorCode


@dataclass
class BoundedMessage:
    frames: list[bytes]          # the routing id, then the frames kept (none past a limit)
    num_frames: int              # frames after the routing id, kept or not
    num_bytes: int               # bytes after the routing id, kept or not
    over: str | None = None      # why the message is over a limit (its frames after the routing id were dropped)
    delimiter: bool = False      # the first frame after the routing id was empty (mirror it in the reply)
    over_code: ErrorCode = ErrorCode.BAD_REQUEST   # too many frames: bad_request; too many bytes: too_large


async def read_bounded(sock: Any, sync: zmq.Socket, max_frames: int, max_bytes: int) -> BoundedMessage:
    """One message from a ROUTER ``sock`` (a zmq.asyncio socket; ``sync`` its ``zmq.Socket.shadow``): the routing
    id, then the rest frame by frame."""
    frames = [await sock.recv()]
    num_frames = num_bytes = 0
    over = None
    delimiter = False
    code = ErrorCode.BAD_REQUEST
    while sync.getsockopt(zmq.RCVMORE):
        # NOTE: the rest of a multipart message is already here (ZeroMQ delivers it whole): NOBLOCK never waits.
        frame = sync.recv(zmq.NOBLOCK, copy=True)
        num_frames += 1
        num_bytes += len(frame)
        delimiter = delimiter or (num_frames == 1 and frame == b"")
        if over is None and num_frames > max_frames:
            over = f"has more than {max_frames} frames after the routing id"
        elif over is None and num_bytes > max_bytes:
            over, code = f"has more than {max_bytes} bytes", ErrorCode.TOO_LARGE
        if over is None:
            frames.append(frame)
        else:
            del frames[1:]       # drop what was kept; later frames are read and dropped one at a time
    return BoundedMessage(frames, num_frames, num_bytes, over, delimiter, code)


def request_work(request: P.Request) -> int:
    """Tokens a request may make the engines hold: its prompt tokens + every sample's max_tokens. An episode's
    environment tokens are unknown in advance: max_turns x max_tokens stands for it."""
    if isinstance(request, P.GenerateRequest):
        prompts = request.all_prompts()
        return sum(len(p) for p in prompts) + len(prompts) * request.params.n * request.params.max_tokens
    if isinstance(request, P.StepSessionRequest):
        return len(request.new_token_ids) + request.params.n * request.params.max_tokens
    if isinstance(request, P.RunEpisodeRequest):
        return request.max_turns * request.params.max_tokens
    return 0


@dataclass(frozen=True)
class AdmissionLimits:
    """Caps on what is in flight at the front end; ``health`` is exempt from all of them."""

    max_in_flight: int = 1024                 # requests, all clients
    max_in_flight_tokens: int = 1 << 23       # work (request_work), all clients
    max_in_flight_per_client: int = 256       # requests of one connection
    max_tokens_per_client: int = 1 << 21      # work of one connection

    def __post_init__(self) -> None:
        for name in ("max_in_flight", "max_in_flight_tokens", "max_in_flight_per_client", "max_tokens_per_client"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")


class Admission:
    """The only owner of the in-flight counts (requests and work, in all and per client)."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.requests = 0
        self.work = 0
        self._client_requests: Counter[bytes] = Counter()
        self._client_work: Counter[bytes] = Counter()

    def refusal(self, peer: bytes, work: int) -> tuple[ErrorCode, str] | None:
        """Why a request of ``work`` tokens from ``peer`` cannot be admitted now, or None."""
        lim = self.limits
        for cap, name in ((lim.max_in_flight_tokens, "max_in_flight_tokens"),
                          (lim.max_tokens_per_client, "max_tokens_per_client")):
            if work > cap:
                return ErrorCode.TOO_LARGE, (f"the request's work (prompt tokens + n x max_tokens) is {work} tokens; "
                                             f"{name} is {cap}")
        if self.requests >= lim.max_in_flight:
            return ErrorCode.UNAVAILABLE, f"{self.requests} requests in flight (max_in_flight {lim.max_in_flight}); retry later"
        if self._client_requests[peer] >= lim.max_in_flight_per_client:
            return ErrorCode.UNAVAILABLE, (f"this connection has {self._client_requests[peer]} requests in flight "
                                           f"(max_in_flight_per_client {lim.max_in_flight_per_client}); retry later")
        if self.work + work > lim.max_in_flight_tokens:
            return ErrorCode.UNAVAILABLE, (f"{self.work} tokens of work in flight; {work} more would pass "
                                           f"max_in_flight_tokens {lim.max_in_flight_tokens}; retry later")
        if self._client_work[peer] + work > lim.max_tokens_per_client:
            return ErrorCode.UNAVAILABLE, (f"this connection has {self._client_work[peer]} tokens of work in flight; "
                                           f"{work} more would pass max_tokens_per_client "
                                           f"{lim.max_tokens_per_client}; retry later")
        return None

    def admit(self, peer: bytes, work: int) -> None:
        self.requests += 1
        self.work += work
        self._client_requests[peer] += 1
        self._client_work[peer] += work

    def release(self, peer: bytes, work: int) -> None:
        self.requests -= 1
        self.work -= work
        self._client_requests[peer] -= 1
        self._client_work[peer] -= work
        assert self.requests >= 0 and self.work >= 0 and self._client_requests[peer] >= 0
        if self._client_requests[peer] == 0:        # forget a client with nothing in flight (bounded maps)
            assert self._client_work[peer] == 0
            del self._client_requests[peer], self._client_work[peer]
