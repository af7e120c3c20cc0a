"""Session-aware continuous-batching scheduler: the orchestrator over small managers, each the only writer of
its state (docs/scheduler.md, "Structure"): SessionManager (sessions.py), KVManager (kv_manager.py: block
tables, the reservation ledger, forks, prefix blocks in flight), OffloadManager (kv_offload.py: parked
sessions, host pool, copies), Admission (admission.py), the policies (policy.py, recompute.py), steps planned
ahead (decode_ahead.py) and results (results.py). This class owns the queues (waiting, running, the request
map) and a sequence's status and tokens.

Every step, each admitted sequence's ``num_computed_tokens`` catches up with its token count under a
per-step token budget: running decodes first, then running prefill chunks, then admissions. No preemption
with the default policy, by construction: a turn is admitted only when its worst case fits (the rule in
scheduler/admission.py), parked sessions give blocks back only when one is actually needed, and work that
could never fit is rejected when submitted. A session keeps its token history and KV between turns, so a
turn computes only what is new; ``n > 1`` requests compute the prompt once (``fork_samples``, then each
sibling's own copy of a partial last block, ``block_copies``).
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence as Seq
from typing import Optional

from scheduler.admission import Admission, Verdict
from scheduler.block_pool import BlockPool
from scheduler.config import SchedulerConfig
from scheduler.decode_ahead import plan_decode_ahead
from scheduler.host_pool import HostBlockPool
from scheduler.kv_manager import KVManager, cdiv
from scheduler.kv_offload import OffloadManager
from scheduler.output import FinishedSequence, ScheduledSequence, SchedulerOutput
from scheduler.policy import make_policy
from scheduler.results import apply_results
from scheduler.request import FinishReason, KVLocation, Sequence, SequenceStatus, StopCondition
from scheduler.sessions import SessionManager
from scheduler.stats import SchedulerStats

_LIVE = (SequenceStatus.WAITING, SequenceStatus.RUNNING)


class Scheduler:
    def __init__(self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.block_size = config.block_size
        self.clock = clock
        self.stats = SchedulerStats()
        self.pool = BlockPool(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.kv = KVManager(self.pool)
        self.host = HostBlockPool(config.num_host_blocks)
        self.offload = OffloadManager(self.kv, self.host, self.stats)
        self.policy = make_policy(config.preemption, config.block_size, config.expected_output_tokens)
        self.admission = Admission(self.kv, self.offload, self.policy, config.aging_steps)
        self._seq_ids = itertools.count()
        self._sessions = SessionManager(config.default_session_ttl_s, clock, self._seq_ids)
        self.waiting: list[Sequence] = []
        self.running: dict[int, Sequence] = {}      # admission ordered
        self._requests: dict[str, list[Sequence]] = {}
        self._arrivals = itertools.count()
        self._step = 0
        self.admission_paused = False
        # Bumped whenever blocks are released or work is queued; an admission that found no room at epoch E
        # cannot succeed before it moves, so decode steps may be scheduled ahead meanwhile.
        self._epoch = 0
        self._stalled_at: Optional[int] = None
        self.ready_changed = False    # a restore landed since the last full schedule

    # ------------------------------------------------------------------ properties
    @property
    def sessions(self) -> dict[str, Sequence]:
        return self._sessions.sessions

    @property
    def weight_version(self) -> int:
        return self.kv.weight_version

    @property
    def admission_stalled(self) -> bool:
        return self._stalled_at == self._epoch

    def blocks_needed(self, num_context_tokens: int, max_tokens: int) -> int:
        return self.policy.blocks_needed(num_context_tokens, max_tokens)

    def _clamp(self, stop: StopCondition, num_context: int, n: int = 1) -> StopCondition:
        return self.policy.clamp(stop, num_context, n, self.config.max_model_len, self.config.num_blocks)

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_token_ids: Seq[int], stop: StopCondition, n: int = 1) -> list[int]:
        """Queue a one-shot request; return its sequence ids (one per sample). Raises ValueError,
        leaving the scheduler unchanged, when the request can never run."""
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if len(prompt_token_ids) == 0:
            raise ValueError("prompt_token_ids must not be empty")
        if n > self.config.max_num_seqs:
            raise ValueError(f"n={n} exceeds max_num_seqs={self.config.max_num_seqs}")
        stop = self._clamp(stop, len(prompt_token_ids), n)
        arrival = next(self._arrivals)
        seqs = [Sequence(seq_id=next(self._seq_ids), request_id=request_id, sample_index=i,
                         token_ids=list(prompt_token_ids), num_prompt_tokens=len(prompt_token_ids), stop=stop,
                         arrival=arrival, num_samples=n, is_output=bytearray(len(prompt_token_ids)),
                         enqueued_step=self._step, enqueued_at=self.clock())
                for i in range(n)]
        seqs[0].pending_forks = n - 1
        self._requests[request_id] = seqs
        self._enqueue(seqs[0])
        return [s.seq_id for s in seqs]

    def _enqueue(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._epoch += 1

    def abort(self, request_id: str) -> list[FinishedSequence]:
        """Finish every sequence of the request (or session turn) now, partial outputs kept.
        Unknown or finished ids return []."""
        seqs = self._requests.get(request_id)
        if seqs is None:
            return []
        return [self.finish(seq, FinishReason.ABORT) for seq in seqs if seq.status in _LIVE]

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def unfinished_request_ids(self) -> list[str]:
        return list(self._requests)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    def request_sequences(self, request_id: str) -> list[Sequence]:
        """Every sample of an unfinished request (leader first)."""
        return self._requests[request_id]

    def evacuate(self) -> None:
        """Empty the device pool of everything not running (the engine goes to sleep; nothing may run): parked
        sessions' KV goes to the host pool where it fits, else is dropped (counted); the prefix cache is
        emptied. The copies go with the next output."""
        assert not self.running, "evacuate with sequences running"
        off = self.offload
        for seq in list(off.parked.values()):
            if seq.kv is KVLocation.DEVICE and not off.offload(seq):
                off.drop(seq)
        self.pool.drop_cached()
        self._epoch += 1

    def set_weight_version(self, version: int) -> None:
        """New weights: cached blocks of other versions are never reused."""
        self.kv.set_weight_version(version)

    def invalidate_kv(self) -> int:
        """Forget every computed token's KV (weights changed, ``kv="recompute"``): running sequences go back
        to the queue head and recompute their whole context (not counted as preemptions: nothing ran short),
        parked sessions re-prefill at their next turn. Returns the number of tokens whose KV was thrown away."""
        lost = 0
        for seq in list(self.running.values()):
            lost += seq.num_computed_tokens
            self._stop_running(seq)
            self.offload.drop(seq, count=False)
            seq.enqueued_step = self._step - self.config.aging_steps   # first in line
            self._enqueue(seq)
        for seq in list(self.offload.parked.values()):
            lost += seq.num_computed_tokens
            self.offload.drop(seq, count=False)
        for seq in self.waiting:
            if seq.kv is KVLocation.HOST:   # swapped out mid-turn (swap mode)
                lost += seq.num_computed_tokens
                self.offload.drop(seq, count=False)
        return lost

    # ------------------------------------------------------------------ sessions
    def open_session(self, session_id: str, ttl_s: Optional[float] = None, priority: int = 0) -> None:
        self.offload.park(self._sessions.open(session_id, ttl_s, priority))

    def get_session(self, session_id: str) -> Sequence:
        return self._sessions.get(session_id)

    def submit_turn(self, session_id: str, request_id: str, new_token_ids: Seq[int], stop: StopCondition) -> int:
        """Append tokens (an observation or user message) to the session and queue the model's turn; returns
        the session's seq id. Raises (SessionError / ValueError) without changing anything when the session
        is unknown, closed or busy, or the turn can never fit."""
        seq = self._sessions.check_turn(session_id, new_token_ids)
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        stop = self._clamp(stop, seq.num_tokens + len(new_token_ids))
        self._sessions.begin_turn(seq, new_token_ids)
        seq.stop, seq.request_id, seq.finish_reason = stop, request_id, None
        seq.arrival = next(self._arrivals)
        seq.enqueued_step, seq.enqueued_at = self._step, self.clock()
        self._requests[request_id] = [seq]
        self._enqueue(seq)
        return seq.seq_id

    def close_session(self, session_id: str) -> list[FinishedSequence]:
        """Free everything the session holds; a turn in progress ends with "aborted" (returned)."""
        seq = self._sessions.get(session_id)
        if seq.status in _LIVE:
            return [self.finish(seq, FinishReason.ABORT, closing=True)]
        self._release_session(seq)
        return []

    def _release_session(self, seq: Sequence) -> None:
        self._epoch += 1
        self.offload.unpark(seq)
        self.offload.drop(seq, count=False)
        self._sessions.forget(seq)

    # ------------------------------------------------------------------ scheduling
    def begin_step(self) -> None:
        """Per-step housekeeping, for a full schedule and a decode step planned ahead alike."""
        self._step += 1
        for seq in self._sessions.expired(self.offload.parked.values()):
            self._release_session(seq)
            self.stats.expired_sessions += 1

    def schedule(self) -> SchedulerOutput:
        self.begin_step()
        self.ready_changed = False
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        decodes, chunks = [], []
        for s in self.running.values():
            if s.kv_ready:
                (decodes if len(s.token_ids) - s.num_computed_tokens == 1 else chunks).append(s)
        # Decodes first (1 token each), then continuing prefill chunks.
        for seq in itertools.chain(decodes, chunks):
            if budget == 0:
                break
            if seq.seq_id not in self.running:   # moved out earlier in this step (swap / recompute policies)
                continue
            num_scheduled = len(scheduled)
            item = self._schedule_chunk(seq, budget, scheduled)
            if item is not None:
                scheduled.append(item)
                budget -= item.num_tokens
            if len(scheduled) != num_scheduled + (item is not None):   # a policy moved scheduled items out
                budget = cfg.max_num_batched_tokens - sum(it.num_tokens for it in scheduled)
        if not (self.admission_paused or budget == 0 or len(self.running) >= cfg.max_num_seqs):
            self._admit(budget, scheduled)
        self.stats.peak_running = max(self.stats.peak_running, len(self.running))
        return self.build_output(scheduled)

    def _admit(self, budget: int, scheduled: list[ScheduledSequence]) -> None:
        """Admissions in class order; a head that does not fit blocks those behind it, so large turns are not
        starved by a stream of small ones. A candidate whose next prompt block is being computed by a running
        sequence (a GRPO group sent as separate requests) is deferred, not blocking: it hits the cache next step."""
        self._stalled_at = None
        deferred = False
        step = self._step
        for seq in sorted(self.waiting, key=lambda s: self.admission.key(s, step)):
            if budget == 0 or len(self.running) + 1 + seq.pending_forks > self.config.max_num_seqs:
                break
            verdict = self.admission.try_admit(seq)
            if verdict is Verdict.DEFERRED:
                deferred = True
                continue
            if verdict is Verdict.BLOCKED:
                if not deferred:
                    self._stalled_at = self._epoch   # no room until something is released or queued
                break
            self.waiting.remove(seq)
            self._started(seq)
            if not seq.kv_ready:
                continue                             # its restore is in flight: scheduled once it lands
            item = self._schedule_chunk(seq, budget, scheduled)
            assert item is not None, "an admitted sequence must be schedulable"
            scheduled.append(item)
            budget -= item.num_tokens

    def _started(self, seq: Sequence) -> None:
        self.running[seq.seq_id] = seq
        seq.num_cached_tokens = seq.num_computed_tokens
        seq.num_prefill_tokens = 0
        stats = self.stats
        stats.cached_prompt_tokens += seq.num_cached_tokens
        if seq.lost_tokens:
            stats.recomputed_tokens += max(0, seq.lost_tokens - seq.num_computed_tokens)
            seq.lost_tokens = 0
        seq.queue_wait_s = self.clock() - seq.enqueued_at
        stats.queue_wait_s += seq.queue_wait_s
        stats.admissions += 1

    def kv_landed(self, seq_ids: Iterable[int]) -> None:
        """The engine's host -> device copies for these restores (``SchedulerOutput.restores``) completed."""
        if self.offload.landed(seq_ids):
            self.ready_changed = True

    def live_sequence(self, item: ScheduledSequence) -> Optional[Sequence]:
        """The running sequence a scheduled item belongs to, or None when it has ended since the item was
        scheduled (finished, aborted, closed; a session seq id may already serve a newer turn). Inlined on the
        per-step hot paths (scheduler.decode_ahead, scheduler.results): change those with it."""
        seq = self.running.get(item.seq_id)
        return seq if seq is not None and seq.request_id == item.request_id else None

    def schedule_decode_ahead(self, prev: SchedulerOutput) -> Optional[SchedulerOutput]:
        """The step after ``prev``, scheduled before ``prev``'s sampled tokens are known, or None
        (``scheduler.decode_ahead`` says when)."""
        return plan_decode_ahead(self, prev)

    def build_output(self, scheduled: list[ScheduledSequence], num_fed: int = 0) -> SchedulerOutput:
        copies, self.kv.block_copies = self.kv.block_copies, []
        swap_out, swap_in, restores = self.offload.take_copies()
        out = SchedulerOutput(scheduled=scheduled, num_batched_tokens=sum(it.num_tokens for it in scheduled),
                              block_copies=copies, swap_out=swap_out, swap_in=swap_in, restores=restores,
                              num_fed=num_fed)
        if not out.is_empty:
            self.stats.steps += 1
        return out

    def _allocate(self, seq: Sequence, scheduled: list[ScheduledSequence]) -> bool:
        if self.kv.reserved(seq) or self.kv.headroom > 0:
            self.kv.allocate(seq)
            return True
        return self.policy.on_shortage(self, seq, scheduled)

    def _schedule_chunk(self, seq: Sequence, budget: int,
                        scheduled: list[ScheduledSequence]) -> Optional[ScheduledSequence]:
        start = seq.num_computed_tokens
        num_new = min(seq.num_tokens - start, budget)
        assert num_new > 0, f"sequence {seq.seq_id} has nothing to compute"
        end = start + num_new
        while len(seq.block_ids) < cdiv(end, self.block_size):
            if not self._allocate(seq, scheduled):
                return None
        sample = end == seq.num_tokens
        forks = ()
        if sample and seq.pending_forks and self.policy.shares_partial_blocks:
            forks = tuple((f.seq_id, f.sample_index) for f in self._requests[seq.request_id][1:])
        return ScheduledSequence(
            seq_id=seq.seq_id, request_id=seq.request_id, sample_index=seq.sample_index,
            token_ids=seq.token_ids[start:end], start_pos=start, block_ids=list(seq.block_ids),
            sample=sample, num_output_tokens=seq.num_output_tokens, fork_samples=forks)

    # ------------------------------------------------------------------ moving running sequences (policies)
    def _stop_running(self, seq: Sequence) -> None:
        self.kv.untrack_inflight(seq)
        del self.running[seq.seq_id]
        self.kv.unreserve(seq)

    def _requeue(self, seq: Sequence, scheduled: list[ScheduledSequence]) -> None:
        scheduled[:] = [it for it in scheduled if it.seq_id != seq.seq_id]
        self._stop_running(seq)
        seq.preempted = True
        seq.enqueued_step, seq.enqueued_at = self._step, self.clock()
        self._enqueue(seq)                             # keeps its arrival: first in its class

    def preempt(self, seq: Sequence, scheduled: list[ScheduledSequence]) -> None:
        """Recompute baseline: throw a running sequence's KV away and queue it again."""
        self._requeue(seq, scheduled)
        seq.lost_tokens = seq.num_computed_tokens
        self.offload.drop(seq, count=False)
        self.stats.preemptions += 1

    def swap_out(self, seq: Sequence, scheduled: list[ScheduledSequence]) -> None:
        """Swap mode: move a running sequence's KV to the host pool and queue it again; it resumes from there.
        Only when the host pool cannot take it is its KV dropped (recomputed later, counted)."""
        self._requeue(seq, scheduled)
        if self.offload.offload(seq, running=True):
            self.stats.swapped_out += 1
        else:
            seq.lost_tokens = seq.num_computed_tokens
            self.offload.drop(seq, count=False)
            self.stats.preemptions += 1

    # ------------------------------------------------------------------ results
    def update(self, output: SchedulerOutput, sampled: dict[int, int]) -> list[FinishedSequence]:
        """Advance computed counters, append sampled tokens, fork n>1 siblings, finish turns
        (``scheduler.results``). ``sampled`` maps seq_id -> token id for every scheduled item with
        ``sample=True`` (items of sequences aborted since ``schedule`` are ignored)."""
        return apply_results(self, output, sampled)

    def finish(self, seq: Sequence, reason: FinishReason, closing: bool = False) -> FinishedSequence:
        self._epoch += 1
        # before anything is freed: where the context's KV (and per-slot state beside it) is on the device
        blocks = tuple(seq.block_ids) if seq.kv is KVLocation.DEVICE else ()
        if seq.status is SequenceStatus.RUNNING:
            self._stop_running(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        # An aborted leader's unforked siblings held nothing (their reservation was the leader's).
        seq.pending_forks = 0
        seq.preempted = False
        seq.finish_reason = reason
        result = FinishedSequence(
            seq_id=seq.seq_id, request_id=seq.request_id, sample_index=seq.sample_index,
            prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens], output_token_ids=seq.output_token_ids,
            finish_reason=reason.value, num_cached_tokens=seq.num_cached_tokens,
            num_prefill_tokens=seq.num_prefill_tokens, queue_wait_s=seq.queue_wait_s, session_id=seq.session_id,
            block_ids=blocks)
        if seq.session_id is not None:
            self.stats.finished_turns += 1
            if seq.kv is KVLocation.DEVICE:
                self.kv.trim(seq)
            self._sessions.end_turn(seq)
            if seq.seq_id not in self.offload.parked:   # a turn that never started is parked already
                self.offload.park(seq)
            if closing:
                self._release_session(seq)
            elif not self.config.retain_sessions:
                self.offload.drop(seq, count=False)     # baseline: re-prefill the history next turn
        else:
            self.offload.drop(seq, count=False)
            seq.status = SequenceStatus.FINISHED
        seqs = self._requests[seq.request_id]
        if all(s.status not in _LIVE for s in seqs):
            del self._requests[seq.request_id]
            if reason is FinishReason.ABORT:
                self.stats.aborted_requests += 1
            else:
                self.stats.finished_requests += 1
        return result

    # ------------------------------------------------------------------ invariants
    def check_integrity(self) -> None:
        from scheduler.integrity import check_scheduler
        check_scheduler(self)
