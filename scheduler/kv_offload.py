"""What happens to KV that is not running: parked sessions' blocks, the host pool, and the copies.

Parked sessions (AWAITING_INPUT, or with a turn queued but not admitted) keep their KV on the device,
as *idle* references (``BlockPool.park``): admission counts the blocks only they hold as reclaimable.
Nothing moves at admission. When an allocation finds no unheld block (``reclaim``), the least recently
active idle sessions' blocks are copied to the host pool and released — sessions between turns first,
then those with a turn queued; they come back (prefix-cache hits first, copies for the rest) when their
next turn is admitted. Only when the host pool has no room is KV dropped: first the LRU host-resident
sessions', then, if the host pool is simply too small, the victim's own. A dropped session re-prefills
on its next turn. Running turns are never touched (swap mode alone moves a running sequence, through
``offload`` with ``running=True``).

Copy ordering contract with the engine, per ``SchedulerOutput``: every device block a ``swap_out`` reads
and every host block a ``swap_in`` reads is read before any block of that output is written (so a block
freed by an offload may be reused by a restore, a fork's copy or the forward of the same output, and a
host block freed by a restore may receive an offload at once). A restore's device blocks are written
asynchronously: the sequence is not scheduled (``kv_ready`` False) until the engine reports the copy
landed (``landed``); if it ends before that, its blocks stay held until then, so nothing reuses a block
a copy may still write.

This class owns the parked set, the host pool, host block tables and the copy lists; the KV manager owns
device block tables and the reservation ledger.
"""
from __future__ import annotations

from collections import OrderedDict

from scheduler.host_pool import HostBlockPool
from scheduler.kv_manager import KVManager
from scheduler.request import KVLocation, Sequence, SequenceStatus


