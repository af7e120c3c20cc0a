"""What the engine loop hands its callers: futures resolved once, engine errors as ``RolloutError`` codes,
completions as ``Trajectory`` objects."""
from __future__ import annotations

from concurrent.futures import Future, InvalidStateError
from typing import Any, Optional

from engine.llm_engine import WeightsInconsistentState
from engine.outputs import Completion
from engine.weight_update import WeightUpdateError
from rollout.backend import ErrorCode, RolloutError
from rollout.trajectory import Trajectory
from scheduler import ContextTooLarge, SessionError


def error_from_exception(exc: BaseException) -> RolloutError:
    """The ``RolloutError`` an engine exception means for a caller."""
    if isinstance(exc, RolloutError):
        return exc
    msg = str(exc)
    if isinstance(exc, SessionError):   # before ValueError: it is one
        code = {"busy": ErrorCode.SESSION_BUSY, "unknown": ErrorCode.UNKNOWN_SESSION,
                "closed": ErrorCode.UNKNOWN_SESSION}.get(exc.kind, ErrorCode.BAD_REQUEST)
        return RolloutError(code, msg)
    if isinstance(exc, ContextTooLarge):
        return RolloutError(ErrorCode.TOO_LARGE, msg)
    if isinstance(exc, WeightUpdateError):
        return RolloutError(ErrorCode.UPDATE_FAILED, msg)
    if isinstance(exc, WeightsInconsistentState):
        return RolloutError(ErrorCode.UNAVAILABLE, msg)
    if isinstance(exc, (ValueError, TypeError)):
        return RolloutError(ErrorCode.BAD_REQUEST, msg)
    return RolloutError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {msg}")


def _resolve(fut: Future, result: Any = None, error: Optional[BaseException] = None) -> None:
    """Set a future's outcome unless it is already done (cancelled by its caller)."""
    if fut.done():
        return
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except InvalidStateError:   # cancelled between the check and the set
        pass


def completion_to_trajectory(c: Completion) -> Trajectory:
    """One generate sample: every generated token is a model token."""
    return Trajectory(prompt_ids=list(c.prompt_token_ids), token_ids=list(c.token_ids), logprobs=list(c.logprobs),
                      loss_mask=[1] * len(c.token_ids), versions=list(c.versions), turns=1,
                      finish_reason=c.finish_reason, metrics=_metrics(c), request_id=c.request_id,
                      session_id=c.session_id, sample_index=c.sample_index, text=c.text, stop_string=c.stop_string,
                      top_logprobs=c.top_logprobs,
                      routed_experts=c.routed_experts.to_wire() if c.routed_experts is not None else None)


def _metrics(c: Completion) -> dict[str, Any]:
    return {"num_cached_tokens": c.num_cached_tokens, "num_prefill_tokens": c.num_prefill_tokens,
            "queue_wait_s": c.queue_wait_s}
