"""Session-aware continuous-batching scheduler: reservation admission, chunked prefill, no preemption.

Every step, each admitted sequence's ``num_computed_tokens`` catches up with its token count under a
per-step token budget: running decodes first, then running prefill chunks, then admissions in class
order — turns of sessions whose KV is on the device, then sessions restored from the host, then new
work — FCFS within a class, with aging (a turn waiting ``aging_steps`` steps jumps the classes).

No preemption, by construction: a request or turn is admitted only when the pool can *reserve* every
block it may still need (``cdiv(context + max_tokens - 1, block_size)`` minus what it already holds
or hits in the prefix cache), so an admitted sequence can always allocate its next block. If it does
not fit, parked sessions' KV is offloaded to the host (``IdleKVManager``); running turns are never
touched. Work that could never fit the pool is rejected when it is submitted.

Sessions: ``open_session`` / ``submit_turn`` / ``close_session``. A session keeps its whole token
history and the KV of every computed token between turns, so a turn computes only what is new
(its new tokens, plus the previous turn's last sampled token, whose KV a turn never computes —
counted as a decode token). ``n > 1`` requests compute the prompt once: the leader's chunk that completes
it also samples every sibling's first token from the same row (``ScheduledSequence.fork_samples``); the
siblings then share the prompt's full blocks and get their own copy of a partial last block
(``SchedulerOutput.block_copies``, run before the next forward).
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass
from typing import Optional

from scheduler.block_pool import BlockPool, block_keys
from scheduler.config import SchedulerConfig
from scheduler.host_pool import HostBlockPool
from scheduler.kv_offload import IdleKVManager
from scheduler.output import FinishedSequence, ScheduledSequence, SchedulerOutput
from scheduler.request import FinishReason, KVLocation, Sequence, SequenceStatus, StopCondition


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


_ADMITTED, _DEFERRED, _BLOCKED = "admitted", "deferred", "blocked"
EXPIRY_SCAN_S = 0.1   # how often idle sessions are checked against their TTL


class SessionError(ValueError):
    """An operation on an unknown or closed session, or a turn while one is in progress.

    ``kind`` says which, for callers that map errors to codes: "unknown", "closed", "busy", "exists"
    (open of an id in use) or "invalid" (a bad argument)."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


class ContextTooLarge(ValueError):
    """A request or turn could never run: longer than the model's context, or more KV than the pool."""


@dataclass
class SchedulerStats:
    steps: int = 0                  # non-empty steps scheduled
    prefill_tokens: int = 0         # prompt / observation tokens computed
    cached_prompt_tokens: int = 0   # context tokens reused at admission (prefix cache, fork, resident or restored KV)
    decode_tokens: int = 0          # model-sampled tokens computed (fed back as inputs)
    preemptions: int = 0            # running sequences evicted (only the "recompute" baseline does this)
    recomputed_tokens: int = 0      # tokens computed again after a preemption
    finished_requests: int = 0
    aborted_requests: int = 0
    finished_turns: int = 0
    offloaded_blocks: int = 0
    offloaded_sessions: int = 0
    restored_blocks: int = 0
    restored_sessions: int = 0
    dropped_sessions: int = 0       # parked sessions whose KV was dropped under pressure
    dropped_tokens: int = 0
    expired_sessions: int = 0
    queue_wait_s: float = 0.0       # summed over admissions
    admissions: int = 0
    steps_ahead: int = 0            # decode steps scheduled before the previous step's tokens were read


