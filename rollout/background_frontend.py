"""``BackgroundFrontEnd``: a ``rollout.server.FrontEnd`` on its own event-loop thread (tests, benchmarks, sync code)."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from rollout.server import DEFAULT_BIND, FrontEnd

logger = logging.getLogger(__name__)


class BackgroundFrontEnd:
    """A FrontEnd on its own event-loop thread, for synchronous programs, tests and benchmarks.

        with BackgroundFrontEnd(lambda: backend, "tcp://127.0.0.1:*") as fe:
            client = RolloutClient(fe.address)

    ``make_backend`` runs on the server thread (a backend may bind its loop there).
    """

    def __init__(self, make_backend: Any, bind: str = DEFAULT_BIND, **frontend_kwargs: Any) -> None:
        self._make_backend = make_backend
        self._bind = bind
        self._kwargs = frontend_kwargs
        self.loop = asyncio.new_event_loop()
        self.frontend: FrontEnd | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="frontend", daemon=True)

    @property
    def address(self) -> str:
        assert self.frontend is not None and self.frontend.address is not None
        return self.frontend.address

    def start(self, timeout_s: float = 30.0) -> BackgroundFrontEnd:
        self._thread.start()

        async def boot() -> None:
            self.frontend = FrontEnd(self._make_backend(), self._bind, **self._kwargs)
            await self.frontend.start()

        asyncio.run_coroutine_threadsafe(boot(), self.loop).result(timeout_s)
        return self

    def call(self, coro: Any, timeout_s: float | None = None) -> Any:
        """Run a coroutine on the server's loop (e.g. a direct backend call) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.frontend is not None:
            start = time.monotonic()
            self.call(self.frontend.shutdown(timeout_s), timeout_s + 10)
            logger.debug("background front end stopped in %.2f s", time.monotonic() - start)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> BackgroundFrontEnd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
