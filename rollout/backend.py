"""The interface every way of serving rollouts implements: one engine in this process
(``LocalBackend``), a Ray pool of workers (``RolloutPool``). The ZeroMQ front end and the examples
are written against it, so they work with either.

All methods are coroutines (the front end and the pool run on asyncio); each either returns its
result or raises ``RolloutError`` with a code from ``ErrorCode`` — never hangs past its deadline.
Parameters are already-validated typed objects (``SamplingParams``); wire decoding lives in
``rollout.protocol``.

Optional, for streamed HTTP responses (both ``LocalBackend`` and ``RolloutPool`` have them):
``generate_stream(prompt_ids, params)`` and ``step_session_stream(session_id, new_token_ids, params)``, async
iterators of ``rollout.loop_streams.SampleDelta`` (each sample's new tokens after every engine step, its last
delta with the whole sample as ``final``); closing one early aborts the request.
"""
from __future__ import annotations

import asyncio
import enum
from typing import Any, Awaitable, Optional, Protocol, runtime_checkable

from engine.sampling_params import SamplingParams
from rollout.trajectory import Trajectory


class ErrorCode(str, enum.Enum):
    BAD_REQUEST = "bad_request"            # malformed message, wrong types, missing fields, bad values
    UNKNOWN_OPERATION = "unknown_operation"
    TOO_LARGE = "too_large"                # message, prompt or session over a documented limit
    UNKNOWN_SESSION = "unknown_session"    # never opened, closed or expired
    SESSION_BUSY = "session_busy"          # a turn is already running in the session
    ABORTED = "aborted"
    WORKER_DIED = "worker_died"            # the worker holding the request died; the request is lost
    UPDATE_FAILED = "update_failed"        # weights rejected; the old ones keep serving
    DISABLED = "disabled"                  # operation switched off (e.g. update_weights on the front end)
    UNAVAILABLE = "unavailable"            # shutting down, or no worker can take it
    INTERNAL = "internal"


class RolloutError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


@runtime_checkable
class RolloutBackend(Protocol):
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> list[Trajectory]:
        """One prompt, ``params.n`` samples (GRPO groups share the prompt's KV): one Trajectory each,
        by sample_index."""

    async def open_session(self, session_id: Optional[str] = None, ttl_s: Optional[float] = None) -> str:
        """Open a multi-turn session; returns its id. Later turns go to the worker holding its KV."""

    async def step_session(self, session_id: str, new_token_ids: list[int], params: SamplingParams) -> Trajectory:
        """Append ``new_token_ids`` (loss mask 0) and generate the model's turn. The returned
        Trajectory covers this turn only: prompt_ids = new_token_ids, token_ids = the model's tokens."""

    async def close_session(self, session_id: str) -> Trajectory:
        """Free the session; returns its whole trajectory (first turn's tokens as prompt_ids, every
        later token with its loss mask, logprob and version; ``turns``)."""

    async def run_episode(self, env: str, env_kwargs: dict[str, Any], params: SamplingParams,
                          max_turns: int) -> Trajectory:
        """Server-side agent loop with a registered environment until done or ``max_turns``:
        observations get loss mask 0; ``reward`` is the environment's (summed)."""

    async def abort(self, request_id: str) -> bool:
        """Abort a running generate/turn by request id; True if it was found."""

    async def update_weights(self, loader: str, loader_kwargs: dict[str, Any], version: Optional[int] = None,
                             mode: str = "keep", kv: str = "keep") -> dict[str, Any]:
        """Build the named weight_sync loader on every worker and apply it, with one version barrier;
        returns {"version": ..., "seconds": ..., "num_bytes": ...}."""

    async def stats(self) -> dict[str, Any]:
        """Engine statistics (per worker and summed)."""

    async def health(self) -> dict[str, Any]:
        """{"ok": bool, "workers": [...], "version": int}."""

    async def shutdown(self) -> None:
        """Stop accepting work, finish or fail what is in flight, release workers."""


async def gather_or_cancel(*aws: Awaitable[Any]) -> list[Any]:
    """``asyncio.gather`` that, when one awaitable fails, cancels the others before re-raising, so a
    batch answered with an error leaves no work running behind the reply."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
