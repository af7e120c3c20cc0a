"""What the OpenAI-compatible HTTP front end costs next to the ZeroMQ one: requests/s and added latency, both
front ends on one event loop over the same backend, measured in the same run.

(a) Front-end overhead: a stub backend that answers at once (16 fake tokens), served from a second process by
    both front ends; clients send one 16-token prompt: sequential (ZeroMQ sync client; HTTP over one keep-alive
    connection with the stdlib; HTTP through the official ``openai`` client; HTTP streamed), then N concurrent
    requests (ZeroMQ asyncio DEALERs; HTTP asyncio connections, one per request in flight).
(b) A tiny random Llama behind ``LocalBackend``, in this process: the backend awaited directly vs through each
    front end (greedy, 8 new tokens, same token ids checked); the differences of the medians are what each
    front end adds.

    python benchmarks/http_frontend.py [--seconds 2] [--no-append]
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing as mp
import shutil
import statistics
import tempfile
import sys
import time
from collections.abc import Callable
from pathlib import Path

if not __package__:  # run as a script: the repository root first (its packages, not this folder)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.report import append_results, markdown_table  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402

PROMPT = list(range(1, 17))
MODEL = "bench"


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _tokenizer_dir(into: str) -> str:
    """SmolLM2's tokenizer files (the HTTP front end decodes text; ZeroMQ returns ids only)."""
    from engine.smollm2 import ensure_smollm2
    src = ensure_smollm2()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, f"{into}/{name}")
    return into


def _serve_both(backend, tokenizer, max_model_len: int):
    """Coroutine: the ZeroMQ front end and the HTTP server on this loop; -> (zmq address, http base, stop())."""
    from rollout.http_server import HttpConfig, create_app
    from rollout.http_uvicorn import HttpServer
    from rollout.server import FrontEnd

    async def start():
        fe = FrontEnd(backend, "tcp://127.0.0.1:*", max_in_flight=4096)
        address = await fe.start()
        server = HttpServer(create_app(backend, tokenizer, HttpConfig(model_name=MODEL, max_model_len=max_model_len,
                                                                      max_in_flight=4096)), "127.0.0.1", 0)
        base = await server.start()

        async def stop():
            await server.shutdown()
            await fe.shutdown(5)
        return address, base, stop
    return start()


def _stub_process(address_queue: mp.Queue, stop: mp.Event, tok_dir: str) -> None:
    from transformers import AutoTokenizer

    from tests.rollout.stub_backend import StubBackend

    async def main() -> None:
        address, base, shutdown = await _serve_both(StubBackend(), AutoTokenizer.from_pretrained(tok_dir), 4096)
        address_queue.put((address, base))
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await shutdown()
    asyncio.run(main())


class HttpClient:
    """POST /v1/completions over one keep-alive connection (stdlib: the least a client can add)."""

    def __init__(self, base: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)

    def post(self, body: dict) -> tuple[int, bytes]:
        for attempt in (0, 1):
            try:
                self.conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                # uvicorn closes a connection idle for 5 s (its keep-alive timeout): the interleaved rows idle
                self.conn.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def completion(self, body: dict) -> bytes:
        status, data = self.post(body)
        assert status == 200, data[:300]
        return data


async def _async_http(base: str, body: dict, concurrency: int, seconds: float) -> tuple[int, list[float], float]:
    host, port = base.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
    lat: list[float] = []

    async def one(reader, writer) -> None:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)

    async def worker(end: float) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            await one(reader, writer)          # warm-up
            while time.perf_counter() < end:
                t = time.perf_counter()
                await one(reader, writer)
                lat.append(time.perf_counter() - t)
        finally:
            writer.close()
    start = time.perf_counter()
    await asyncio.gather(*(worker(start + seconds) for _ in range(concurrency)))
    return len(lat), lat, time.perf_counter() - start


async def _async_zmq(address: str, params: SamplingParams, concurrency: int,
                     seconds: float) -> tuple[int, list[float], float]:
    from rollout.client import AsyncRolloutClient
    lat: list[float] = []
    async with AsyncRolloutClient(address, timeout_s=30) as c:
        await asyncio.gather(*(c.generate(PROMPT, params) for _ in range(concurrency)))   # warm-up
        start = time.perf_counter()
        end = start + seconds

        async def worker() -> None:
            while time.perf_counter() < end:
                t = time.perf_counter()
                await c.generate(PROMPT, params)
                lat.append(time.perf_counter() - t)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(lat), lat, time.perf_counter() - start


def _timed(fn: Callable[[], object], seconds: float) -> list[float]:
    for _ in range(20):
        fn()
    lat, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    return lat


def _streamed(base: str, body: dict) -> Callable[[], object]:
    """One streamed completion read to its ``[DONE]`` over a keep-alive connection."""
    c = HttpClient(base)

    def run() -> None:
        status, data = c.post(dict(body, stream=True))
        assert status == 200 and data.endswith(b"data: [DONE]\n\n"), data[-200:]
    return run


def _row(label: str, conc: int, lat: list[float], rate: float | None = None) -> list:
    return [label, conc, rate if rate is not None else len(lat) / sum(lat), _pct(lat, 0.5) * 1e6,
            _pct(lat, 0.99) * 1e6]


