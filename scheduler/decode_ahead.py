"""Decode steps planned before the previous step's sampled tokens are known (async scheduling).

The engine queues step N+1 on the device while it still runs step N, so the host's scheduling, input
preparation and result processing overlap the device's work. Only a pure-decode step N qualifies (every
item one token that samples), with nothing a full ``Scheduler.schedule`` would do differently: no
admission possible (nothing waiting, admission paused, no free sequence slot, or the last admission
attempt found no room and nothing has been released or queued since), no restore landed since, no
pending forks, and no sequence needing a block its reservation does not cover while the policy would
have to move a running sequence to give it one. Each step-N sequence still running continues with one
token whose id is a placeholder (-1): the engine feeds the token sampled by step N on the device. A
sequence that reaches max_tokens with step N's token is left out; one that stops on it (EOS, a stop
token) or is aborted meanwhile is computed and then ignored by ``update`` (its KV lands past its last
computed position: a slot no one reads, in a block no prefix-cache entry covers).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from scheduler.output import ScheduledSequence, SchedulerOutput

if TYPE_CHECKING:
    from scheduler.scheduler import Scheduler

_PLACEHOLDER = [-1]   # shared: never mutated (the engine feeds the real id on the device)


def plan_decode_ahead(sched: "Scheduler", prev: SchedulerOutput) -> Optional[SchedulerOutput]:
    if not prev.scheduled or sched.ready_changed:
        return None
    if sched.waiting and not sched.admission_paused and len(sched.running) < sched.config.max_num_seqs \
            and not sched.admission_stalled:
        return None
    for it in prev.scheduled:
        if it.num_tokens != 1 or not it.sample:
            return None
    live, bs, kv = sched.live_sequence, sched.block_size, sched.kv
    plan = []
    growing = 0
    for it in prev.scheduled:
        seq = live(it)
        if seq is None:
            continue                                    # aborted since prev was scheduled
        assert seq.num_computed_tokens == it.start_pos, "decode ahead after prev's update"
        if seq.pending_forks:
            return None
        num_out = it.num_output_tokens + 1
        if num_out >= seq.stop.max_tokens:
            continue                                    # prev's token is its last (length)
        pos = it.start_pos + 1                          # where prev's token will be computed
        grows = len(seq.block_ids) <= pos // bs
        if grows and not kv.reserved(seq):
            growing += 1
        plan.append((seq, it, num_out, pos, grows))
    if not plan or growing > kv.headroom:
        return None                                     # a block past a reservation: the policy decides, in schedule
    sched.begin_step()
    scheduled: list[ScheduledSequence] = []
    for seq, it, num_out, pos, grows in plan:
        if grows:
            kv.allocate(seq)                            # reservation or headroom, counted above: cannot fail
            blocks = list(seq.block_ids)
        else:
            blocks = it.block_ids   # prev's snapshot, equal to seq.block_ids (snapshots are never mutated)
        scheduled.append(ScheduledSequence(seq.seq_id, seq.request_id, seq.sample_index, _PLACEHOLDER, pos,
                                           blocks, True, num_out))
    sched.stats.steps_ahead += 1
    return sched.build_output(scheduled)
