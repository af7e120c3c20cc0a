"""Soak: a long, randomized load through the ZeroMQ front end against a Ray pool of two CPU workers.

The server (front end + ``RolloutPool`` of 2 CPU workers on a tiny model: benchmarks/soak_server.py) runs in a
subprocess of its own, so its RSS is the server's alone; the load comes from this process: ``--clients`` concurrent ``AsyncRolloutClient``s,
each with up to ``--concurrency`` requests in flight, drawing from one shared plan of

  * ``--requests`` single ``generate`` requests with random sampling parameters (temperature, top_p, top_k, seed,
    n, max_tokens, ignore_eos), and
  * ``--sessions`` multi-turn sessions (open, 2-4 turns of random new tokens, close), opened with a short TTL
    (``--session-ttl``) so the ones a vanished client abandons are freed by their worker.

Random disconnects: each client, after a random number of requests (mean ``--disconnect-every``), is closed while
it has requests in flight; its outstanding requests are abandoned client-side (the server finishes them until a
reply to the gone peer fails, then aborts the rest of its work: ``aborted_for_vanished_client``) and its open
sessions are left to their TTL; a fresh client takes its place.

Checks (the run exits non-zero if one fails):
  1. every request whose client stayed got exactly one terminal reply (counted at the socket, duplicates too);
  2. no error on any request whose client stayed (``errors by code`` lists what came back);
  3. after the TTL: every worker's KV blocks are all free, no session, request or reservation is left, and the
     pool holds no session affinity;
  4. RSS (server process and each worker) after warm-up vs at the end: growth < ``--max-rss-growth`` (%).

    python -m benchmarks.soak                         # the full run: 10,000 requests, 1,000 sessions
    python -m benchmarks.soak --requests 500 --sessions 50 --no-append     # a quick one
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.soak_server import Server, rss_mb


# ====================================================================== load (this process)
def random_params(rng: random.Random, *, allow_n: bool = True):
    from engine.sampling import SamplingParams
    return SamplingParams(
        temperature=rng.choice([0.0, 0.0, 0.7, 1.0, 1.3]), top_p=rng.choice([1.0, 0.9, 0.5]),
        top_k=rng.choice([-1, -1, 1, 5, 50]), seed=rng.choice([None, rng.randrange(1 << 31)]),
        n=rng.choice([1, 1, 1, 2, 4]) if allow_n else 1, max_tokens=rng.randint(1, 8),
        ignore_eos=rng.random() < 0.5)


def random_tokens(rng: random.Random, lo: int, hi: int) -> list[int]:
    return [rng.randrange(2, 500) for _ in range(rng.randint(lo, hi))]


@dataclass
class Tally:
    sent: int = 0                                     # requests put on the wire
    answered: int = 0                                 # ... that got their terminal reply
    abandoned: int = 0                                # ... whose client was closed before the reply
    timeouts: int = 0                                 # ... no reply within the client's timeout (must stay 0)
    errors: Counter = field(default_factory=Counter)  # error code -> count, requests of clients that stayed
    bad_replies: int = 0                              # replies whose content does not match the request
    generate_done: int = 0
    sessions_done: int = 0
    sessions_abandoned: int = 0
    turns_done: int = 0
    tokens: int = 0
    disconnects: int = 0
    # replies seen at the socket -> requests: for every request answered while its client was connected (must
    # all be 1), and for every request of a client still connected at the end (checked 0.5 s after the load)
    replies_per_request: Counter = field(default_factory=Counter)
    replies_per_request_final: Counter = field(default_factory=Counter)
    abandoned_with_reply: int = 0                     # abandoned requests whose reply had arrived anyway (race)


def _counting_client_class():
    from rollout.client import AsyncRolloutClient

    class CountingClient(AsyncRolloutClient):
        """AsyncRolloutClient that counts every reply per id at the socket, duplicates included."""

        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.replies: Counter = Counter()
            self.sent: list = []
            self.answered: set = set()
            self.closed = False

        async def request(self, request, *, request_id=None, timeout_s=None):
            self.sent.append(request_id)
            return await super().request(request, request_id=request_id, timeout_s=timeout_s)

        async def _read(self) -> None:
            while True:
                reply = self._codec.decode(await self._sock.recv_multipart())
                if reply is None:
                    continue
                self.replies[reply.get("id")] += 1
                self._deliver(reply)

        async def close(self) -> None:
            self.closed = True
            await super().close()
    return CountingClient


class Soak:
    def __init__(self, address: str, *, requests: int, sessions: int, clients: int, concurrency: int,
                 disconnect_every: float, session_ttl_s: float, seed: int, timeout_s: float = 120.0,
                 warmup_fraction: float = 0.1, on_warm: Any = None) -> None:
        self.address = address
        self.rng = random.Random(seed)
        # The plan: ("gen", i) and ("session", j) items in random order, shared by every client.
        plan = [("gen", i) for i in range(requests)] + [("session", j) for j in range(sessions)]
        self.rng.shuffle(plan)
        self.plan = plan
        self.num_clients, self.concurrency = clients, concurrency
        self.disconnect_every, self.session_ttl_s, self.timeout_s = disconnect_every, session_ttl_s, timeout_s
        self.tally = Tally()
        self.retired: list = []          # closed (disconnected) clients
        self.live: list = []
        self.warm_at = int(len(plan) * warmup_fraction)
        self.on_warm = on_warm
        self.items_done = 0
        self._ids = iter(range(1 << 62))
        self._Client = _counting_client_class()

    def _new_client(self):
        c = self._Client(self.address, timeout_s=self.timeout_s)
        self.live.append(c)
        return c

    async def _call(self, client, method: str, *args: Any) -> Any:
        """One request: its result, or None when it failed (recorded) or its client was closed."""
        from rollout.backend import RolloutError
        if client.closed:     # its reply came in just before the disconnect: the rest of the session is dropped
            return None
        rid = f"r{next(self._ids)}"
        self.tally.sent += 1
        try:
            result = await getattr(client, method)(*args, request_id=rid)
        except RolloutError as e:
            if client.closed:
                self.tally.abandoned += 1
            else:
                self.tally.answered += 1
                client.answered.add(rid)
                self.tally.errors[e.code.value] += 1
            return None
        except TimeoutError:
            self.tally.timeouts += 1
            return None
        self.tally.answered += 1
        client.answered.add(rid)
        return result

    async def _generate(self, client, rng: random.Random) -> None:
        prompt, params = random_tokens(rng, 1, 24), random_params(rng)
        trajs = await self._call(client, "generate", prompt, params)
        if trajs is None:
            return
        ok = len(trajs) == params.n and all(
            t.prompt_ids == prompt and 1 <= len(t.token_ids) <= params.max_tokens
            and len(t.logprobs) == len(t.versions) == len(t.token_ids) for t in trajs)
        self.tally.bad_replies += not ok
        self.tally.generate_done += 1
        self.tally.tokens += sum(len(t.token_ids) for t in trajs)

    async def _session(self, client, rng: random.Random) -> None:
        sid = await self._call(client, "open_session", None, self.session_ttl_s)
        if sid is None:
            return
        model_tokens = 0
        for _ in range(rng.randint(2, 4)):
            params = random_params(rng, allow_n=False)
            turn = await self._call(client, "step_session", sid, random_tokens(rng, 1, 12), params)
            if turn is None:
                self.tally.sessions_abandoned += client.closed
                return           # the client went away (or an error was recorded): TTL frees the session
            self.tally.turns_done += 1
            model_tokens += len(turn.token_ids)
            self.tally.tokens += len(turn.token_ids)
        whole = await self._call(client, "close_session", sid)
        if whole is None:
            self.tally.sessions_abandoned += client.closed
            return
        self.tally.bad_replies += sum(whole.loss_mask) != model_tokens
        self.tally.sessions_done += 1

    async def _client_loop(self, index: int) -> None:
        rng = random.Random(self.rng.randrange(1 << 31))
        client = self._new_client()
        budget = int(rng.expovariate(1 / self.disconnect_every)) + 1
        running: set[asyncio.Task] = set()
        while self.plan or running:
            while self.plan and len(running) < self.concurrency:
                kind, _ = self.plan.pop()
                coro = self._generate(client, rng) if kind == "gen" else self._session(client, rng)
                running.add(asyncio.ensure_future(coro))
                budget -= 1
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            self.items_done += len(done)
            if self.on_warm is not None and self.items_done >= self.warm_at:
                warm, self.on_warm = self.on_warm, None
                warm()
            if budget <= 0 and running:
                # Vanish mid-flight: what is outstanding is abandoned client-side; the server must cope.
                await client.close()
                self.live.remove(client)
                self.retired.append(client)
                self.tally.disconnects += 1
                await asyncio.gather(*running)    # each ends at once (client closed)
                self.items_done += len(running)
                running = set()
                client = self._new_client()
                budget = int(rng.expovariate(1 / self.disconnect_every)) + 1

    async def run(self, max_seconds: float) -> None:
        tasks = [asyncio.ensure_future(self._client_loop(i)) for i in range(self.num_clients)]
        done, pending = await asyncio.wait(tasks, timeout=max_seconds)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            if t.exception() is not None:
                raise t.exception()
        if pending:
            raise TimeoutError(f"the soak did not finish within {max_seconds} s")
        await asyncio.sleep(0.5)          # a duplicate reply would arrive now
        for c in self.live + self.retired:
            for rid in c.sent:
                if rid in c.answered:
                    self.tally.replies_per_request[c.replies[rid]] += 1
                elif c.replies[rid]:
                    self.tally.abandoned_with_reply += 1
                if c in self.live:
                    self.tally.replies_per_request_final[c.replies[rid]] += 1

    async def close(self) -> None:
        for c in self.live:
            await c.close()


async def wait_until_idle(address: str, *, timeout_s: float) -> tuple[dict, float]:
    """Poll stats until every worker is back to all-free KV (sessions expired); -> (stats, seconds waited)."""
    from rollout.client import AsyncRolloutClient
    start = time.monotonic()
    async with AsyncRolloutClient(address, timeout_s=30) as c:
        while True:
            stats = await c.stats()
            if idle_problems(stats) == [] or time.monotonic() - start > timeout_s:
                return stats, time.monotonic() - start
            await asyncio.sleep(0.5)


def idle_problems(stats: dict) -> list[str]:
    """What is still held after the load (empty when everything is free)."""
    out = []
    for w in stats["backend"]["workers"]:
        i = w["worker"]
        if w.get("num_held_blocks"):
            out.append(f"worker {i}: {w.get('num_held_blocks')} of {w.get('num_total_blocks')} KV blocks still held")
        for key in ("open_sessions", "pending_requests", "tracked_sessions", "num_running", "num_waiting",
                    "num_reserved_blocks", "inflight"):
            if w.get(key, 0) != 0:
                out.append(f"worker {i}: {key} = {w.get(key)}")
    if stats["backend"].get("sessions", 0) != 0:
        out.append(f"pool: {stats['backend']['sessions']} session affinity entries")
    if stats["frontend"]["in_flight"] != 0:          # besides this stats request (protocol v2 does not count it)
        out.append(f"front end: {stats['frontend']['in_flight']} requests in flight")
    return out


def run_soak(address: str, server_pid: int, *, requests: int, sessions: int, clients: int = 4,
             concurrency: int = 32, disconnect_every: float = 400.0, session_ttl_s: float = 5.0, seed: int = 0,
             max_seconds: float = 1800.0) -> dict[str, Any]:
    """Drive the load at a running server; -> the report (figures and check results)."""
    from rollout.client import RolloutClient
    with RolloutClient(address, timeout_s=60) as c:
        worker_pids = {w["worker"]: w["pid"] for w in c.health()["workers"]}
    pids = {"server": server_pid, **{f"worker {i}": pid for i, pid in sorted(worker_pids.items())}}
    rss: dict[str, dict[str, float]] = {"start": {k: rss_mb(p) for k, p in pids.items()}}
    soak = Soak(address, requests=requests, sessions=sessions, clients=clients, concurrency=concurrency,
                disconnect_every=disconnect_every, session_ttl_s=session_ttl_s, seed=seed,
                on_warm=lambda: rss.__setitem__("warm", {k: rss_mb(p) for k, p in pids.items()}))

    async def main() -> tuple[dict, float]:
        try:
            await soak.run(max_seconds)
        finally:
            await soak.close()
        return await wait_until_idle(address, timeout_s=session_ttl_s + 30)

    start = time.monotonic()
    stats, idle_wait = asyncio.run(main())
    elapsed = time.monotonic() - start - idle_wait
    rss["end"] = {k: rss_mb(p) for k, p in pids.items()}
    t = soak.tally
    growth = {k: 100 * (rss["end"][k] - rss["warm"][k]) / rss["warm"][k] for k in pids}
    workers = stats["backend"]["workers"]
    return {
        "tally": t, "seconds": elapsed, "idle_wait_s": idle_wait, "rss": rss, "rss_growth_pct": growth,
        "free_blocks": sum(w["num_free_blocks"] for w in workers),
        "total_blocks": sum(w["num_total_blocks"] for w in workers),
        "expired_sessions": sum(w.get("expired_sessions", 0) for w in workers),
        "idle_problems": idle_problems(stats), "frontend": stats["frontend"], "worker_deaths":
            stats["backend"].get("worker_deaths", 0), "num_requests": requests, "num_sessions": sessions,
        "clients": clients, "concurrency": concurrency,
    }


def check(report: dict[str, Any], max_rss_growth_pct: float) -> list[str]:
    """The soak's pass conditions; -> what failed (empty when all hold)."""
    t: Tally = report["tally"]
    fails = []
    if set(t.replies_per_request) != {1} or sum(t.replies_per_request.values()) != t.answered:
        fails.append(f"replies per answered request: {dict(t.replies_per_request)} (want all 1)")
    if set(t.replies_per_request_final) - {1}:
        fails.append(f"replies per request of the clients connected at the end: {dict(t.replies_per_request_final)}")
    if t.timeouts or t.errors or t.bad_replies:
        fails.append(f"timeouts {t.timeouts}, errors {dict(t.errors)}, bad replies {t.bad_replies}")
    if t.sent != t.answered + t.abandoned + t.timeouts:
        fails.append(f"sent {t.sent} != answered {t.answered} + abandoned {t.abandoned} + timeouts {t.timeouts}")
    if t.generate_done + t.sessions_done + t.sessions_abandoned == 0:
        fails.append("nothing completed")
    fails += report["idle_problems"]
    fe = report["frontend"]
    if fe.get("received", 0) != fe.get("replied", 0) + 1:    # + the stats request being answered
        fails.append(f"front end received {fe.get('received')} but replied {fe.get('replied')}")
    for name, g in report["rss_growth_pct"].items():
        if g >= max_rss_growth_pct:
            fails.append(f"RSS of {name} grew {g:.1f}% after warm-up (limit {max_rss_growth_pct}%)")
    return fails


