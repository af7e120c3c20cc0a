"""Scheduler-side state of one sequence: a one-shot request, or a multi-turn session (no tensors)."""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from scheduler.block_pool import BlockKey


class SequenceStatus(enum.Enum):
    WAITING = "waiting"                # a request or turn is queued
    RUNNING = "running"                # admitted: holds blocks and a reservation for the rest of its turn
                                       # (swap mode: for its expected length)
    AWAITING_INPUT = "awaiting_input"  # a session between turns: keeps its KV (device or host), no reservation
    FINISHED = "finished"              # a request done or a session closed: holds nothing


class KVLocation(enum.Enum):
    DEVICE = "device"   # computed tokens' KV is in device blocks (``block_ids``)
    HOST = "host"       # offloaded to the host pool (``host_block_ids``); restored at the next turn (or, for
                        # a sequence swapped out mid-turn in swap mode, when it is admitted again)
    NONE = "none"       # nothing computed yet, or dropped: the next turn re-prefills


class FinishReason(str, enum.Enum):
    STOP = "stop"            # an EOS or stop token was sampled
    LENGTH = "length"        # max_tokens (or the model's context) reached
    ABORT = "aborted"        # aborted by the caller (or the session was closed / expired)


@dataclass(frozen=True)
class StopCondition:
    max_tokens: int                     # clamped by the scheduler so context + max_tokens <= max_model_len
    stop_token_ids: frozenset[int] = frozenset()
    eos_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False

    def check(self, token_id: int, num_output_tokens: int) -> Optional[FinishReason]:
        if token_id in self.stop_token_ids or (not self.ignore_eos and token_id in self.eos_token_ids):
            return FinishReason.STOP
        if num_output_tokens >= self.max_tokens:
            return FinishReason.LENGTH
        return None


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str                     # the request, or the session's current turn
    sample_index: int                   # which of the request's n samples this is
    token_ids: list[int]                # everything so far: prompts/observations and generated tokens
    num_prompt_tokens: int              # tokens before the current turn's output (its context)
    stop: StopCondition
    arrival: int                        # FCFS order of the current request/turn
    num_samples: int = 1                # n of the request (the leader reserves for all of them)
    session_id: Optional[str] = None    # set for multi-turn sessions
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0        # tokens whose KV is stored (device or host)
    block_ids: list[int] = field(default_factory=list)       # device blocks, by block index
    host_block_ids: list[int] = field(default_factory=list)  # host blocks while offloaded
    kv: KVLocation = KVLocation.NONE
    kv_ready: bool = True               # False while a host -> device restore of its blocks is in flight
    block_keys: list[BlockKey] = field(default_factory=list)  # keys of full computed blocks, in order
    inflight_keys: deque = field(default_factory=deque)      # keys of full context blocks still to compute
    context_keys: Optional[tuple] = None                     # ((num_tokens, version), keys) admission cache
    is_output: bytearray = field(default_factory=bytearray)   # per token: 1 = sampled by the model
    finish_reason: Optional[FinishReason] = None
    pending_forks: int = 0              # n > 1: siblings still to fork off this leader
    # per turn
    num_cached_tokens: int = 0          # context tokens whose KV was reused at admission
    num_prefill_tokens: int = 0         # context (non-output) tokens computed in this turn
    enqueued_step: int = 0              # scheduler step at which the turn was queued (aging)
    enqueued_at: float = 0.0            # clock at which the turn was queued (queue wait)
    queue_wait_s: float = 0.0
    lost_tokens: int = 0                # recompute baseline: computed tokens thrown away by a preemption
    preempted: bool = False             # moved out while running (swap mode, recompute baseline): first in line
    # session
    ttl_s: Optional[float] = None
    priority: int = 0
    last_active: float = 0.0
    num_turns: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
