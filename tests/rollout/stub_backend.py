"""A deterministic in-memory ``RolloutBackend`` for front-end tests and benchmarks (no engine).

Output token i of sample s of a prompt is ``fake_token(prompt, s, i)``; a session's turn continues from
the session's whole history. Special prompt tokens inject failures:
``FAIL_INTERNAL`` -> RuntimeError, ``FAIL_WORKER`` -> RolloutError(worker_died), ``FAIL_VALUE`` -> ValueError.
``gate``: while cleared, generate/step_session wait on it (to hold requests in flight).
"""
from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, Optional

from engine.sampling import SamplingParams
from rollout.backend import ErrorCode, RolloutError
from rollout.loop_streams import SampleDelta
from rollout.trajectory import Trajectory

FAIL_INTERNAL = 9_001
FAIL_WORKER = 9_002
FAIL_VALUE = 9_003


def fake_token(context: list[int], sample_index: int, i: int) -> int:
    return (sum(context) * 31 + len(context) * 17 + sample_index * 7 + i) % 997


def fake_tokens(context: list[int], sample_index: int, max_tokens: int) -> list[int]:
    return [fake_token(context, sample_index, i) for i in range(max_tokens)]


class StubBackend:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.version = 0
        self.calls: Counter[str] = Counter()
        self.cancelled = 0                          # backend calls that saw CancelledError
        self.sessions: dict[str, Trajectory] = {}
        self.gate: Optional[asyncio.Event] = None   # created lazily on the server's loop
        self._running: set[str] = set()
        self._ids = itertools.count()
        self.shut_down = False

    def hold(self) -> None:
        """Make generate/step_session wait until ``release()`` (call on the server's loop)."""
        self.gate = asyncio.Event()

    def release(self) -> None:
        if self.gate is not None:
            self.gate.set()

    async def _work(self, request_id: str, context: list[int]) -> None:
        for bad, exc in ((FAIL_INTERNAL, RuntimeError("stub exploded")),
                         (FAIL_WORKER, RolloutError(ErrorCode.WORKER_DIED, "stub worker died")),
                         (FAIL_VALUE, ValueError(f"prompt_ids contains {FAIL_VALUE}, outside the vocabulary"))):
            if bad in context:
                raise exc
        self._running.add(request_id)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self._running.discard(request_id)

    def _sample(self, context: list[int], params: SamplingParams, sample_index: int, request_id: str,
                prompt: list[int]) -> Trajectory:
        tokens = fake_tokens(context, sample_index, params.max_tokens)
        t = Trajectory(prompt_ids=list(prompt), request_id=request_id, sample_index=sample_index, turns=1,
                       finish_reason="length", metrics={"stub": True})
        t.add_model_tokens(tokens, [-0.5] * len(tokens), [self.version] * len(tokens))
        return t

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> list[Trajectory]:
        self.calls["generate"] += 1
        request_id = f"stub-{next(self._ids)}"
        await self._work(request_id, prompt_ids)
        return [self._sample(prompt_ids, params, s, request_id, prompt_ids) for s in range(params.n)]

    async def generate_stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[SampleDelta]:
        """``generate``'s samples, one token per delta (for tests of the HTTP streaming layer: a stub has no
        steps; ``LocalBackend.generate_stream`` is the real incremental path)."""
        for t in await self.generate(prompt_ids, params):
            for k in range(max(1, len(t.token_ids))):
                last = k >= len(t.token_ids) - 1
                yield SampleDelta(t.sample_index, t.token_ids[k:k + 1], t.logprobs[k:k + 1], t.versions[k:k + 1],
                                  None, final=t if last else None)

    async def open_session(self, session_id: Optional[str] = None, ttl_s: Optional[float] = None) -> str:
        self.calls["open_session"] += 1
        session_id = session_id or f"stub-session-{next(self._ids)}"
        if session_id in self.sessions:
            raise RolloutError(ErrorCode.BAD_REQUEST, f"session {session_id!r} already exists")
        self.sessions[session_id] = Trajectory(prompt_ids=[], session_id=session_id)
        return session_id

    def _session(self, session_id: str) -> Trajectory:
        if session_id not in self.sessions:
            raise RolloutError(ErrorCode.UNKNOWN_SESSION, f"no session {session_id!r}")
        return self.sessions[session_id]

    async def step_session(self, session_id: str, new_token_ids: list[int], params: SamplingParams) -> Trajectory:
        self.calls["step_session"] += 1
        whole = self._session(session_id)
        if params.n != 1:
            raise RolloutError(ErrorCode.BAD_REQUEST, "params.n must be 1 for a session turn")
        request_id = f"stub-turn-{next(self._ids)}"
        if whole.turns == 0:
            whole.prompt_ids = list(new_token_ids)
        else:
            whole.add_env_tokens(list(new_token_ids))
        context = whole.prompt_ids + whole.token_ids
        await self._work(request_id, context)
        turn = self._sample(context, params, 0, request_id, new_token_ids)
        turn.session_id = session_id
        whole.add_model_tokens(turn.token_ids, turn.logprobs, turn.versions)
        whole.turns += 1
        whole.finish_reason = turn.finish_reason
        return turn

    async def step_session_stream(self, session_id: str, new_token_ids: list[int],
                                  params: SamplingParams) -> AsyncIterator[SampleDelta]:
        """``step_session``'s turn, one token per delta (as ``generate_stream``)."""
        t = await self.step_session(session_id, new_token_ids, params)
        for k in range(max(1, len(t.token_ids))):
            last = k >= len(t.token_ids) - 1
            yield SampleDelta(0, t.token_ids[k:k + 1], t.logprobs[k:k + 1], t.versions[k:k + 1], None,
                              final=t if last else None)

    async def close_session(self, session_id: str) -> Trajectory:
        self.calls["close_session"] += 1
        self._session(session_id)
        return self.sessions.pop(session_id)

    async def run_episode(self, env: str, env_kwargs: dict[str, Any], params: SamplingParams,
                          max_turns: int) -> Trajectory:
        """Env "echo": prompt = env_kwargs["prompt"]; each observation is the model's turn reversed;
        reward 1 per turn."""
        self.calls["run_episode"] += 1
        if env != "echo":
            raise RolloutError(ErrorCode.BAD_REQUEST, f"unknown environment {env!r}; registered: ['echo']")
        prompt = list(env_kwargs.get("prompt", [1, 2, 3]))
        t = Trajectory(prompt_ids=prompt, reward=0.0)
        for turn in range(max_turns):
            if turn:
                t.add_env_tokens(t.token_ids[-params.max_tokens:][::-1])
            tokens = fake_tokens(prompt + t.token_ids, 0, params.max_tokens)
            t.add_model_tokens(tokens, [-0.5] * len(tokens), [self.version] * len(tokens))
            t.turns += 1
            t.reward += 1.0
        t.finish_reason = "length"
        return t

    async def abort(self, request_id: str) -> bool:
        self.calls["abort"] += 1
        return request_id in self._running

    async def update_weights(self, loader: str, loader_kwargs: dict[str, Any], version: Optional[int] = None,
                             mode: str = "keep", kv: str = "keep") -> dict[str, Any]:
        self.calls["update_weights"] += 1
        if loader != "stub":
            raise RolloutError(ErrorCode.UPDATE_FAILED, f"unknown loader {loader!r}")
        self.version = self.version + 1 if version is None else version
        return {"version": self.version, "seconds": 0.0, "num_bytes": 0}

    async def stats(self) -> dict[str, Any]:
        self.calls["stats"] += 1
        return {"open_sessions": len(self.sessions), "weight_version": self.version, "calls": dict(self.calls)}

    async def health(self) -> dict[str, Any]:
        return {"ok": True, "workers": ["stub"], "version": self.version}

    async def shutdown(self) -> None:
        self.shut_down = True
