"""Scheduler counters and errors."""
from __future__ import annotations

from dataclasses import dataclass


class SessionError(ValueError):
    """An operation on an unknown or closed session, or a turn while one is in progress.

    ``kind`` says which, for callers that map errors to codes: "unknown", "closed", "busy", "exists"
    (open of an id in use) or "invalid" (a bad argument)."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


class ContextTooLarge(ValueError):
    """A request or turn could never run: longer than the model's context, or more KV than the pool."""


@dataclass
class SchedulerStats:
    steps: int = 0                  # non-empty steps scheduled
    prefill_tokens: int = 0         # prompt / observation tokens computed
    cached_prompt_tokens: int = 0   # context tokens reused at admission (prefix cache, fork, resident or restored KV)
    decode_tokens: int = 0          # model-sampled tokens computed (fed back as inputs)
    preemptions: int = 0            # running sequences evicted and recomputed (only the "recompute" baseline)
    recomputed_tokens: int = 0      # tokens computed again after their KV was thrown away
    swapped_out: int = 0            # running sequences whose KV went to the host ("swap" mode; resumed, not recomputed)
    peak_running: int = 0           # most sequences admitted at once
    finished_requests: int = 0
    aborted_requests: int = 0
    finished_turns: int = 0
    offloaded_blocks: int = 0       # blocks copied device -> host (idle sessions and swapped sequences)
    offloaded_sessions: int = 0
    restored_blocks: int = 0        # blocks copied host -> device
    restored_sessions: int = 0
    dropped_sessions: int = 0       # parked sessions whose KV was dropped under pressure
    dropped_tokens: int = 0
    expired_sessions: int = 0
    queue_wait_s: float = 0.0       # summed over admissions
    admissions: int = 0
    steps_ahead: int = 0            # decode steps scheduled before the previous step's tokens were read
