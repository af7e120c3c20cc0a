"""FCFS continuous-batching scheduler with reservation admission and chunked prefill.

Every step, each admitted sequence's ``num_computed_tokens`` catches up with its token count under
a per-step token budget: running decodes first, then running prefill chunks, then new admissions
in arrival order. Prefill and decode are the same thing (a decode is a 1-token chunk).

No preemption, by construction: a sequence is admitted only when the pool can *reserve* every
block it may still need (``cdiv(prompt + max_tokens - 1, block_size)`` minus prefix-cache hits),
so an admitted sequence can always allocate its next block. A request that could never fit the
pool is rejected when it is added, so the queue head is always eventually admitted.

``n > 1`` samples: the request's leader is admitted with a reservation for all n sequences; when
its prompt has been computed, the n-1 siblings are forked off it. A fork shares the leader's full
prompt blocks (ref counts, no copy) and recomputes only the prompt's last partial block, so the
prompt's full blocks are computed once per request, with or without the global prefix cache.
"""
from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from scheduler.block_pool import BlockPool, block_keys
from scheduler.config import SchedulerConfig
from scheduler.output import FinishedSequence, ScheduledSequence, SchedulerOutput
from scheduler.request import FinishReason, Sequence, SequenceStatus, StopCondition


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class SchedulerStats:
    steps: int = 0                  # non-empty steps scheduled
    prefill_tokens: int = 0         # prompt tokens computed
    cached_prompt_tokens: int = 0   # prompt tokens served by the prefix cache or shared by a fork
    decode_tokens: int = 0          # generated tokens computed (fed back as inputs)
    preemptions: int = 0            # always 0: running sequences are never evicted
    finished_requests: int = 0
    aborted_requests: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_size = config.block_size
        self.pool = BlockPool(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}      # insertion (admission) ordered
        self._requests: dict[str, list[Sequence]] = {}
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self.weight_version = 0
        self.stats = SchedulerStats()

    # ------------------------------------------------------------------ requests
    def blocks_needed(self, num_prompt_tokens: int, max_tokens: int) -> int:
        """Blocks one sequence may hold: KV of prompt + every sampled token but the last."""
        return max(1, cdiv(num_prompt_tokens + max_tokens - 1, self.block_size))

    def add_request(self, request_id: str, prompt_token_ids: Seq[int], stop: StopCondition,
                    n: int = 1) -> list[int]:
        """Queue a request; return its sequence ids (one per sample). Raises ValueError, leaving
        the scheduler unchanged, when the request can never run."""
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise ValueError("prompt_token_ids must not be empty")
        if num_prompt >= self.config.max_model_len:
            raise ValueError(f"prompt_token_ids has {num_prompt} tokens; the model's context "
                             f"(max_model_len) is {self.config.max_model_len}, leaving no room to generate")
        if n > self.config.max_num_seqs:
            raise ValueError(f"n={n} exceeds max_num_seqs={self.config.max_num_seqs}")
        # Clamp so prompt + output never exceeds the context; the sequence then ends with "length".
        max_tokens = min(stop.max_tokens, self.config.max_model_len - num_prompt)
        if max_tokens != stop.max_tokens:
            stop = StopCondition(max_tokens, stop.stop_token_ids, stop.eos_token_ids, stop.ignore_eos)
        group_blocks = self._group_blocks(num_prompt, max_tokens, n, num_hits=0)
        if group_blocks > self.config.num_blocks:
            raise ValueError(f"request needs up to {group_blocks} KV blocks (prompt {num_prompt} + "
                             f"max_tokens {max_tokens}, n={n}) but the pool has {self.config.num_blocks}")
        arrival = next(self._arrivals)
        seqs = [Sequence(seq_id=next(self._seq_ids), request_id=request_id, sample_index=i,
                         token_ids=list(prompt_token_ids), num_prompt_tokens=num_prompt, stop=stop,
                         arrival=arrival, num_samples=n)
                for i in range(n)]
        leader = seqs[0]
        leader.pending_forks = n - 1
        self._requests[request_id] = seqs
        self.waiting.append(leader)
        return [s.seq_id for s in seqs]

    def abort(self, request_id: str) -> list[FinishedSequence]:
        """Finish every sequence of the request now (partial outputs kept). Unknown or already
        finished ids return []."""
        seqs = self._requests.get(request_id)
        if seqs is None:
            return []
        finished = []
        for seq in seqs:
            if seq.is_finished:
                continue
            if seq.status is SequenceStatus.WAITING and seq in self.waiting:
                self.waiting.remove(seq)
            finished.append(self._finish(seq, FinishReason.ABORT))
        return finished

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def has_request(self, request_id: str) -> bool:
        """True while any sample of the request is unfinished."""
        return request_id in self._requests

    def set_weight_version(self, version: int) -> None:
        """New weights: cached blocks of other versions are never reused."""
        self.weight_version = version
        self.pool.drop_cached(keep_version=version)

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        running = list(self.running.values())
        # Decodes first (1 token each), then continuing prefill chunks.
        for seq in itertools.chain((s for s in running if s.num_tokens - s.num_computed_tokens == 1),
                                   (s for s in running if s.num_tokens - s.num_computed_tokens > 1)):
            if budget == 0:
                break
            item = self._schedule_chunk(seq, budget)
            scheduled.append(item)
            budget -= item.num_tokens
        # Admissions, strictly in arrival order: a head that does not fit blocks those behind it,
        # so a large request is never starved by a stream of small ones.
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if len(self.running) + seq.num_samples > self.config.max_num_seqs:
                break
            if not self._try_admit(seq):
                break
            self.waiting.popleft()
            item = self._schedule_chunk(seq, budget)
            scheduled.append(item)
            budget -= item.num_tokens
        num_tokens = self.config.max_num_batched_tokens - budget
        if scheduled:
            self.stats.steps += 1
        return SchedulerOutput(scheduled=scheduled, num_batched_tokens=num_tokens)

    def _group_blocks(self, num_prompt: int, max_tokens: int, n: int, num_hits: int) -> int:
        per_seq = self.blocks_needed(num_prompt, max_tokens)
        shared = (num_prompt - 1) // self.block_size  # full prompt blocks a fork shares
        return (per_seq - num_hits) + (n - 1) * (per_seq - shared)

    def _prompt_keys(self, seq: Sequence) -> list:
        # Full blocks a new sequence may take from the cache; at least one prompt token is always
        # recomputed so the step yields logits to sample from.
        num_cacheable = (seq.num_prompt_tokens - 1) // self.block_size * self.block_size
        return block_keys(seq.token_ids[:num_cacheable], self.block_size, self.weight_version)

    def _try_admit(self, seq: Sequence) -> bool:
        keys = self._prompt_keys(seq) if self.pool.enable_prefix_caching else []
        hits = self.pool.match_prefix(keys)
        need = self._group_blocks(seq.num_prompt_tokens, seq.stop.max_tokens, seq.num_samples, len(hits))
        if need + self.pool.num_evictable_among(hits) > self.pool.num_available:
            return False
        self.pool.take(hits)
        self.pool.reserve(need)
        seq.block_ids = list(hits)
        seq.block_keys = keys[:len(hits)]
        seq.num_reserved_blocks = need
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        self.stats.cached_prompt_tokens += seq.num_cached_tokens
        seq.status = SequenceStatus.RUNNING
        self.running[seq.seq_id] = seq
        return True

    def _schedule_chunk(self, seq: Sequence, budget: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        num_new = min(seq.num_tokens - start, budget)
        assert num_new > 0, f"sequence {seq.seq_id} has nothing to compute"
        end = start + num_new
        while len(seq.block_ids) < cdiv(end, self.block_size):
            assert seq.num_reserved_blocks > 0, f"sequence {seq.seq_id} outgrew its reservation"
            seq.block_ids.append(self.pool.allocate_reserved())
            seq.num_reserved_blocks -= 1
        return ScheduledSequence(
            seq_id=seq.seq_id, request_id=seq.request_id, sample_index=seq.sample_index,
            token_ids=seq.token_ids[start:end], start_pos=start, block_ids=list(seq.block_ids),
            sample=end == seq.num_tokens, num_output_tokens=seq.num_output_tokens)

    # ------------------------------------------------------------------ results
    def update(self, output: SchedulerOutput, sampled: dict[int, int]) -> list[FinishedSequence]:
        """Advance computed counters, append sampled tokens, fork n>1 siblings, finish sequences.

        ``sampled`` maps seq_id -> token id for every scheduled item with ``sample=True`` (items
        of sequences aborted since ``schedule`` are ignored)."""
        finished: list[FinishedSequence] = []
        for item in output.scheduled:
            seq = self.running.get(item.seq_id)
            if seq is None:          # aborted between schedule() and update()
                continue
            assert seq.num_computed_tokens == item.start_pos, "update out of order with schedule"
            seq.num_computed_tokens += item.num_tokens
            prompt = seq.num_prompt_tokens
            num_prefill = max(0, min(item.seq_len, prompt) - item.start_pos)
            self.stats.prefill_tokens += num_prefill
            self.stats.decode_tokens += item.num_tokens - num_prefill
            if self.pool.enable_prefix_caching:
                self._register_full_blocks(seq)
            if not item.sample:
                continue
            token = sampled[item.seq_id]
            if seq.pending_forks:
                self._fork(seq)
            seq.token_ids.append(token)
            reason = seq.stop.check(token, seq.num_output_tokens)
            if reason is not None:
                finished.append(self._finish(seq, reason))
        return finished

    def _register_full_blocks(self, seq: Sequence) -> None:
        num_full = seq.num_computed_tokens // self.block_size
        if num_full > len(seq.block_keys):
            new_keys = block_keys(seq.token_ids[:num_full * self.block_size], self.block_size,
                                  self.weight_version, len(seq.block_keys), seq.block_keys)
            for i, key in enumerate(new_keys, start=len(seq.block_keys)):
                self.pool.register(seq.block_ids[i], key)
            seq.block_keys.extend(new_keys)

    def _fork(self, leader: Sequence) -> None:
        """The leader's prompt is computed: start its siblings on its full prompt blocks."""
        shared = (leader.num_prompt_tokens - 1) // self.block_size
        per_seq = self.blocks_needed(leader.num_prompt_tokens, leader.stop.max_tokens)
        for fork in self._requests[leader.request_id][1:]:
            self.pool.take(leader.block_ids[:shared])
            fork.block_ids = leader.block_ids[:shared]
            fork.block_keys = leader.block_keys[:shared]
            fork.num_computed_tokens = fork.num_cached_tokens = shared * self.block_size
            fork.num_reserved_blocks = per_seq - shared
            leader.num_reserved_blocks -= per_seq - shared
            assert leader.num_reserved_blocks >= 0
            self.stats.cached_prompt_tokens += fork.num_cached_tokens
            fork.status = SequenceStatus.RUNNING
            self.running[fork.seq_id] = fork
        leader.pending_forks = 0

    def _finish(self, seq: Sequence, reason: FinishReason) -> FinishedSequence:
        if seq.status is SequenceStatus.RUNNING:
            del self.running[seq.seq_id]
            self.pool.release(seq.block_ids[::-1])
            self.pool.unreserve(seq.num_reserved_blocks)
        seq.block_ids = []
        seq.num_reserved_blocks = 0
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        # A leader aborted before its prompt was done: its unforked siblings never held anything
        # (their share of the reservation was the leader's, released above); abort() finishes them.
        seq.pending_forks = 0
        seqs = self._requests[seq.request_id]
        if all(s.is_finished for s in seqs):
            del self._requests[seq.request_id]
            if reason is FinishReason.ABORT:
                self.stats.aborted_requests += 1
            else:
                self.stats.finished_requests += 1
        return FinishedSequence(
            seq_id=seq.seq_id, request_id=seq.request_id, sample_index=seq.sample_index,
            prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens],
            output_token_ids=seq.output_token_ids, finish_reason=reason.value,
            num_cached_tokens=seq.num_cached_tokens)

    # ------------------------------------------------------------------ invariants
    def check_integrity(self) -> None:
        held: dict[int, int] = {}
        reserved = 0
        for seq in self.running.values():
            assert seq.status is SequenceStatus.RUNNING
            for b in seq.block_ids:
                held[b] = held.get(b, 0) + 1
            reserved += seq.num_reserved_blocks
            assert len(seq.block_ids) >= cdiv(seq.num_computed_tokens, self.block_size)
            assert seq.num_computed_tokens <= seq.num_tokens
        for seq in self.waiting:
            assert seq.status is SequenceStatus.WAITING and not seq.block_ids
        assert reserved == self.pool.num_reserved, f"reservations {reserved} != pool {self.pool.num_reserved}"
        self.pool.check_integrity(held)
