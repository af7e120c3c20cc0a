"""``RolloutPool``'s introspection: per-worker and summed stats, weight digests, health (mixed into the pool; runs on
its loop like the rest of its state)."""
from __future__ import annotations

import asyncio
from typing import Any

from rollout.backend import RolloutError
from rollout.pool_slots import Slot


class PoolStatusAPI:
    """Uses the pool's ``_hop``, ``_slots``, ``_call``, ``_weights``, ``_workers``, ``_affinity``, ``_groups``,
    ``_on_every_worker`` and ``_closing``."""

    async def stats(self) -> dict[str, Any]:
        return await self._hop(self._stats())

    async def _stats(self) -> dict[str, Any]:
        async def one(slot: Slot) -> dict[str, Any]:
            base = {"worker": slot.index, "restarts": slot.restarts, "inflight": slot.actor.inflight,
                    "open_sessions": slot.open_sessions, "sessions_opened": slot.sessions_opened,
                    "turns_routed": slot.turns_routed, "failed": slot.failed, "alive": slot.ready.is_set(),
                    "awaiting_weights": slot.awaiting_weights}
            if slot.live:
                try:
                    base.update(await asyncio.wait_for(self._call(slot, "stats"), 30.0))
                except (RolloutError, asyncio.TimeoutError) as e:
                    base["error"] = str(e)
            return base
        workers = list(await asyncio.gather(*(one(s) for s in self._slots)))
        total: dict[str, Any] = {}
        for w in workers:
            for k, v in w.items():
                if k != "worker" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    total[k] = total.get(k, 0) + v
        return {"workers": workers, "total": total, "version": self._weights.version,
                "inconsistent": self._weights.inconsistent, "worker_deaths": self._workers.deaths,
                "sessions": len(self._affinity), "weight_sync_group": self._groups.status()}

    async def weights_digests(self) -> list[dict[str, Any]]:
        """Every live worker's parameter digest and version: equal digests = bit-identical weights."""
        return await self._hop(self._on_every_worker("weights_digest"))

    async def health(self) -> dict[str, Any]:
        return await self._hop(self._health())

    async def _health(self) -> dict[str, Any]:
        async def one(slot: Slot) -> dict[str, Any]:
            # alive: serving (routing picks it); a worker awaiting weights answers but is not alive in that sense
            info = {"worker": slot.index, "alive": False, "restarts": slot.restarts,
                    "awaiting_weights": slot.awaiting_weights, "failed": slot.failed}
            if slot.live:
                try:
                    info.update(await asyncio.wait_for(self._call(slot, "ready"), 10.0), alive=slot.ready.is_set())
                except (RolloutError, asyncio.TimeoutError):
                    pass
            return info
        workers = list(await asyncio.gather(*(one(s) for s in self._slots)))
        ok = not self._closing and not self._weights.inconsistent and all(w["alive"] for w in workers)
        return {"ok": ok, "workers": workers, "version": self._weights.version}
