"""The backend half of a session turn (mixed into ``rollout.chat_sessions.ChatSessions``): which backend session a
prepared ``ChatTurn`` runs in, its samples whole (``generate``) or as they are generated (``stream``), and the
closing of backend sessions a record lets go.

    turn.record False (n > 1, sessions off) : backend.generate / generate_stream(prompt_ids)  -- no session
    a new conversation                      : open_session, step_session(_stream)(prompt_ids)
    a conversation continued in place       : step_session(_stream)(its session, new_token_ids)
        its session lost (engine TTL, a restarted worker): open_session, step(prompt_ids) -- the whole exact
        context again (re-prefilled, the prefix cache shares what it still holds), never re-tokenized

Whatever fails, the record is left as it was: ``ChatSessions.end`` closes the session of a turn that was started
and not committed (its KV may hold a partial turn the record does not).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from engine.sampling import SamplingParams
from rollout.backend import ErrorCode, RolloutError
from rollout.loop_streams import SampleDelta
from rollout.trajectory import Trajectory


class SessionTurns:
    """Uses ``self.backend``, ``self.config.ttl_s`` and ``self._closing`` (a set of tasks) of ``ChatSessions``."""

    async def generate(self, turn, params: SamplingParams) -> list[Trajectory]:
        """The turn's samples. Raises RolloutError; the record is unchanged then."""
        if not turn.record:
            return await self.backend.generate(turn.prompt_ids, params)
        session, tokens = await self._session_for(turn)
        try:
            return [await self.backend.step_session(session, tokens, params)]
        except RolloutError as e:
            if not self._lost(turn, e):
                raise
        session, tokens = await self._reopen(turn)
        return [await self.backend.step_session(session, tokens, params)]

    async def stream(self, turn, params: SamplingParams) -> AsyncIterator[SampleDelta]:
        """The turn's samples as they are generated (``SampleDelta``, each sample's last with ``final``)."""
        if not turn.record:
            async for delta in self.backend.generate_stream(turn.prompt_ids, params):
                yield delta
            return
        session, tokens = await self._session_for(turn)
        started = False
        try:
            async for delta in self.backend.step_session_stream(session, tokens, params):
                started = True
                yield delta
            return
        except RolloutError as e:
            if started or not self._lost(turn, e):
                raise
        session, tokens = await self._reopen(turn)
        async for delta in self.backend.step_session_stream(session, tokens, params):
            yield delta

    async def _session_for(self, turn) -> tuple[str, list[int]]:
        """(backend session, tokens to send) of a recorded turn; opens one for a new conversation."""
        turn.stepped = True
        conv = turn.conversation
        if conv is None:
            turn.opened_session = await self.backend.open_session(None, self.config.ttl_s)
            return turn.opened_session, turn.prompt_ids
        if conv.engine_session is None:                  # dropped after a failed turn: the whole exact context
            return await self._reopen(turn)
        return conv.engine_session, turn.new_token_ids

    @staticmethod
    def _lost(turn, e: RolloutError) -> bool:
        """The continued conversation's backend session is gone (expired by the engine's TTL, a dead worker)."""
        return turn.conversation is not None and not turn.reopened and e.code is ErrorCode.UNKNOWN_SESSION

    async def _reopen(self, turn) -> tuple[str, list[int]]:
        """A new backend session for the continued conversation, sent its whole exact context."""
        conv = turn.conversation
        turn.reopened = True
        conv.engine_session = None
        conv.engine_session = await self.backend.open_session(None, self.config.ttl_s)
        return conv.engine_session, turn.prompt_ids

    def _drop_session(self, conv) -> None:
        if conv.engine_session is not None:
            self._close_later(conv.engine_session)
            conv.engine_session = None

    def _close_later(self, engine_session: str) -> None:
        async def close() -> None:
            with contextlib.suppress(RolloutError):        # already gone (TTL, dead worker): nothing to free
                await self.backend.close_session(engine_session)
        task = asyncio.ensure_future(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


def cached_prompt_tokens(prompt_ids: list[int], samples: list[Trajectory]) -> int:
    """Prompt tokens whose KV was not computed for this request (a session's KV, the prefix cache): OpenAI's
    ``usage.prompt_tokens_details.cached_tokens``, from the first sample's count of prefilled tokens."""
    if not samples or "num_prefill_tokens" not in samples[0].metrics:
        return 0
    return max(0, len(prompt_ids) - int(samples[0].metrics["num_prefill_tokens"]))
