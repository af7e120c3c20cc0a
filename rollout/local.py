"""``LocalBackend``: the ``RolloutBackend`` over one ``EngineLoop`` in this process (no Ray).

Used by the ZeroMQ front end in single-process mode and by tests. Every method awaits the loop's future
(``asyncio.wrap_future``), so the asyncio thread never blocks on the engine.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Optional

from engine.config import EngineConfig
from engine.sampling import SamplingParams
from rollout.backend import ErrorCode, RolloutError
from rollout.engine_loop import EngineLoop
from rollout.loop_streams import SampleDelta, iterate_deltas
from rollout.trajectory import Trajectory


class LocalBackend:
    def __init__(self, engine_config: EngineConfig, *, env_threads: int = 4) -> None:
        self.loop = EngineLoop(engine_config, env_threads=env_threads)

    @staticmethod
    async def _await(fut) -> Any:
        return await asyncio.wrap_future(fut)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, *,
                       request_id: Optional[str] = None) -> list[Trajectory]:
        return await self._await(self.loop.generate(prompt_ids, params, request_id))

    async def generate_stream(self, prompt_ids: list[int], params: SamplingParams, *,
                              request_id: str | None = None) -> AsyncIterator[SampleDelta]:
        """``generate``'s samples as they are generated: ``SampleDelta`` objects, each sample's ending with
        ``final`` set; raises ``RolloutError`` as ``generate`` does. Closing the iterator early (a client gone)
        cancels the request: the engine aborts it and frees its KV."""
        async for delta in iterate_deltas(
                lambda on_delta: self.loop.generate(prompt_ids, params, request_id, on_delta=on_delta), params.n):
            yield delta

    async def open_session(self, session_id: Optional[str] = None, ttl_s: Optional[float] = None) -> str:
        return await self._await(self.loop.open_session(session_id, ttl_s))

    async def step_session(self, session_id: str, new_token_ids: list[int], params: SamplingParams, *,
                           request_id: Optional[str] = None) -> Trajectory:
        return await self._await(self.loop.step_session(session_id, new_token_ids, params, request_id))

    async def step_session_stream(self, session_id: str, new_token_ids: list[int], params: SamplingParams, *,
                                  request_id: str | None = None) -> AsyncIterator[SampleDelta]:
        """``step_session``'s turn as it is generated (one sample; its final delta's ``final`` is the turn);
        closing early aborts the turn (the session keeps what was generated so far, as after an abort)."""
        async for delta in iterate_deltas(
                lambda on_delta: self.loop.step_session(session_id, new_token_ids, params, request_id,
                                                        on_delta=on_delta), 1):
            yield delta

    async def close_session(self, session_id: str) -> Trajectory:
        return await self._await(self.loop.close_session(session_id))

    async def run_episode(self, env: str, env_kwargs: dict[str, Any], params: SamplingParams,
                          max_turns: int) -> Trajectory:
        return await self._await(self.loop.run_episode(env, env_kwargs, params, max_turns))

    async def abort(self, request_id: str) -> bool:
        return await self._await(self.loop.abort(request_id))

    async def update_weights(self, loader: str, loader_kwargs: dict[str, Any], version: Optional[int] = None,
                             mode: str = "keep", kv: str = "keep") -> dict[str, Any]:
        if not isinstance(loader_kwargs, dict):
            raise RolloutError(ErrorCode.BAD_REQUEST, "loader_kwargs must be a dict")

        def make_loader():
            from weight_sync import get_loader
            return get_loader(loader, **loader_kwargs)
        return await self._await(self.loop.update_weights(make_loader, version, mode, kv))

    async def stats(self) -> dict[str, Any]:
        s = await self._await(self.loop.stats())
        return {"workers": [dict(s, worker=0)], "total": s}

    async def health(self) -> dict[str, Any]:
        if not self.loop.alive:
            return {"ok": False, "workers": [{"worker": 0, "alive": False}], "version": -1}
        s = await self._await(self.loop.stats())
        ok = not s["weights_inconsistent"]
        return {"ok": ok, "workers": [{"worker": 0, "alive": True, "version": s["weight_version"]}],
                "version": s["weight_version"]}

    async def shutdown(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.loop.shutdown)