class Scheduler:
    def __init__(self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.block_size = config.block_size
        self.clock = clock
        self.pool = BlockPool(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.stats = SchedulerStats()
        self.kv = IdleKVManager(self.pool, HostBlockPool(config.num_host_blocks), self.stats)
        self.waiting: list[Sequence] = []
        self.running: dict[int, Sequence] = {}      # admission ordered
        self.sessions: dict[str, Sequence] = {}
        self._requests: dict[str, list[Sequence]] = {}
        self._closed_sessions: deque[str] = deque(maxlen=100_000)
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self._step = 0
        self.weight_version = 0
        self._recompute = config.preemption == "recompute"
        self._inflight: dict = {}   # block key -> running sequences about to compute it
        self._block_copies: list[tuple[int, int]] = []   # forks' partial-block copies for the next output
        self.admission_paused = False
        self._next_expiry_scan = float("-inf")
        # Bumped whenever blocks are released or work is queued; an admission that found no room at epoch E
        # (``_admission_stalled``) cannot succeed before it moves, so decode steps may be scheduled ahead.
        self._epoch = 0
        self._admission_stalled: Optional[int] = None

    # ------------------------------------------------------------------ sizing
    def blocks_needed(self, num_context_tokens: int, max_tokens: int) -> int:
        """Blocks one sequence may hold: KV of the context + every sampled token but the last."""
        return max(1, cdiv(num_context_tokens + max_tokens - 1, self.block_size))

    def _fork_shared_blocks(self, num_prompt: int) -> int:
        """Prompt blocks an n > 1 sibling shares with its leader: every full one (the recompute baseline
        recomputes the last prompt token's block per sibling, so it shares the full blocks before it)."""
        return (num_prompt - (1 if self._recompute else 0)) // self.block_size

    def _group_blocks(self, num_prompt: int, max_tokens: int, n: int, num_held: int) -> int:
        per_seq = self.blocks_needed(num_prompt, max_tokens)
        return (per_seq - num_held) + (n - 1) * (per_seq - self._fork_shared_blocks(num_prompt))

    def _clamp(self, stop: StopCondition, num_context: int, n: int = 1) -> StopCondition:
        if num_context >= self.config.max_model_len:
            raise ContextTooLarge(f"the context has {num_context} tokens; the model's context (max_model_len) "
                             f"is {self.config.max_model_len}, leaving no room to generate")
        max_tokens = min(stop.max_tokens, self.config.max_model_len - num_context)
        blocks = self._group_blocks(num_context, max_tokens, n, 0)
        if blocks > self.config.num_blocks:
            raise ContextTooLarge(f"needs up to {blocks} KV blocks (context {num_context} + max_tokens {max_tokens}"
                             f"{f', n={n}' if n > 1 else ''}) but the pool has {self.config.num_blocks}")
        if max_tokens == stop.max_tokens:
            return stop
        return StopCondition(max_tokens, stop.stop_token_ids, stop.eos_token_ids, stop.ignore_eos)

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_token_ids: Seq[int], stop: StopCondition,
                    n: int = 1) -> list[int]:
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
        self.waiting.append(seqs[0])
        self._epoch += 1
        return [s.seq_id for s in seqs]

    def abort(self, request_id: str) -> list[FinishedSequence]:
        """Finish every sequence of the request (or session turn) now, partial outputs kept.
        Unknown or finished ids return []."""
        seqs = self._requests.get(request_id)
        if seqs is None:
            return []
        return [self._finish(seq, FinishReason.ABORT) for seq in seqs if seq.status in
                (SequenceStatus.WAITING, SequenceStatus.RUNNING)]

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def unfinished_request_ids(self) -> list[str]:
        """Ids of every request (or session turn) with an unfinished sample."""
        return list(self._requests)

    def has_request(self, request_id: str) -> bool:
        """True while any sample of the request (or the turn) is unfinished."""
        return request_id in self._requests

    def set_weight_version(self, version: int) -> None:
        """New weights: cached blocks of other versions are never reused."""
        self.weight_version = version
        self.pool.drop_cached(keep_version=version)

    def invalidate_kv(self) -> int:
        """Forget every computed token's KV (weights changed, ``kv="recompute"``): running
        sequences go back to the queue head and recompute their whole context (not counted as
        preemptions: nothing ran short), parked sessions re-prefill at their next turn. Returns
        the number of tokens whose KV was thrown away."""
        lost = 0
        for seq in list(self.running.values()):
            lost += seq.num_computed_tokens
            self._untrack_inflight(seq)
            del self.running[seq.seq_id]
            self.pool.release(seq.block_ids[::-1])
            self.pool.unreserve(seq.num_reserved_blocks)
            seq.block_ids, seq.block_keys, seq.num_reserved_blocks = [], [], 0
            seq.num_computed_tokens = 0
            seq.kv = KVLocation.NONE
            seq.status = SequenceStatus.WAITING
            seq.enqueued_step = self._step - self.config.aging_steps   # first in line
            self.waiting.append(seq)
        for seq in list(self.kv.parked.values()):
            lost += seq.num_computed_tokens
            self.kv.drop(seq, count=False)
        return lost

    # ------------------------------------------------------------------ sessions
    def open_session(self, session_id: str, ttl_s: Optional[float] = None, priority: int = 0) -> None:
        if not isinstance(session_id, str) or not session_id:
            raise SessionError(f"session_id must be a non-empty str, got {session_id!r}")
        if session_id in self.sessions:
            raise SessionError(f"session {session_id!r} is already open", "exists")
        ttl = self.config.default_session_ttl_s if ttl_s is None else ttl_s
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
            raise SessionError(f"ttl_s must be a positive number of seconds, got {ttl_s!r}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise SessionError(f"priority must be an int, got {priority!r}")
        seq = Sequence(seq_id=next(self._seq_ids), request_id="", sample_index=0, token_ids=[],
                       num_prompt_tokens=0, stop=StopCondition(max_tokens=1), arrival=-1,
                       session_id=session_id, status=SequenceStatus.AWAITING_INPUT,
                       ttl_s=float(ttl), priority=priority, last_active=self.clock())
        self.sessions[session_id] = seq
        self.kv.park(seq)

    def get_session(self, session_id: str) -> Sequence:
        seq = self.sessions.get(session_id)
        if seq is None:
            state = "closed" if session_id in self._closed_sessions else "unknown"
            raise SessionError(f"session {session_id!r} is {state}", state)
        return seq

    def submit_turn(self, session_id: str, request_id: str, new_token_ids: Seq[int], stop: StopCondition) -> int:
        """Append tokens (an observation or user message) to the session and queue the model's
        turn; returns the session's seq id. Raises (SessionError / ValueError) without changing
        anything when the session is unknown, closed or busy, or the turn can never fit."""
        seq = self.get_session(session_id)
        if seq.status is not SequenceStatus.AWAITING_INPUT:
            raise SessionError(f"session {session_id!r} already has a turn in progress ({seq.request_id!r})", "busy")
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not new_token_ids and not seq.token_ids:
            raise ValueError("new_token_ids must not be empty on a session's first turn")
        num_context = seq.num_tokens + len(new_token_ids)
        stop = self._clamp(stop, num_context)
        seq.token_ids.extend(new_token_ids)
        seq.is_output.extend(bytes(len(new_token_ids)))
        seq.num_prompt_tokens = num_context
        seq.stop = stop
        seq.request_id = request_id
        seq.arrival = next(self._arrivals)
        seq.enqueued_step, seq.enqueued_at = self._step, self.clock()
        seq.finish_reason = None
        seq.status = SequenceStatus.WAITING
        seq.num_turns += 1
        self._requests[request_id] = [seq]
        self.waiting.append(seq)
        self._epoch += 1
        return seq.seq_id

    def close_session(self, session_id: str) -> list[FinishedSequence]:
        """Free everything the session holds; a turn in progress ends with "aborted" (returned)."""
        seq = self.get_session(session_id)
        finished = []
        if seq.status in (SequenceStatus.WAITING, SequenceStatus.RUNNING):
            finished.append(self._finish(seq, FinishReason.ABORT, closing=True))
        else:
            self._release_session(seq)
        return finished

    def _release_session(self, seq: Sequence) -> None:
        self._epoch += 1
        self.kv.unpark(seq)
        self.kv.drop(seq, count=False)
        seq.status = SequenceStatus.FINISHED
        del self.sessions[seq.session_id]
        self._closed_sessions.append(seq.session_id)

    def _expire_sessions(self, now: float) -> None:
        # A scan of every parked session is O(sessions): do it at most every EXPIRY_SCAN_S, not
        # every step (TTLs are seconds to minutes).
        if now < self._next_expiry_scan:
            return
        self._next_expiry_scan = now + EXPIRY_SCAN_S
        for seq in list(self.kv.parked.values()):
            if seq.status is SequenceStatus.AWAITING_INPUT and now - seq.last_active > seq.ttl_s:
                self._release_session(seq)
                self.stats.expired_sessions += 1

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> SchedulerOutput:
        self._step += 1
        self.kv.begin_step()
        self._expire_sessions(self.clock())
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        decodes, chunks = [], []
        for s in self.running.values():
            (decodes if len(s.token_ids) - s.num_computed_tokens == 1 else chunks).append(s)
        # Decodes first (1 token each), then continuing prefill chunks.
        for seq in itertools.chain(decodes, chunks):
            if budget == 0:
                break
            if seq.seq_id not in self.running:   # preempted earlier in this step (recompute baseline)
                continue
            num_scheduled = len(scheduled)
            item = self._schedule_chunk(seq, budget, scheduled)
            if item is not None:
                scheduled.append(item)
                budget -= item.num_tokens
            if len(scheduled) != num_scheduled + (item is not None):   # a preemption removed items
                budget = self.config.max_num_batched_tokens - sum(it.num_tokens for it in scheduled)
        if self.admission_paused or budget == 0 or len(self.running) >= self.config.max_num_seqs:
            return self._output(scheduled)   # draining for a weight update, or no room: skip the sort
        # Admissions in class order; a head that does not fit blocks those behind it, so large
        # turns are not starved by a stream of small ones.
        # A candidate whose next prompt block is being computed by a running sequence (a GRPO
        # group sent as separate requests) is deferred, not blocking: it hits the cache next step.
        self._admission_stalled = None
        deferred = False
        for seq in sorted(self.waiting, key=self._admission_key):
            if budget == 0 or len(self.running) + 1 + seq.pending_forks > self.config.max_num_seqs:
                break
            verdict = self._try_admit(seq)
            if verdict is _DEFERRED:
                deferred = True    # admissible once a running sequence computes its block: not a stall
                continue
            if verdict is not _ADMITTED:
                if not deferred:
                    self._admission_stalled = self._epoch  # no room until something is released or queued
                break
            self.waiting.remove(seq)
            item = self._schedule_chunk(seq, budget, scheduled)
            assert item is not None, "an admitted sequence must be schedulable"
            scheduled.append(item)
            budget -= item.num_tokens
        return self._output(scheduled)

    def live_sequence(self, item: ScheduledSequence) -> Optional[Sequence]:
        """The running sequence a scheduled item belongs to, or None when it has ended since the item was
        scheduled (finished, aborted, closed; a session seq id may already serve a newer turn)."""
        seq = self.running.get(item.seq_id)
        return seq if seq is not None and seq.request_id == item.request_id else None

    def schedule_decode_ahead(self, prev: SchedulerOutput) -> Optional[SchedulerOutput]:
        """The step after ``prev``, scheduled before ``prev``'s sampled tokens are known, so the engine can
        prepare and queue it while the device still runs ``prev`` (async scheduling). None when that is not
        possible; the engine then reads ``prev``, calls ``update`` and ``schedule`` as usual.

        Only a pure-decode ``prev`` qualifies (every item one token that samples), with nothing that a full
        ``schedule`` would do differently: no admission possible (nothing waiting, admission paused, no free
        sequence slot, or the last admission attempt found no room and nothing has been released or queued
        since), no pending forks, no preemption baseline. Each ``prev`` sequence still running continues with one
        token whose id is a placeholder (-1): the engine feeds the token sampled by ``prev`` on the device. A
        sequence that reaches max_tokens with ``prev``'s token is left out; one that stops on it (EOS, a stop
        token) or is aborted meanwhile is computed and then ignored by ``update`` (its KV lands past its last
        computed position: a slot no one reads, in a block no prefix-cache entry covers)."""
        if self._recompute or prev.swap_out or prev.swap_in or not prev.scheduled:
            return None
        if self.waiting and not self.admission_paused and len(self.running) < self.config.max_num_seqs \
                and self._admission_stalled != self._epoch:
            return None
        for it in prev.scheduled:
            if it.num_tokens != 1 or not it.sample:
                return None
        self._step += 1
        scheduled: list[ScheduledSequence] = []
        live, bs = self.live_sequence, self.block_size
        placeholder = [-1]   # shared: never mutated (the engine feeds the real id on the device)
        for it in prev.scheduled:
            seq = live(it)
            if seq is None:
                continue                                    # aborted since prev was scheduled
            assert seq.num_computed_tokens == it.start_pos, "schedule_decode_ahead after prev's update"
            if seq.pending_forks:
                return None
            num_out = it.num_output_tokens + 1
            if num_out >= seq.stop.max_tokens:
                continue                                    # prev's token is its last (length)
            pos = it.start_pos + 1                          # where prev's token will be computed
            if len(seq.block_ids) <= pos // bs:
                self._allocate(seq, scheduled)              # from its reservation: cannot fail
                blocks = list(seq.block_ids)
            else:
                blocks = it.block_ids   # prev's snapshot, equal to seq.block_ids (snapshots are never mutated)
            scheduled.append(ScheduledSequence(seq.seq_id, seq.request_id, seq.sample_index, placeholder, pos,
                                               blocks, True, num_out))
        if not scheduled:
            return None
        self.stats.steps_ahead += 1
        return self._output(scheduled)

    def _output(self, scheduled: list[ScheduledSequence]) -> SchedulerOutput:
        num_tokens = sum(it.num_tokens for it in scheduled)
        copies, self._block_copies = self._block_copies, []
        out = SchedulerOutput(scheduled=scheduled, num_batched_tokens=num_tokens, block_copies=copies,
                              swap_out=self.kv.swap_out, swap_in=self.kv.swap_in)
        if not out.is_empty:
            self.stats.steps += 1
        return out

    def _admission_key(self, seq: Sequence) -> tuple:
        if self._step - seq.enqueued_step >= self.config.aging_steps:
            cls = 0                                   # aged: ahead of every class
        elif seq.session_id is not None and seq.kv is KVLocation.DEVICE:
            cls = 1                                   # resident session turn
        elif seq.kv is KVLocation.HOST:
            cls = 2                                   # offloaded session turn
        else:
            cls = 3                                   # new work (or a dropped session)
        return (cls, -seq.priority, seq.arrival)

    def _prefix_hits(self, seq: Sequence) -> tuple[list[int], list, object]:
        """Blocks of ``seq``'s context available in the prefix cache, their keys, and the key of
        the first cacheable block that missed (None if all hit)."""
        if not self.pool.enable_prefix_caching:
            return [], [], None
        if seq.kv is KVLocation.HOST:
            keys = seq.block_keys[:len(seq.host_block_ids)]
        else:
            # At least one context token is always computed, so the step yields logits to sample.
            # Cached on the sequence: a queued head is retried every step.
            stamp = (seq.num_tokens, self.weight_version)
            if seq.context_keys is None or seq.context_keys[0] != stamp:
                num_cacheable = (seq.num_tokens - 1) // self.block_size * self.block_size
                seq.context_keys = (stamp, block_keys(seq.token_ids, self.block_size, self.weight_version,
                                                      num_tokens=num_cacheable))
            keys = seq.context_keys[1]
        hits = self.pool.match_prefix(keys)
        return hits, keys[:len(hits)], keys[len(hits)] if len(keys) > len(hits) else None

    def _try_admit(self, seq: Sequence) -> str:
        for attempt in range(2):
            hits, keys, next_key = ([], [], None) if seq.kv is KVLocation.DEVICE else self._prefix_hits(seq)
            if next_key is not None and next_key in self._inflight:
                return _DEFERRED
            held = len(seq.block_ids) + len(hits)
            if self._recompute:   # baseline: only the context's blocks must be free now
                need = max(0, cdiv(seq.num_tokens, self.block_size) - held)
            else:
                need = self._group_blocks(seq.num_prompt_tokens, seq.stop.max_tokens, 1 + seq.pending_forks, held)
            shortfall = need + self.pool.num_evictable_among(hits) - self.pool.num_available
            if shortfall <= 0:
                break
            if attempt == 1 or not self.kv.make_room(shortfall, exclude=seq):
                return _BLOCKED
        self.pool.take(hits)
        if not self._recompute:
            self.pool.reserve(need)
            seq.num_reserved_blocks = need
        if seq.kv is KVLocation.HOST:
            self.kv.restore(seq, hits)
        elif seq.kv is KVLocation.NONE:
            seq.block_ids = list(hits)
            seq.block_keys = list(keys)
            seq.num_computed_tokens = len(hits) * self.block_size
            seq.kv = KVLocation.DEVICE
        seq.num_cached_tokens = seq.num_computed_tokens
        seq.num_prefill_tokens = 0
        self.stats.cached_prompt_tokens += seq.num_cached_tokens
        if seq.lost_tokens:
            self.stats.recomputed_tokens += max(0, seq.lost_tokens - seq.num_computed_tokens)
            seq.lost_tokens = 0
        now = self.clock()
        seq.queue_wait_s = now - seq.enqueued_at
        self.stats.queue_wait_s += seq.queue_wait_s
        self.stats.admissions += 1
        seq.status = SequenceStatus.RUNNING
        self.kv.unpark(seq)
        self.running[seq.seq_id] = seq
        if self.pool.enable_prefix_caching:
            self._track_inflight(seq)
        return _ADMITTED

    def _track_inflight(self, seq: Sequence) -> None:
        """Remember the keys of the full context blocks ``seq`` is about to compute."""
        num_full = seq.num_tokens // self.block_size
        seq.inflight_keys = deque(block_keys(seq.token_ids, self.block_size, self.weight_version,
                                             len(seq.block_keys), seq.block_keys, num_full * self.block_size))
        for key in seq.inflight_keys:
            self._inflight[key] = self._inflight.get(key, 0) + 1

    def _untrack_inflight(self, seq: Sequence, key=None) -> None:
        """Forget ``key`` (computed now) if it is ``seq``'s next in-flight key; all when None."""
        while seq.inflight_keys and (key is None or seq.inflight_keys[0] == key):
            k = seq.inflight_keys.popleft()
            n = self._inflight[k] - 1
            if n:
                self._inflight[k] = n
            else:
                del self._inflight[k]
            if key is not None:
                break

    def _allocate(self, seq: Sequence, scheduled: list[ScheduledSequence]) -> bool:
        if not self._recompute:
            assert seq.num_reserved_blocks > 0, f"sequence {seq.seq_id} outgrew its reservation"
            seq.num_reserved_blocks -= 1
            seq.block_ids.append(self.pool.allocate_reserved())
            return True
        while self.pool.num_available == 0:
            victims = [s for s in self.running.values() if s is not seq]
            if not victims:
                return False
            self._preempt(victims[-1], scheduled)     # the newest admitted
        self.pool.reserve(1)
        seq.block_ids.append(self.pool.allocate_reserved())
        return True

    def _preempt(self, seq: Sequence, scheduled: list[ScheduledSequence]) -> None:
        """Recompute baseline only: throw a running sequence's KV away and queue it again."""
        assert self._recompute
        scheduled[:] = [it for it in scheduled if it.seq_id != seq.seq_id]
        self._untrack_inflight(seq)
        del self.running[seq.seq_id]
        self.pool.release(seq.block_ids[::-1])
        seq.block_ids, seq.block_keys = [], []
        seq.lost_tokens = seq.num_computed_tokens
        seq.num_computed_tokens = 0
        seq.kv = KVLocation.NONE
        seq.status = SequenceStatus.WAITING
        seq.enqueued_step, seq.enqueued_at = self._step, self.clock()
        self.waiting.append(seq)                       # keeps its arrival: first in its class
        self.stats.preemptions += 1

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
        if sample and seq.pending_forks and not self._recompute:
            forks = tuple((f.seq_id, f.sample_index) for f in self._requests[seq.request_id][1:])
        return ScheduledSequence(
            seq_id=seq.seq_id, request_id=seq.request_id, sample_index=seq.sample_index,
            token_ids=seq.token_ids[start:end], start_pos=start, block_ids=list(seq.block_ids),
            sample=sample, num_output_tokens=seq.num_output_tokens, fork_samples=forks)

    # ------------------------------------------------------------------ results
    def update(self, output: SchedulerOutput, sampled: dict[int, int]) -> list[FinishedSequence]:
        """Advance computed counters, append sampled tokens, fork n>1 siblings, finish turns.

        ``sampled`` maps seq_id -> token id for every scheduled item with ``sample=True`` (items
        of sequences aborted since ``schedule`` are ignored)."""
        finished: list[FinishedSequence] = []
        live, stats, bs = self.live_sequence, self.stats, self.block_size
        caching = self.pool.enable_prefix_caching
        prefill = decode = 0
        for item in output.scheduled:
            seq = live(item)
            if seq is None:   # ended since it was scheduled
                continue
            start, n = item.start_pos, item.num_tokens
            assert seq.num_computed_tokens == start, "update out of order with schedule"
            seq.num_computed_tokens = computed = start + n
            num_outputs = seq.is_output[start] if n == 1 else sum(seq.is_output[start:computed])
            seq.num_prefill_tokens += n - num_outputs
            prefill += n - num_outputs
            decode += num_outputs
            if caching and computed // bs > len(seq.block_keys):
                self._register_full_blocks(seq)
            if not item.sample:
                continue
            if seq.pending_forks:
                self._fork(seq, sampled, finished)
            self._append_sampled(seq, sampled[item.seq_id], finished)
        stats.prefill_tokens += prefill
        stats.decode_tokens += decode
        return finished

    def _append_sampled(self, seq: Sequence, token: int, finished: list[FinishedSequence]) -> bool:
        """Append a sampled token; finish the turn when it stops it. -> whether the sequence still runs."""
        tokens = seq.token_ids
        tokens.append(token)
        seq.is_output.append(1)
        reason = seq.stop.check(token, len(tokens) - seq.num_prompt_tokens)
        if reason is not None:
            finished.append(self._finish(seq, reason))
        return reason is None

    def _register_full_blocks(self, seq: Sequence) -> None:
        num_full = seq.num_computed_tokens // self.block_size
        if num_full > len(seq.block_keys):
            new_keys = block_keys(seq.token_ids, self.block_size, self.weight_version,
                                  len(seq.block_keys), seq.block_keys, num_full * self.block_size)
            for i, key in enumerate(new_keys, start=len(seq.block_keys)):
                self.pool.register(seq.block_ids[i], key)
                self._untrack_inflight(seq, key)
            seq.block_keys.extend(new_keys)

    def _fork(self, leader: Sequence, sampled: dict[int, int], finished: list[FinishedSequence]) -> None:
        """The leader's prompt is computed and its siblings' first tokens were sampled with its own (``sampled``):
        start them on its full prompt blocks, each with its own copy of a partial last block. The recompute
        baseline instead recomputes the last prompt token's block per sibling (as vLLM does)."""
        bs, num_prompt = self.block_size, leader.num_prompt_tokens
        shared = self._fork_shared_blocks(num_prompt)
        computed = shared * bs if self._recompute else num_prompt
        per_seq = self.blocks_needed(num_prompt, leader.stop.max_tokens)
        for fork in self._requests[leader.request_id][1:]:
            self.pool.take(leader.block_ids[:shared])
            fork.block_ids = leader.block_ids[:shared]
            fork.block_keys = leader.block_keys[:shared]
            fork.num_computed_tokens = fork.num_cached_tokens = computed
            fork.kv = KVLocation.DEVICE
            if not self._recompute:
                fork.num_reserved_blocks = per_seq - shared
                leader.num_reserved_blocks -= per_seq - shared
                assert leader.num_reserved_blocks >= 0
            self.stats.cached_prompt_tokens += fork.num_cached_tokens
            fork.status = SequenceStatus.RUNNING
            self.running[fork.seq_id] = fork
            if self._recompute:
                continue
            if self._append_sampled(fork, sampled[fork.seq_id], finished) and computed % bs:
                # the partial last prompt block: the fork appends its own tokens to a copy of it
                self._allocate(fork, [])                     # from its reservation: cannot fail
                self._block_copies.append((leader.block_ids[shared], fork.block_ids[-1]))
        leader.pending_forks = 0

    def _finish(self, seq: Sequence, reason: FinishReason, closing: bool = False) -> FinishedSequence:
        self._epoch += 1
        self._untrack_inflight(seq)
        if seq.status is SequenceStatus.RUNNING:
            del self.running[seq.seq_id]
            self.pool.unreserve(seq.num_reserved_blocks)
            seq.num_reserved_blocks = 0
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        # An aborted leader's unforked siblings held nothing (their reservation was the leader's).
        seq.pending_forks = 0
        seq.finish_reason = reason
        result = FinishedSequence(
            seq_id=seq.seq_id, request_id=seq.request_id, sample_index=seq.sample_index,
            prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens], output_token_ids=seq.output_token_ids,
            finish_reason=reason.value, num_cached_tokens=seq.num_cached_tokens,
            num_prefill_tokens=seq.num_prefill_tokens, queue_wait_s=seq.queue_wait_s, session_id=seq.session_id)
        seqs = self._requests[seq.request_id]
        if seq.session_id is not None:
            self.stats.finished_turns += 1
            if seq.kv is KVLocation.DEVICE:
                # A block taken for a decode scheduled ahead (schedule_decode_ahead) past the turn's last
                # computed token holds nothing yet: give it back, so a parked session holds exactly its KV.
                keep = cdiv(seq.num_computed_tokens, self.block_size)
                if len(seq.block_ids) > keep:
                    self.pool.release(seq.block_ids[keep:][::-1])
                    del seq.block_ids[keep:]
            seq.status = SequenceStatus.AWAITING_INPUT
            seq.last_active = self.clock()
            self.kv.park(seq)
            if closing:
                self._release_session(seq)
            elif not self.config.retain_sessions:
                self.kv.drop(seq, count=False)     # baseline: re-prefill the history next turn
        else:
            if seq.kv is KVLocation.DEVICE:
                self.pool.release(seq.block_ids[::-1])
            seq.block_ids = []
            seq.kv = KVLocation.NONE
            seq.status = SequenceStatus.FINISHED
        if all(s.status not in (SequenceStatus.WAITING, SequenceStatus.RUNNING) for s in seqs):
            del self._requests[seq.request_id]
            if reason is FinishReason.ABORT:
                self.stats.aborted_requests += 1
            else:
                self.stats.finished_requests += 1
        return result

    # ------------------------------------------------------------------ invariants
    def check_integrity(self) -> None:
        held: dict[int, int] = {}
        host_held: set[int] = set()
        reserved = 0
        seqs = list(self.running.values()) + list(self.kv.parked.values()) + [
            s for s in self.waiting if s.session_id is None]
        assert len({s.seq_id for s in seqs}) == len(seqs), "a sequence is both running and parked/waiting"
        for seq in seqs:
            if seq.kv is KVLocation.DEVICE:
                for b in seq.block_ids:
                    held[b] = held.get(b, 0) + 1
                assert len(seq.block_ids) >= cdiv(seq.num_computed_tokens, self.block_size)
            elif seq.kv is KVLocation.HOST:
                assert not seq.block_ids and len(seq.host_block_ids) == cdiv(seq.num_computed_tokens, self.block_size)
                host_held.update(seq.host_block_ids)
            else:
                assert not seq.block_ids and not seq.host_block_ids and seq.num_computed_tokens == 0
            assert seq.num_computed_tokens <= seq.num_tokens
            reserved += seq.num_reserved_blocks
            if seq.status is SequenceStatus.RUNNING:
                assert seq.kv is KVLocation.DEVICE and seq.seq_id not in self.kv.parked
            else:
                assert seq.num_reserved_blocks == 0
        for seq in self.waiting:
            assert seq.status is SequenceStatus.WAITING
            assert seq.session_id is not None or seq.kv is KVLocation.NONE
        for seq in self.kv.parked.values():
            assert seq.session_id is not None and seq.status in (SequenceStatus.AWAITING_INPUT, SequenceStatus.WAITING)
        assert reserved == self.pool.num_reserved, f"reservations {reserved} != pool {self.pool.num_reserved}"
        inflight: dict = {}
        for seq in self.running.values():
            for key in seq.inflight_keys:
                inflight[key] = inflight.get(key, 0) + 1
        assert inflight == self._inflight, "in-flight prefix keys out of sync"
        self.pool.check_integrity(held)
        self.kv.host.check_integrity(host_held)
