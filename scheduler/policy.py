"""Preemption policies: how many blocks a turn reserves when it is admitted, and what happens when a
running sequence needs a block its reservation does not cover and no headroom is left.

``StrictReservation`` ("never", the default): a turn reserves its worst case (context + max_tokens), so it
can never run short; nothing running is ever moved. ``SwapPolicy`` ("swap", for single-turn long
chain-of-thought work whose answers are mostly far shorter than max_tokens): a turn reserves context +
``expected_output_tokens``; when a running sequence outgrows that and no headroom is left, the youngest
running sequence's KV is swapped to the host pool and it resumes later from there, never recomputed.
The recompute baseline (``scheduler.recompute``) evicts and recomputes instead.

Ordering rule for implementations: ``on_shortage`` runs inside ``Scheduler.schedule`` only (never while a
step scheduled ahead is in flight), may remove running sequences through the scheduler's primitives and
must return whether ``seq`` got its block.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from scheduler.kv_manager import cdiv
from scheduler.request import Sequence, StopCondition
from scheduler.stats import ContextTooLarge

if TYPE_CHECKING:
    from scheduler.output import ScheduledSequence
    from scheduler.scheduler import Scheduler


class PreemptionPolicy:
    name = "base"
    preempts = False              # may move running sequences out (swap, recompute)
    shares_partial_blocks = True  # n > 1 siblings get a copy of the leader's partial last prompt block

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size

    def blocks_needed(self, num_context_tokens: int, max_tokens: int) -> int:
        """Blocks one sequence may hold: KV of the context + every sampled token but the last."""
        return max(1, cdiv(num_context_tokens + max_tokens - 1, self.block_size))

    def sequence_blocks(self, seq: Sequence) -> int:
        """Blocks one sequence of this turn reserves in total (what it holds counts against it)."""
        return self.blocks_needed(seq.num_prompt_tokens, seq.stop.max_tokens)

    def fork_shared_blocks(self, num_prompt: int) -> int:
        """Prompt blocks an n > 1 sibling shares with its leader: every full one."""
        return num_prompt // self.block_size

    def group_blocks(self, seq: Sequence, num_held: int) -> int:
        """What admitting ``seq`` (and its unforked siblings) reserves, given ``num_held`` blocks it holds or hits."""
        per_seq = self.sequence_blocks(seq)
        shared = self.fork_shared_blocks(seq.num_prompt_tokens)
        return max(0, per_seq - num_held) + seq.pending_forks * (per_seq - shared)

    def fork_reservation(self, seq: Sequence) -> int:
        """The share of the leader's reservation a sibling takes when it forks off."""
        return self.sequence_blocks(seq) - self.fork_shared_blocks(seq.num_prompt_tokens)

    def worst_case_blocks(self, num_context: int, max_tokens: int, n: int) -> int:
        """Blocks a request may need at its largest (submission rejects what exceeds the pool)."""
        per_seq = self.blocks_needed(num_context, max_tokens)
        return per_seq + (n - 1) * (per_seq - self.fork_shared_blocks(num_context))

    def clamp(self, stop: StopCondition, num_context: int, n: int, max_model_len: int, num_blocks: int) -> StopCondition:
        """``stop`` with max_tokens cut to the model's context; raises ContextTooLarge for work that could never
        run (no room to generate, or more KV than the pool)."""
        if num_context >= max_model_len:
            raise ContextTooLarge(f"the context has {num_context} tokens; the model's context (max_model_len) "
                                  f"is {max_model_len}, leaving no room to generate")
        max_tokens = min(stop.max_tokens, max_model_len - num_context)
        blocks = self.worst_case_blocks(num_context, max_tokens, n)
        if blocks > num_blocks:
            raise ContextTooLarge(f"needs up to {blocks} KV blocks (context {num_context} + max_tokens {max_tokens}"
                                  f"{f', n={n}' if n > 1 else ''}) but the pool has {num_blocks}")
        if max_tokens == stop.max_tokens:
            return stop
        return StopCondition(max_tokens, stop.stop_token_ids, stop.eos_token_ids, stop.ignore_eos)

    def on_shortage(self, sched: "Scheduler", seq: Sequence, scheduled: "list[ScheduledSequence]") -> bool:
        raise NotImplementedError


class StrictReservation(PreemptionPolicy):
    name = "never"

    def on_shortage(self, sched, seq, scheduled) -> bool:
        raise AssertionError(f"sequence {seq.seq_id} outgrew its reservation (strict reservation never runs short)")


class SwapPolicy(PreemptionPolicy):
    name = "swap"
    preempts = True

    def __init__(self, block_size: int, expected_output_tokens: int) -> None:
        super().__init__(block_size)
        self.expected_output_tokens = expected_output_tokens

    def sequence_blocks(self, seq: Sequence) -> int:
        # The expected length, or what it already holds if it ran past it (it grows from the headroom).
        expected = self.blocks_needed(seq.num_prompt_tokens, min(seq.stop.max_tokens, self.expected_output_tokens))
        return max(expected, cdiv(seq.num_tokens, self.block_size))

    def worst_case_blocks(self, num_context: int, max_tokens: int, n: int) -> int:
        # one sequence at its longest must fit alone (the others can wait on the host), and the group at its
        # expected length must fit to be admitted
        per_seq = self.blocks_needed(num_context, max_tokens)
        expected = self.blocks_needed(num_context, min(max_tokens, self.expected_output_tokens))
        return max(per_seq, expected + (n - 1) * (expected - self.fork_shared_blocks(num_context)))

    def on_shortage(self, sched, seq, scheduled) -> bool:
        """Swap out the youngest running sequence (``seq`` itself when it is the youngest) until ``seq``
        can take a block."""
        kv = sched.kv
        while kv.headroom == 0 and not kv.reserved(seq):
            victim = next((s for s in reversed(sched.running.values()) if s.kv_ready), None)
            assert victim is not None, "swap: no running sequence to swap out"
            sched.swap_out(victim, scheduled)
            if victim is seq:
                return False
        kv.allocate(seq)
        return True


def make_policy(name: str, block_size: int, expected_output_tokens: int) -> PreemptionPolicy:
    if name == "never":
        return StrictReservation(block_size)
    if name == "swap":
        return SwapPolicy(block_size, expected_output_tokens)
    if name == "recompute":
        from scheduler.recompute import RecomputePolicy
        return RecomputePolicy(block_size)
    raise ValueError(f"unknown preemption policy {name!r}")
