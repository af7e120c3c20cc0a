"""Steps planned before the previous step's sampled tokens are known (async scheduling).

The engine queues step N+1 on the device while it still runs step N, so the host's scheduling, input
preparation and result processing overlap the device's work. Step N+1 continues exactly what step N ran and
nothing else: each step-N sequence that sampled continues with one decode token whose id is a placeholder
(-1; the engine feeds the token step N sampled, on the device: ``SchedulerOutput.num_fed`` leading items),
and each prefill chunk that did not reach its sequence's end continues with its next chunk (its tokens are
known). Planned only when a full ``Scheduler.schedule`` would do nothing else: no admission possible (nothing
waiting, admission paused, no free sequence slot, or the last admission attempt found no room and nothing
has been released or queued since), every ready running sequence in step N, no restore landed since, no
pending forks, and no block needed beyond a reservation that the headroom cannot cover (the policy decides
those, in ``schedule``). A sequence that reaches max_tokens with step N's token is left out; one that stops
on it (EOS, a stop token) or is aborted meanwhile is computed and then ignored by ``update`` (its KV lands
past its last computed position: a slot no one reads, in a block no prefix-cache entry covers).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from scheduler.kv_manager import cdiv
from scheduler.output import ScheduledSequence, SchedulerOutput

if TYPE_CHECKING:
    from scheduler.scheduler import Scheduler

_PLACEHOLDER = [-1]   # shared: never mutated (the engine feeds the real id on the device)


def plan_decode_ahead(sched: "Scheduler", prev: SchedulerOutput) -> Optional[SchedulerOutput]:
    if not prev.scheduled:
        return None
    cfg = sched.config
    more = cfg.plan_ahead_admissions      # ready sequences prev did not run, and admissions, join the plan
    if sched.ready_changed and not more:
        return None
    can_admit = sched.waiting and not sched.admission_paused and len(sched.running) < cfg.max_num_seqs \
        and not sched.admission_stalled
    if can_admit and not more:
        return None
    after_prefill = cfg.plan_ahead_after_prefill
    running, bs, kv = sched.running, sched.block_size, sched.kv
    decodes, chunks = [], []
    num_live = 0
    growing = 0     # blocks the decodes need beyond their reservations (chunks' are added below)
    # NOTE: one pass over prev's items on the hot path (every decode step of a busy engine comes through here):
    # ``Scheduler.live_sequence`` and the block arithmetic are inlined.
    for it in prev.scheduled:
        if it.fork_samples:
            return None                                 # siblings join at update
        if not after_prefill and (it.num_tokens != 1 or not it.sample):
            return None
        seq = running.get(it.seq_id)
        if seq is None or seq.request_id != it.request_id:
            continue                                    # aborted since prev was scheduled
        num_live += 1
        assert seq.num_computed_tokens == it.start_pos, "a step planned ahead after prev's update"
        if seq.pending_forks:
            return None
        pos = it.start_pos + it.num_tokens              # where the next token goes
        if it.sample:
            num_out = it.num_output_tokens + 1
            if num_out < seq.stop.max_tokens:           # else prev's token is its last (length)
                decodes.append((seq, it, pos, 1, num_out))
                extra = -(-(pos + 1) // bs) - len(seq.block_ids)
                if extra > 0:                           # a block boundary (1 step in block_size)
                    growing += max(0, extra - kv.reserved(seq))
        else:
            chunks.append((seq, it, pos))
    others = []     # ready running sequences prev did not run (a restore landed since, a chunk over budget)
    if num_live != sum(1 for s in running.values() if s.kv_ready):
        if not more:
            return None                                 # a ready sequence prev did not run: a full schedule
        ran = {it.seq_id for it in prev.scheduled}
        others = [s for s in running.values() if s.kv_ready and s.seq_id not in ran]
    num_fed = len(decodes)
    budget = sched.config.max_num_batched_tokens - num_fed
    plan = decodes                                      # the decodes first, then the chunks
    for seq, it, pos in chunks:
        if budget <= 0:
            return None
        n = min(seq.num_tokens - pos, budget)
        budget -= n
        plan.append((seq, it, pos, n, seq.num_output_tokens))
        growing += max(0, cdiv(pos + n, bs) - len(seq.block_ids) - kv.reserved(seq))
    for seq in others:
        pos = seq.num_computed_tokens
        if budget <= 0 or pos >= seq.num_tokens or seq.pending_forks:
            return None                                 # over budget, nothing to compute, forks: schedule decides
        n = min(seq.num_tokens - pos, budget)
        budget -= n
        plan.append((seq, None, pos, n, seq.num_output_tokens))
        growing += max(0, cdiv(pos + n, bs) - len(seq.block_ids) - kv.reserved(seq))
    if not plan or growing > kv.headroom:
        return None                                     # blocks past a reservation: the policy decides, in schedule
    sched.begin_step()
    sched.ready_changed = False                         # every sequence that became ready is in this plan
    scheduled: list[ScheduledSequence] = []
    append = scheduled.append
    for seq, it, pos, n, num_out in plan:
        need = -(-(pos + n) // bs)
        if len(seq.block_ids) < need:
            while len(seq.block_ids) < need:
                kv.allocate(seq)                        # reservation or headroom, counted above: cannot fail
            blocks = list(seq.block_ids)
        elif it is None:
            blocks = list(seq.block_ids)
        else:
            blocks = it.block_ids   # prev's snapshot, equal to seq.block_ids (snapshots are never mutated)
        if it is not None and it.sample:
            append(ScheduledSequence(seq.seq_id, seq.request_id, seq.sample_index, _PLACEHOLDER, pos, blocks, True,
                                     num_out))
        else:
            append(ScheduledSequence(seq.seq_id, seq.request_id, seq.sample_index, seq.token_ids[pos:pos + n], pos,
                                     blocks, pos + n == seq.num_tokens, num_out))
    if can_admit and budget > 0:
        # after prev's work, as in schedule; the restores it starts land in later steps
        sched._admit(budget, scheduled)
        sched.stats.peak_running = max(sched.stats.peak_running, len(running))
    sched.stats.steps_ahead += 1
    return sched.build_output(scheduled, num_fed=num_fed)
