"""Applying a step's results to the scheduler: computed counters, sampled tokens, n > 1 forks, finished turns.

Runs inside ``Scheduler.update``; it writes what the orchestrator owns (tokens, counters, the running set
for forks) and asks the KV manager for the blocks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from scheduler.output import FinishedSequence, SchedulerOutput
from scheduler.request import Sequence, SequenceStatus

if TYPE_CHECKING:
    from scheduler.scheduler import Scheduler


def apply_results(sched: "Scheduler", output: SchedulerOutput, sampled: dict[int, int]) -> list[FinishedSequence]:
    finished: list[FinishedSequence] = []
    running, stats, bs, kv = sched.running, sched.stats, sched.block_size, sched.kv
    caching = sched.pool.enable_prefix_caching
    prefill = decode = 0
    for item in output.scheduled:
        seq = running.get(item.seq_id)     # Scheduler.live_sequence, inlined (once per sequence per step)
        if seq is None or seq.request_id != item.request_id:   # ended since it was scheduled
            continue
        start, n = item.start_pos, item.num_tokens
        assert seq.num_computed_tokens == start, "update out of order with schedule"
        seq.num_computed_tokens = computed = start + n
        num_outputs = seq.is_output[start] if n == 1 else sum(seq.is_output[start:computed])
        seq.num_prefill_tokens += n - num_outputs
        prefill += n - num_outputs
        decode += num_outputs
        if caching and computed // bs > len(seq.block_keys):
            kv.register_full_blocks(seq)
        if not item.sample:
            continue
        if seq.pending_forks:
            _fork(sched, seq, sampled, finished)
        append_sampled(sched, seq, sampled[item.seq_id], finished)
    stats.prefill_tokens += prefill
    stats.decode_tokens += decode
    return finished


def append_sampled(sched: "Scheduler", seq: Sequence, token: int, finished: list[FinishedSequence]) -> bool:
    """Append a sampled token; finish the turn when it stops it. -> whether the sequence still runs."""
    tokens = seq.token_ids
    tokens.append(token)
    seq.is_output.append(1)
    reason = seq.stop.check(token, len(tokens) - seq.num_prompt_tokens)
    if reason is not None:
        finished.append(sched.finish(seq, reason))
    return reason is None


def _fork(sched: "Scheduler", leader: Sequence, sampled: dict[int, int], finished: list[FinishedSequence]) -> None:
    """The leader's prompt is computed (and, unless the policy recomputes a sibling's last block, its siblings'
    first tokens were sampled with its own): start them on its full prompt blocks, each with its own copy of a
    partial last block."""
    policy, kv = sched.policy, sched.kv
    num_prompt = leader.num_prompt_tokens
    shared = policy.fork_shared_blocks(num_prompt)
    partial = policy.shares_partial_blocks
    computed = num_prompt if partial else shared * sched.block_size
    reservation = policy.fork_reservation(leader)
    for fork in sched.request_sequences(leader.request_id)[1:]:
        kv.fork(leader, fork, shared, computed, reservation)
        fork.num_cached_tokens = computed
        sched.stats.cached_prompt_tokens += computed
        fork.status = SequenceStatus.RUNNING
        sched.running[fork.seq_id] = fork
        if partial and append_sampled(sched, fork, sampled[fork.seq_id], finished) and computed % sched.block_size:
            kv.copy_partial_block(leader, fork)     # from its reservation: cannot fail
    leader.pending_forks = 0
