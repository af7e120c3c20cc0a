"""The hand-off between the scheduler and the engine: plain dataclasses, one comment a field."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(slots=True)
class ScheduledSequence:
    """One sequence's share of a step. Never mutated once built (steps planned ahead and the engine share these
    items), by convention rather than ``frozen=True``: a frozen dataclass's ``__init__`` costs 3.3x a plain
    one's (1.33 vs 0.40 us measured here), and a busy engine builds one per running sequence per step."""

    seq_id: int
    request_id: str
    sample_index: int         # which of the request's n samples (keys seeded sampling)
    token_ids: list[int]      # tokens to run this step: the sequence's tokens[start_pos : start_pos + len]
                              # ([-1] placeholders for a decode scheduled ahead: the engine feeds the id)
    start_pos: int            # num_computed_tokens before this step; positions are start_pos .. start_pos+len-1
    block_ids: list[int]      # block table covering positions [0, start_pos + len(token_ids)); a snapshot,
                              # never mutated (steps may share one)
    sample: bool              # this chunk reaches the sequence's last token: sample the next token from it
    num_output_tokens: int    # tokens generated so far in this turn (the index of the token sampled now)
    # n > 1 leader whose chunk completes the prompt: (seq_id, sample_index) of each sibling, whose first token
    # is sampled from this item's last row too (the prompt is computed once for the whole group)
    fork_samples: tuple[tuple[int, int], ...] = ()
    num_tokens: int = field(init=False)   # len(token_ids), read many times per step on the hot path

    def __post_init__(self) -> None:
        self.num_tokens = len(self.token_ids)

    @property
    def seq_len(self) -> int:
        """Context length after this step."""
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence]   # decodes first, then prefill chunks, in flat-token order
    num_batched_tokens: int              # sum of len(token_ids); <= max_num_batched_tokens
    # Block copies the engine runs before the forward, in this order:
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (device block, device block): a forked
    #                                        sibling's own copy of its leader's partial last prompt block
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)   # (host block, device block)
    # NOTE: every device block swap_out reads and every host block swap_in reads is read before any write of
    # this output (block copies, swap-ins, swap-outs' host writes, the forward): see scheduler.kv_offload.
    restores: list[int] = field(default_factory=list)   # seq ids whose KV the swap_in copies bring back: not
    #                                     scheduled until the engine reports them landed (Scheduler.kv_landed)
    num_fed: int = 0   # a step planned ahead: its first num_fed items are 1-token decodes whose input is the token
    #                    the previous step sampled for that sequence (placeholder -1 here; fed on the device)

    @property
    def is_empty(self) -> bool:
        return not (self.scheduled or self.block_copies or self.swap_out or self.swap_in)


@dataclass(frozen=True)
class FinishedSequence:
    seq_id: int
    request_id: str                  # the request, or the session turn
    sample_index: int
    prompt_token_ids: list[int]      # the context the output was generated from
    output_token_ids: list[int]
    finish_reason: str               # "stop" | "length" | "aborted"
    num_cached_tokens: int           # context tokens whose KV was reused (resident, restored or prefix cache)
    num_prefill_tokens: int = 0      # context tokens computed for this request/turn
    queue_wait_s: float = 0.0        # time from submission to admission
    session_id: Optional[str] = None
    # the device blocks holding the context's KV when it finished (empty when it was not on the device): where
    # per-slot state such as routed experts is read (engine.routing)
    block_ids: tuple[int, ...] = ()
