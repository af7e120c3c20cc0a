"""Scheduler-side state of one generated sequence (no tensors)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from scheduler.block_pool import BlockKey


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # queued, holds nothing
    RUNNING = "running"      # admitted: holds blocks and a reservation for the rest of its turn
    FINISHED = "finished"    # released everything


class FinishReason(str, enum.Enum):
    STOP = "stop"            # an EOS or stop token was sampled
    LENGTH = "length"        # max_tokens (or the model's context) reached
    ABORT = "abort"          # aborted by the caller


@dataclass(frozen=True)
class StopCondition:
    max_tokens: int                     # already clamped so prompt + max_tokens <= max_model_len
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
    request_id: str
    sample_index: int                   # which of the request's n samples this is
    token_ids: list[int]                # prompt followed by generated tokens
    num_prompt_tokens: int
    stop: StopCondition
    arrival: int                        # FCFS order
    num_samples: int = 1                # n of the request (the leader reserves for all of them)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0        # tokens whose KV is in the cache
    num_cached_tokens: int = 0          # prompt tokens served from the prefix cache / shared at admission
    block_ids: list[int] = field(default_factory=list)
    num_reserved_blocks: int = 0        # reservation not yet turned into blocks
    block_keys: list[BlockKey] = field(default_factory=list)  # keys of full computed blocks, in order
    finish_reason: Optional[FinishReason] = None
    # A request with n > 1 runs one leader; its siblings are forked off it once its prompt is computed.
    pending_forks: int = 0

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
