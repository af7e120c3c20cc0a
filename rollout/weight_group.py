"""The pool's weight-sync group: a process group of its own spanning the trainer (rank 0) and every worker
(ranks 1..N), NCCL when the workers run on CUDA, gloo on CPU, built on its own store so that nobody's default
``torch.distributed`` group is created or touched. A ``DistributedSender`` on the trainer broadcasts an update
in buckets; every worker applies it with the pool's one version barrier (``rollout.pool_weights``).

Life of one group (generation g; the pool holds at most one)::

    driver:  spec = await pool.init_weight_sync_group()     every live worker starts joining as rank 1 + its
                                                             position; returns at once with a WeightSyncGroupSpec
    trainer: group = spec.join(TRAINER_RANK, device)         blocks until every rank is in (<= spec.timeout_s)
    each update, concurrently:
    driver:  await pool.update_weights_from_distributed(v)  every worker receives and applies (or drops) it
    trainer: DistributedSender(group).send(params, version=v)

Rule: every ``update_weights_from_distributed`` call consumes exactly one ``send``: applied, or received and
dropped when the pool refuses it (a bad version, mode or kv), so the trainer never blocks on a refused update.

A group becomes *invalid* and must be formed again (``init_weight_sync_group``: a new generation, a new port)
when a member dies or is restarted (a new actor cannot join a group whose rendezvous is over), when a member
could not join, or when a group update fails on some member (the pool cannot cheaply tell whether every
member is still in step). The pool then tells the remaining members to leave: each destroys its process
group, which closes its connections, so a trainer still sending on it fails at once ("connection closed")
instead of waiting out the timeout; ``update_weights_from_distributed`` raises UPDATE_FAILED with the reason.

A broadcast cannot be replayed, so a worker restarted after a group update stays out of routing (awaiting
weights) until the next update lands on it: form a new group (it joins) or push a replayable update.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional

from rollout.backend import ErrorCode, RolloutError
from weight_sync.distributed import TRAINER_RANK, DistributedLoader, WeightSyncGroup, WeightSyncGroupSpec

if TYPE_CHECKING:   # NOTE: not at run time: pool_slots imports worker, which imports this module's worker side
    from rollout.pool_slots import Incarnation, Slot

logger = logging.getLogger(__name__)

DEFAULT_GROUP_TIMEOUT_S = 300.0   # the rendezvous and every collective of a pool's group wait at most this long
LEAVE_TIMEOUT_S = 30.0

CallWorker = Callable[..., Awaitable[Any]]   # the pool's _call(slot, method, *args)


# ====================================================================== pool side
@dataclass(eq=False)
class Member:
    slot: Slot
    actor: Incarnation        # the actor that joined: a restart puts another in the slot, which is not a member
    rank: int
    join: asyncio.Future      # its join_weight_group call


@dataclass(eq=False)
class FormedGroup:
    generation: int
    spec: WeightSyncGroupSpec
    members: list[Member]
    invalid: Optional[str] = None

    @property
    def slots(self) -> list[Slot]:
        return [m.slot for m in self.members]


def free_port() -> int:
    """A port free on this machine now (NOTE: another process may take it before the trainer binds it)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class WeightGroups:
    """Owned by the pool's event loop; ``form`` and ``ready`` run under the pool's weight lock."""

    def __init__(self, name: str, call: CallWorker, default_backend: str) -> None:
        self._name = name
        self._call = call
        self._default_backend = default_backend
        self._generation = 0
        self.current: Optional[FormedGroup] = None

    def form(self, slots: list[Slot], host: Optional[str], port: Optional[int], backend: Optional[str],
             timeout_s: float) -> WeightSyncGroupSpec:
        """Start a new generation with every slot in ``slots`` (the pool's non-failed ones) and return its spec;
        the members' joins run on until the trainer joins too (or ``timeout_s``)."""
        restarting = [s.index for s in slots if not s.live]
        if restarting:
            raise RolloutError(ErrorCode.UNAVAILABLE, f"workers {restarting} are restarting; form the group once "
                                                      f"health() shows them up")
        if not slots:
            raise RolloutError(ErrorCode.UNAVAILABLE, "the pool has no live worker to form a group with")
        backend = self._default_backend if backend is None else backend
        if backend == "nccl" and self._default_backend != "nccl":
            raise RolloutError(ErrorCode.BAD_REQUEST, "backend 'nccl' needs workers on CUDA; these run on the CPU")
        if host is None:
            import ray
            host = ray.util.get_node_ip_address()
        try:
            spec = WeightSyncGroupSpec(host, free_port() if port is None else port, 1 + len(slots), backend,
                                       timeout_s, f"{self._name}/g{self._generation + 1}")
        except (TypeError, ValueError) as e:
            raise RolloutError(ErrorCode.BAD_REQUEST, f"init_weight_sync_group: {e}") from None
        self.invalidate(f"replaced by generation {self._generation + 1}")
        self._generation += 1
        members = [Member(s, s.actor, TRAINER_RANK + 1 + k,
                          asyncio.ensure_future(self._call(s, "join_weight_group", spec, TRAINER_RANK + 1 + k,
                                                           self._generation)))
                   for k, s in enumerate(slots)]
        for m in members:
            m.join.add_done_callback(lambda f: f.cancelled() or f.exception())   # retrieved: no "never retrieved"
        self.current = FormedGroup(self._generation, spec, members)
        logger.info("weight-sync group generation %d: %s:%d, %d ranks, %s", self._generation, spec.host, spec.port,
                    spec.world_size, backend)
        return spec

    async def ready(self) -> FormedGroup:
        """The current group once every member has joined; UPDATE_FAILED (the weights did not change) if there
        is none, it is invalid, or a member could not join (the group is invalid from then on)."""
        group = self.current
        if group is None:
            raise RolloutError(ErrorCode.UPDATE_FAILED, "no weight-sync group: call init_weight_sync_group first")
        if group.invalid is None:
            await asyncio.wait([m.join for m in group.members])   # each bounded by the group's timeout
            for m in group.members:
                if group.invalid is None and (m.join.cancelled() or m.join.exception() is not None):
                    cause = "cancelled" if m.join.cancelled() else getattr(m.join.exception(), "message",
                                                                            str(m.join.exception()))
                    self.invalidate(f"worker {m.slot.index} could not join: {cause}")
        if group.invalid is not None:
            raise RolloutError(ErrorCode.UPDATE_FAILED,
                               f"weight-sync group generation {group.generation} is invalid ({group.invalid}); "
                               f"form a new one with init_weight_sync_group")
        return group

    def member_lost(self, slot: Slot, actor: Incarnation) -> list[asyncio.Future]:
        """``actor`` (in ``slot``) died: a group it is in cannot be used again. -> the members' leave calls."""
        group = self.current
        if group is not None and any(m.actor is actor for m in group.members):
            return self.invalidate(f"worker {slot.index} died")
        return []

    def invalidate(self, reason: str, *, tell_members: bool = True) -> list[asyncio.Future]:
        """Mark the current group invalid (first reason kept) and have its live members leave it."""
        group = self.current
        if group is None or group.invalid is not None:
            return []
        group.invalid = reason
        logger.warning("weight-sync group generation %d is invalid: %s", group.generation, reason)
        if not tell_members:
            return []
        return [asyncio.ensure_future(self._leave(m, group.generation)) for m in group.members
                if m.slot.actor is m.actor and m.slot.live]

    async def drain(self, group: FormedGroup) -> None:
        """Receive and drop one update on every member (the pool refused it); the group stays in step, unless a
        member fails to, which invalidates it."""
        results = await asyncio.gather(*(self._call(m.slot, "drain_weight_group", group.generation)
                                         for m in group.members), return_exceptions=True)
        bad = [(m.slot.index, r) for m, r in zip(group.members, results) if isinstance(r, BaseException)]
        if bad:
            self.invalidate("dropping a refused update failed on " +
                            "; ".join(f"worker {i}: {getattr(r, 'message', r)}" for i, r in bad))

    async def _leave(self, m: Member, generation: int) -> None:
        try:
            await asyncio.wait_for(self._call(m.slot, "leave_weight_group", generation), LEAVE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - best effort: a dead member has left already
            pass

    def status(self) -> Optional[dict[str, Any]]:
        g = self.current
        if g is None:
            return None
        return {"generation": g.generation, "host": g.spec.host, "port": g.spec.port, "world_size": g.spec.world_size,
                "backend": g.spec.backend, "valid": g.invalid is None, "invalid_reason": g.invalid,
                "workers": [m.slot.index for m in g.members]}


# ====================================================================== worker side
class GroupMembership:
    """A worker's side: in at most one group (by generation). Joining and draining run on a thread of the
    actor, never on the engine thread; updates hand the loader to the engine thread once the trainer's header
    is in, so the engine keeps stepping while the trainer has not started sending."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.generation: Optional[int] = None    # the generation this worker belongs to (or is joining)
        self.group: Optional[WeightSyncGroup] = None

    async def join(self, spec: WeightSyncGroupSpec, rank: int, generation: int) -> None:
        self.leave(self.generation)              # one group at a time
        self.generation = generation
        try:
            group = await asyncio.get_running_loop().run_in_executor(None, spec.join, rank, self.device)
        except Exception as e:  # noqa: BLE001
            if self.generation == generation:
                self.generation = None
            raise RuntimeError(f"could not join the weight-sync group at {spec.host}:{spec.port} as rank {rank} "
                               f"of {spec.world_size} within {spec.timeout_s} s (did the trainer join with "
                               f"spec.join({TRAINER_RANK})?): {type(e).__name__}: {e}") from None
        if self.generation != generation:        # told to leave while joining
            group.close()
            raise RuntimeError(f"left weight-sync group generation {generation} while joining it")
        self.group = group

    def leave(self, generation: Optional[int]) -> None:
        if generation is None or generation != self.generation:
            return
        if self.group is not None:
            self.group.close()                   # closes its connections: peers still using it fail at once
        self.group, self.generation = None, None

    def loader(self, generation: int, version: Optional[int] = None) -> DistributedLoader:
        if self.group is None or self.generation != generation:
            raise RuntimeError(f"this worker is not in weight-sync group generation {generation} "
                               f"(it is in {self.generation})")
        return DistributedLoader(self.group, src=TRAINER_RANK, version=version)

    def settle(self, loader: DistributedLoader, generation: int) -> None:
        """After a use: a group that broke is left (it cannot be used again)."""
        if loader.group.broken is not None:
            self.leave(generation)
