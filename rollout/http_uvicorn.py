"""Serving an ASGI app with uvicorn inside the caller's asyncio loop (``rollout serve --http``), and the
``--http HOST:PORT`` parser."""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any


def parse_host_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port); ValueError naming the flag otherwise."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--http must be HOST:PORT (e.g. 127.0.0.1:8000), got {address!r}")
    return host, int(port)


class HttpServer:
    """uvicorn serving ``app`` inside the caller's asyncio loop (next to the ZeroMQ front end), so the process
    keeps one loop and one set of signal handlers: the caller's (uvicorn's own are not installed)."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):   # the caller owns SIGINT/SIGTERM and calls shutdown()
                yield

        self._server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
        self._task: asyncio.Task | None = None

    async def start(self, timeout_s: float = 30.0) -> str:
        """Bind and start serving; returns ``http://host:port`` (the real port when ``port`` was 0)."""
        self._task = asyncio.create_task(self._server.serve())
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if self._task.done():      # NOTE: uvicorn calls sys.exit when it cannot bind; the process ends
                raise OSError(f"the HTTP server could not start on {self._server.config.host}:"
                              f"{self._server.config.port}")
            if time.monotonic() > deadline:
                raise TimeoutError("the HTTP server did not start in time")
            await asyncio.sleep(0.01)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    async def shutdown(self) -> None:
        """Stop accepting connections and let the requests in flight finish (uvicorn's graceful exit)."""
        self._server.should_exit = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