class OffloadManager:
    def __init__(self, kv: KVManager, host: HostBlockPool, stats) -> None:
        self.kv = kv
        self.pool = kv.pool
        self.host = host
        self.stats = stats
        # Sessions not running (AWAITING_INPUT, or a turn queued), least recently active first, wherever their KV is.
        self.parked: OrderedDict[int, Sequence] = OrderedDict()
        self.swap_out: list[tuple[int, int]] = []   # (device block, host block), for the next output
        self.swap_in: list[tuple[int, int]] = []    # (host block, device block), for the next output
        self.restores: list[int] = []               # seq ids whose swap_in is in the lists above
        self.leaving: set[int] = set()              # seq ids whose swap_out is in the lists above
        self._landing: dict[int, Sequence] = {}     # seq id -> sequence whose restore has not landed yet
        self._held_until_landed: dict[int, list[int]] = {}   # seq id -> device blocks of an ended restore
        kv.reclaim = self.reclaim

    def take_copies(self) -> tuple[list, list, list]:
        """The copies for the output being built (and reset)."""
        out = self.swap_out, self.swap_in, self.restores
        self.swap_out, self.swap_in, self.restores = [], [], []
        self.leaving = set()
        return out

    # ---------------------------------------------------------------- parked set
    def park(self, seq: Sequence) -> None:
        """A session stops running (its turn ended, or it opened): it becomes the most recently active.
        Its device references turn idle (reclaimable) once any restore of them has landed."""
        assert seq.status is not SequenceStatus.RUNNING and seq.seq_id not in self.parked
        self.parked[seq.seq_id] = seq
        if self._holds_idle(seq):
            self.pool.park(seq.block_ids)

    def unpark(self, seq: Sequence) -> None:
        if seq.seq_id in self.parked:
            if self._holds_idle(seq):
                self.pool.unpark(seq.block_ids)
            del self.parked[seq.seq_id]

    def _holds_idle(self, seq: Sequence) -> bool:
        return seq.seq_id in self.parked and seq.kv is KVLocation.DEVICE and seq.kv_ready

    # ---------------------------------------------------------------- moves
    def release_device(self, seq: Sequence) -> None:
        """Give back every device block of ``seq`` (tail first). Blocks a restore's copy may still write are
        held until it lands, so nothing reuses them before."""
        if not seq.kv_ready:
            self._held_until_landed[seq.seq_id] = seq.block_ids
            del self._landing[seq.seq_id]
            seq.kv_ready = True
        else:
            self.pool.release(seq.block_ids[::-1], idle=self._holds_idle(seq))
        seq.block_ids = []

    def drop(self, seq: Sequence, count: bool = True) -> None:
        """Forget a sequence's KV wherever it is (it re-prefills later). ``count``: a drop forced by
        memory pressure (closing a session or the no-retention baseline are not)."""
        if seq.kv is KVLocation.DEVICE:
            self.release_device(seq)
        elif seq.kv is KVLocation.HOST:
            self.host.release(seq.host_block_ids)
        if count and seq.num_computed_tokens:
            self.stats.dropped_sessions += 1
            self.stats.dropped_tokens += seq.num_computed_tokens
        seq.block_ids, seq.host_block_ids, seq.block_keys = [], [], []
        seq.num_computed_tokens = 0
        seq.kv = KVLocation.NONE
        seq.kv_ready = True

    def offload(self, seq: Sequence, running: bool = False) -> bool:
        """Copy a sequence's device blocks to the host and release them; False (and nothing changed)
        when the host pool cannot take them even after dropping LRU host-resident idle KV. ``running``:
        swap mode moving a running sequence (its references are active, not idle)."""
        assert seq.kv is KVLocation.DEVICE and seq.kv_ready
        assert running or (seq.status is not SequenceStatus.RUNNING and seq.seq_id in self.parked)
        if running:
            self.kv.trim(seq)   # a block taken for a token not computed yet holds nothing to copy
        n = len(seq.block_ids)
        if n > self.host.num_blocks:
            return False
        for other in list(self.parked.values()):
            if self.host.num_free >= n:
                break
            # not one whose host copy this very output writes (its blocks would get two writers)
            if other is not seq and other.kv is KVLocation.HOST and other.seq_id not in self.leaving:
                self.drop(other)
        if self.host.num_free < n:
            return False
        seq.host_block_ids = self.host.allocate(n)
        self.swap_out.extend(zip(seq.block_ids, seq.host_block_ids))
        self.leaving.add(seq.seq_id)
        self.release_device(seq)
        seq.kv = KVLocation.HOST
        self.stats.offloaded_blocks += n
        self.stats.offloaded_sessions += not running
        return True

    def restore(self, seq: Sequence) -> None:
        """Bring a host-resident sequence back, once admitted (unparked, hits taken by the caller into
        ``seq.block_ids``): fresh blocks from its reservation receive host copies for the rest. It runs
        once the engine reports the copy landed."""
        assert seq.kv is KVLocation.HOST and seq.status is SequenceStatus.RUNNING
        assert seq.seq_id not in self.leaving, "a restore must not read host blocks its own offload writes now"
        num_hits = len(seq.block_ids)
        pending = seq.host_block_ids[num_hits:]
        # Host blocks are read before anything of the output is written (the contract above): free them first,
        # so an offload the allocations below trigger may reuse them.
        self.host.release(seq.host_block_ids)
        seq.host_block_ids = []
        seq.kv = KVLocation.DEVICE
        for host_block in pending:
            self.swap_in.append((host_block, self.kv.allocate(seq)))
        self.stats.restored_blocks += len(pending)
        self.stats.restored_sessions += seq.session_id is not None
        if pending:
            seq.kv_ready = False
            self._landing[seq.seq_id] = seq
            self.restores.append(seq.seq_id)

    def landed(self, seq_ids) -> bool:
        """The engine's copies for these restores are complete. -> whether a sequence became ready."""
        ready = False
        for seq_id in seq_ids:
            held = self._held_until_landed.pop(seq_id, None)
            if held is not None:      # it ended before its copy landed
                self.pool.release(held[::-1])
                continue
            seq = self._landing.pop(seq_id)
            seq.kv_ready = True
            if self._holds_idle(seq):   # its turn ended (aborted) while the copy was in flight
                self.pool.park(seq.block_ids)
            ready = True
        return ready

    @property
    def num_landing(self) -> int:
        return len(self._landing) + len(self._held_until_landed)

    # ---------------------------------------------------------------- pressure
    def reclaim(self, n: int) -> None:
        """Make ``n`` device blocks unheld by moving parked sessions' KV away: sessions between turns (least
        recently active first), then those with a turn queued. Reservations promise this always succeeds."""
        victims = [s for s in self.parked.values() if s.kv is KVLocation.DEVICE and s.kv_ready]
        victims.sort(key=lambda s: s.status is not SequenceStatus.AWAITING_INPUT)   # stable: LRU within each
        for seq in victims:
            if self.pool.num_unheld >= n:
                break
            if not any(map(self.pool.is_reclaimable, seq.block_ids)):
                continue
            if not self.offload(seq):
                self.drop(seq)
        assert self.pool.num_unheld >= n, f"reclaim({n}) left {self.pool.num_unheld} unheld blocks"

    # ---------------------------------------------------------------- invariants
    def held_blocks(self) -> list[int]:
        """Device blocks held for restores that ended before their copy landed."""
        return [b for blocks in self._held_until_landed.values() for b in blocks]
