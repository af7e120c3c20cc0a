"""Serving an app on loopback for the HTTP tests: uvicorn in a background thread on an ephemeral port."""
from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Iterator

import uvicorn

STARTUP_DEADLINE_S = 30.0


@contextlib.contextmanager
def serving(app, name: str = "test-uvicorn") -> Iterator[str]:
    """Yields ``http://127.0.0.1:PORT`` once the server listens; stops it on exit."""
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while not srv.started:   # bounded: the thread dies or the deadline passes
        if not thread.is_alive() or time.monotonic() > deadline:
            srv.should_exit = True
            raise RuntimeError("the HTTP server did not come up before its deadline")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(10.0)


def open_stream(base: str, path: str, body: dict, key: str | None = None) -> tuple[http.client.HTTPConnection,
                                                                                http.client.HTTPResponse]:
    """A POST whose response is read as it comes (stdlib: closing the connection is a client gone)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request("POST", path, json.dumps(body), headers)
    return conn, conn.getresponse()


def sse_events(resp: http.client.HTTPResponse) -> Iterator[dict | str]:
    """The ``data:`` payloads of an event stream, as they arrive: dicts, and "[DONE]"."""
    while True:
        line = resp.readline()
        if not line:
            return
        line = line.decode().rstrip("\r\n")
        if line.startswith("data: "):
            payload = line[len("data: "):]
            yield payload if payload == "[DONE]" else json.loads(payload)
