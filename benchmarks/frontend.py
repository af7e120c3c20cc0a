"""What the ZeroMQ front end costs: requests/s and added latency.

(a) Pure front-end overhead: a stub backend that answers at once, served from another process; clients
    send ``generate`` (1 prompt of 16 tokens, 16 fake output tokens) — one sync client one request at a
    time, then N concurrent requests over asyncio DEALERs.
(b) A tiny model behind ``LocalBackend``: the same generate called directly in-process vs through
    front end + client (same process, loopback); the difference is the added latency.

    python -m benchmarks.frontend [--seconds 3] [--no-append]
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import tempfile
import time

from benchmarks.report import append_results, markdown_table
from engine.sampling import SamplingParams

PROMPT = list(range(1, 17))
STUB_PARAMS = SamplingParams(max_tokens=16)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _serve_stub(address_queue: "mp.Queue", stop: "mp.Event") -> None:
    from rollout.server import FrontEnd
    from tests.rollout.stub_backend import StubBackend

    async def main() -> None:
        fe = FrontEnd(StubBackend(), "tcp://127.0.0.1:*", max_in_flight=4096, max_in_flight_per_client=4096)
        address_queue.put(await fe.start())
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await fe.shutdown(5)
    asyncio.run(main())


def bench_sync(address: str, seconds: float) -> tuple[int, list[float]]:
    from rollout.client import RolloutClient
    lat = []
    with RolloutClient(address, timeout_s=10) as c:
        for _ in range(50):
            c.generate(PROMPT, STUB_PARAMS)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            c.generate(PROMPT, STUB_PARAMS)
            lat.append(time.perf_counter() - t)
    return len(lat), lat


async def bench_async(address: str, concurrency: int, seconds: float) -> tuple[int, list[float], float]:
    from rollout.client import AsyncRolloutClient
    lat: list[float] = []
    async with AsyncRolloutClient(address, timeout_s=30) as c:
        await asyncio.gather(*(c.generate(PROMPT, STUB_PARAMS) for _ in range(concurrency)))   # warm-up
        start = time.perf_counter()
        end = start + seconds

        async def worker() -> None:
            while time.perf_counter() < end:
                t = time.perf_counter()
                await c.generate(PROMPT, STUB_PARAMS)
                lat.append(time.perf_counter() - t)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return len(lat), lat, elapsed


def bench_stub(seconds: float) -> list[list]:
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_serve_stub, args=(q, stop), daemon=True)
    proc.start()
    rows = []
    try:
        address = q.get(timeout=60)
        n, lat = bench_sync(address, seconds)
        rows.append(["stub, sync client", 1, n / sum(lat), _pct(lat, 0.5) * 1e6, _pct(lat, 0.99) * 1e6])
        for conc in (8, 64, 256):
            n, lat, elapsed = asyncio.run(bench_async(address, conc, seconds))
            rows.append(["stub, asyncio client", conc, n / elapsed, _pct(lat, 0.5) * 1e6, _pct(lat, 0.99) * 1e6])
    finally:
        stop.set()
        proc.join(15)
    return rows


def bench_tiny(seconds: float) -> list[list]:
    from engine import EngineConfig
    from engine.tiny_models import make_tiny_model
    from rollout.client import RolloutClient
    from rollout.local import LocalBackend
    from rollout.server import BackgroundFrontEnd

    params = SamplingParams(max_tokens=8, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        config = EngineConfig(model=str(make_tiny_model("llama", f"{tmp}/llama")), num_kv_blocks=256, max_num_seqs=16)
        backend = LocalBackend(config)
        rows = []
        try:
            with BackgroundFrontEnd(lambda: backend, "tcp://127.0.0.1:*") as fe, \
                    RolloutClient(fe.address, timeout_s=30) as c:
                def direct() -> None:
                    fe.call(backend.generate(PROMPT, params), 30)

                def via_zmq() -> None:
                    c.generate(PROMPT, params)
                results = {}
                for name, fn in [("direct", direct), ("zmq", via_zmq)] * 4:
                    for _ in range(5):
                        fn()
                    lat = []
                    end = time.perf_counter() + seconds / 4
                    while time.perf_counter() < end:
                        t = time.perf_counter()
                        fn()
                        lat.append(time.perf_counter() - t)
                    results.setdefault(name, []).extend(lat)   # interleaved 4 times: drift hits both
            for name, label in (("direct", "tiny llama, backend called in-process"),
                                ("zmq", "tiny llama, through front end + sync client")):
                lat = results[name]
                rows.append([label, 1, len(lat) / sum(lat), _pct(lat, 0.5) * 1e6, _pct(lat, 0.99) * 1e6])
            added = (statistics.median(results["zmq"]) - statistics.median(results["direct"])) * 1e6
            rows.append(["tiny llama: added by the front end (p50 difference)", 1, "", added, ""])
        finally:
            asyncio.run(backend.shutdown())
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring time per row")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args()
    rows = bench_stub(args.seconds) + bench_tiny(args.seconds * 2)
    table = markdown_table(["setup", "concurrent requests", "requests/s", "p50 latency (µs)", "p99 latency (µs)"],
                           rows)
    print(table)
    if not args.no_append:
        append_results(
            "ZeroMQ front end: requests/s and added latency", "cpu", table,
            notes="`python -m benchmarks.frontend`. generate of a 16-token prompt over loopback TCP, msgpack. Stub rows: "
                  "the backend answers at once (16 fake tokens), served from a second process, so the figures are "
                  "front end + client + ZeroMQ only. Tiny-model rows: LocalBackend on a 2-layer random Llama, 8 new "
                  "tokens; 'in-process' awaits the backend on the server's loop from this thread (one thread hop), "
                  "the difference of the medians is what the front end adds. 2 shared CPU cores: client, server and "
                  "engine threads compete for them.")


if __name__ == "__main__":
    main()