def table(report: dict[str, Any]) -> str:
    from benchmarks.report import markdown_table
    t: Tally = report["tally"]
    rows = [
        ["plan", f"{report['num_requests']:,} generate + {report['num_sessions']:,} sessions, "
                 f"{report['clients']} clients x {report['concurrency']} in flight"],
        ["wall time (load)", f"{report['seconds']:.1f} s"],
        ["requests sent (all ops)", f"{t.sent:,}"],
        ["  answered / abandoned by a disconnect / timed out", f"{t.answered:,} / {t.abandoned:,} / {t.timeouts}"],
        ["replies per request, every answered request (socket count)",
         ", ".join(f"{k} reply: {v:,}" for k, v in sorted(t.replies_per_request.items()))],
        ["replies per request, clients connected at the end (+0.5 s)",
         ", ".join(f"{k} reply: {v:,}" for k, v in sorted(t.replies_per_request_final.items()))],
        ["abandoned requests whose reply had already arrived", t.abandoned_with_reply],
        ["errors by code (clients that stayed)", dict(t.errors) or "none"],
        ["bad replies (wrong n / length / masks)", t.bad_replies],
        ["generate done / sessions closed / sessions abandoned", f"{t.generate_done:,} / {t.sessions_done:,} / "
                                                                  f"{t.sessions_abandoned:,}"],
        ["session turns / tokens generated", f"{t.turns_done:,} / {t.tokens:,}"],
        ["client disconnects mid-flight", t.disconnects],
        ["sessions expired by TTL (workers)", report["expired_sessions"]],
        ["free KV blocks at the end / total", f"{report['free_blocks']:,} / {report['total_blocks']:,} "
                                              f"(after {report['idle_wait_s']:.1f} s)"],
        ["still held at the end", "; ".join(report["idle_problems"]) or "nothing"],
        ["front end: replies undeliverable (client gone) / requests aborted for a vanished client",
         (f"{report['frontend'].get('replies_undeliverable', 0):,} / "
          f"{report['frontend'].get('aborted_for_vanished_client', 0):,}")],
        ["front end received / replied", f"{report['frontend'].get('received', 0):,} / "
                                         f"{report['frontend'].get('replied', 0):,} (+1: the final stats)"],
        ["worker deaths", report["worker_deaths"]],
    ]
    for name in report["rss"]["end"]:
        r = report["rss"]
        rows.append([f"RSS {name}: start / after warm-up / end (MB)",
                     f"{r['start'][name]:.0f} / {r['warm'][name]:.0f} / {r['end'][name]:.0f} "
                     f"({report['rss_growth_pct'][name]:+.1f}% after warm-up)"])
    return markdown_table(["soak", "figure"], rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--sessions", type=int, default=1_000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight per client")
    ap.add_argument("--disconnect-every", type=float, default=400.0, help="mean plan items between disconnects")
    ap.add_argument("--session-ttl", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=1800.0)
    ap.add_argument("--max-rss-growth", type=float, default=10.0, help="percent, after warm-up")
    ap.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument("--model", default=None, help="model directory (default: a tiny random qwen2)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--num-kv-blocks", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from engine.tiny_models import make_tiny_model
            model = str(make_tiny_model("qwen2", Path(tmp) / "tiny", seed=5))
        with Server(model, num_workers=args.workers, num_kv_blocks=args.num_kv_blocks,
                    max_num_seqs=args.max_num_seqs) as server:
            report = run_soak(server.address, server.pid, requests=args.requests, sessions=args.sessions,
                              clients=args.clients, concurrency=args.concurrency,
                              disconnect_every=args.disconnect_every, session_ttl_s=args.session_ttl,
                              seed=args.seed, max_seconds=args.max_seconds)
    text = table(report)
    fails = check(report, args.max_rss_growth)
    print(text)
    print("\nPASS" if not fails else "\nFAIL:\n  " + "\n  ".join(fails))
    if not args.no_append:
        from benchmarks.report import append_results
        cmd = ("python -m benchmarks.soak --requests {r} --sessions {s} --clients {c} --concurrency {k} "
               "--seed {seed}").format(r=args.requests, s=args.sessions, c=args.clients, k=args.concurrency,
                                       seed=args.seed)
        append_results("Soak: ZeroMQ front end + RolloutPool (2 CPU workers, tiny qwen2)", "cpu", text,
                       notes=f"`{cmd}` — {'PASS' if not fails else 'FAIL: ' + '; '.join(fails)}")
    return 0 if not fails else 1


if __name__ == "__main__":
    sys.exit(main())