def bench_stub(seconds: float, tok_dir: str) -> list[list]:
    import openai

    from rollout.client import RolloutClient
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_stub_process, args=(q, stop, tok_dir), daemon=True)
    proc.start()
    params = SamplingParams(max_tokens=16)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16}
    rows = []
    try:
        address, base = q.get(timeout=120)
        with RolloutClient(address, timeout_s=10) as c:
            rows.append(_row("stub, ZeroMQ sync client", 1, _timed(lambda: c.generate(PROMPT, params), seconds)))
        h = HttpClient(base)
        rows.append(_row("stub, HTTP keep-alive (stdlib)", 1, _timed(lambda: h.completion(body), seconds)))
        oc = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        rows.append(_row("stub, HTTP official openai client", 1,
                         _timed(lambda: oc.completions.create(**body), seconds)))
        rows.append(_row("stub, HTTP streamed (16 chunks + [DONE])", 1, _timed(_streamed(base, body), seconds)))
        for conc in (8, 64):
            n, lat, elapsed = asyncio.run(_async_zmq(address, params, conc, seconds))
            rows.append(_row("stub, ZeroMQ asyncio client", conc, lat, n / elapsed))
            n, lat, elapsed = asyncio.run(_async_http(base, body, conc, seconds))
            rows.append(_row("stub, HTTP asyncio connections", conc, lat, n / elapsed))
    finally:
        stop.set()
        proc.join(15)
    return rows


def bench_tiny(seconds: float, tok_dir: str) -> list[list]:
    import torch

    from engine import EngineConfig
    from engine.tiny_models import make_tiny_model
    from rollout.client import RolloutClient
    from rollout.local import LocalBackend
    from rollout.server import BackgroundFrontEnd
    torch.set_num_threads(1)     # tiny matrices: intra-op threads only contend with the server's on 2 cores
    params = SamplingParams(max_tokens=8, temperature=0.0)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model("llama", f"{tmp}/llama")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(f"{tok_dir}/{name}", path / name)
        backend = LocalBackend(EngineConfig(model=str(path), num_kv_blocks=256, max_num_seqs=16))
        rows = []
        try:
            with BackgroundFrontEnd(lambda: backend, "tcp://127.0.0.1:*") as fe, \
                    RolloutClient(fe.address, timeout_s=30) as c:
                # the HTTP server joins the ZeroMQ front end's loop: one loop, one backend, both front ends
                from rollout.http_server import HttpConfig, create_app
                from rollout.http_uvicorn import HttpServer
                server = HttpServer(create_app(backend, backend.loop.tokenizer(),
                                               HttpConfig(model_name=MODEL, max_model_len=1024)), "127.0.0.1", 0)
                base = fe.call(server.start(), 30)
                h = HttpClient(base)
                want = c.generate(PROMPT, params)[0].token_ids
                got = json.loads(h.completion(body))["choices"][0]["token_ids"]
                assert got == want, f"not the same work: {got} vs {want}"
                fns = {"direct": lambda: fe.call(backend.generate(PROMPT, params), 30),
                       "zmq": lambda: c.generate(PROMPT, params),
                       "http": lambda: h.completion(body),
                       "http stream": _streamed(base, body)}
                results: dict[str, list[float]] = {}
                for _ in range(4):           # interleaved: drift hits every path alike
                    for name, fn in fns.items():
                        results.setdefault(name, []).extend(_timed(fn, seconds / 4))
                fe.call(server.shutdown(), 30)
            labels = {"direct": "tiny llama, backend awaited in-process", "zmq": "tiny llama, ZeroMQ front end",
                      "http": "tiny llama, HTTP front end", "http stream": "tiny llama, HTTP streamed"}
            for name, lat in results.items():
                rows.append(_row(labels[name], 1, lat))
            base_p50 = statistics.median(results["direct"])
            for name in ("zmq", "http", "http stream"):
                rows.append([f"tiny llama: added by {labels[name].split(', ')[1]} (p50 difference)", 1, "",
                             (statistics.median(results[name]) - base_p50) * 1e6, ""])
        finally:
            asyncio.run(backend.shutdown())
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="measuring time per row")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tok_dir:
        _tokenizer_dir(tok_dir)
        rows = bench_stub(args.seconds, tok_dir) + bench_tiny(args.seconds * 2, tok_dir)
    table = markdown_table(["setup", "concurrent requests", "requests/s", "p50 latency (µs)", "p99 latency (µs)"],
                           rows)
    print(table)
    if not args.no_append:
        append_results(
            "HTTP (OpenAI-compatible) vs ZeroMQ front end: requests/s and added latency", "cpu", table,
            notes="`python benchmarks/http_frontend.py`. One 16-token prompt as token ids over loopback TCP; both front ends "
                  "on one event loop over one backend, in the same run. Stub rows: the backend answers at once "
                  "(16 fake tokens) in a second process, so the figures are front end + client + transport; the "
                  "HTTP front end also decodes the output to text (SmolLM2's tokenizer), ZeroMQ returns ids only. "
                  "Tiny-model rows: LocalBackend on a 2-layer random Llama, greedy, 8 new tokens (the same token "
                  "ids through both, checked), one torch thread; the difference of the medians is what each front "
                  "end adds. 2 shared CPU cores: client, server and engine threads compete for them (and the GIL: "
                  "a streamed request wakes the event loop after every engine step).")


if __name__ == "__main__":
    main()
