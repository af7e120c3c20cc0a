"""Open sessions: ids, TTLs and the lifecycle of a session between turns (open, next turn, close, expire).

The only writer of the session map and of a session's own fields (TTL, priority, last activity, turn
count); the scheduler queues the turns and the offload manager keeps their KV.
"""
from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence as Seq
from typing import Optional

from scheduler.request import Sequence, SequenceStatus, StopCondition
from scheduler.stats import SessionError

EXPIRY_SCAN_S = 0.1   # how often idle sessions are checked against their TTL


class SessionManager:
    def __init__(self, default_ttl_s: float, clock: Callable[[], float], seq_ids: Iterator[int]) -> None:
        self.default_ttl_s = default_ttl_s
        self.clock = clock
        self._seq_ids = seq_ids
        self.sessions: dict[str, Sequence] = {}
        self._closed: deque[str] = deque(maxlen=100_000)
        self._next_expiry_scan = float("-inf")

    def open(self, session_id: str, ttl_s: Optional[float], priority: int) -> Sequence:
        if not isinstance(session_id, str) or not session_id:
            raise SessionError(f"session_id must be a non-empty str, got {session_id!r}")
        if session_id in self.sessions:
            raise SessionError(f"session {session_id!r} is already open", "exists")
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
            raise SessionError(f"ttl_s must be a positive number of seconds, got {ttl_s!r}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise SessionError(f"priority must be an int, got {priority!r}")
        seq = Sequence(seq_id=next(self._seq_ids), request_id="", sample_index=0, token_ids=[],
                       num_prompt_tokens=0, stop=StopCondition(max_tokens=1), arrival=-1,
                       session_id=session_id, status=SequenceStatus.AWAITING_INPUT,
                       ttl_s=float(ttl), priority=priority, last_active=self.clock())
        self.sessions[session_id] = seq
        return seq

    def get(self, session_id: str) -> Sequence:
        seq = self.sessions.get(session_id)
        if seq is None:
            state = "closed" if session_id in self._closed else "unknown"
            raise SessionError(f"session {session_id!r} is {state}", state)
        return seq

    def check_turn(self, session_id: str, new_token_ids: Seq[int]) -> Sequence:
        """The session a new turn may be queued on (raises, changing nothing, otherwise)."""
        seq = self.get(session_id)
        if seq.status is not SequenceStatus.AWAITING_INPUT:
            raise SessionError(f"session {session_id!r} already has a turn in progress ({seq.request_id!r})", "busy")
        if not new_token_ids and not seq.token_ids:
            raise ValueError("new_token_ids must not be empty on a session's first turn")
        return seq

    def begin_turn(self, seq: Sequence, new_token_ids: Seq[int]) -> None:
        seq.token_ids.extend(new_token_ids)
        seq.is_output.extend(bytes(len(new_token_ids)))
        seq.num_prompt_tokens = seq.num_tokens
        seq.num_turns += 1

    def end_turn(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.AWAITING_INPUT
        seq.last_active = self.clock()

    def forget(self, seq: Sequence) -> None:
        """The session is closed (its KV already released)."""
        seq.status = SequenceStatus.FINISHED
        del self.sessions[seq.session_id]
        self._closed.append(seq.session_id)

    def expired(self, parked: Seq[Sequence]) -> list[Sequence]:
        """Parked sessions idle past their TTL. A scan of every parked session is O(sessions): done at most
        every EXPIRY_SCAN_S, not every step (TTLs are seconds to minutes)."""
        now = self.clock()
        if now < self._next_expiry_scan:
            return []
        self._next_expiry_scan = now + EXPIRY_SCAN_S
        return [s for s in parked if s.status is SequenceStatus.AWAITING_INPUT and now - s.last_active > s.ttl_s]


def new_seq_ids() -> Iterator[int]:
    return itertools.count()
