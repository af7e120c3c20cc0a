"""The soak's server side: a ZeroMQ front end + ``RolloutPool`` in a subprocess of its own (so its RSS is the
server's alone), started and stopped by ``Server``; and ``rss_mb``, how the soak measures processes.

    python -m benchmarks.soak_server --model DIR [--workers 2 --num-kv-blocks 2048 --max-num-seqs 128
                                                  --session-expiry-grace 5]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
READY = "SOAK_SERVER "          # the server's line on stdout: READY + json {"address", "pid"}


def serve(model: str, num_workers: int, num_kv_blocks: int, max_num_seqs: int,
          session_expiry_grace_s: float = 5.0) -> None:
    """Front end + pool until stdin closes (or SIGTERM); prints READY + json when listening."""
    import signal

    import ray

    from engine.config import EngineConfig
    from rollout.pool import RolloutPool
    from rollout.server import FrontEnd

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    config = EngineConfig(model=model, num_kv_blocks=num_kv_blocks, block_size=8, max_model_len=256,
                          max_num_seqs=max_num_seqs)
    pool = RolloutPool(config, num_workers, num_cpus_per_worker=0.5, start_timeout_s=300,
                       session_expiry_grace_s=session_expiry_grace_s)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_reader(sys.stdin.fileno(), lambda: (sys.stdin.read(), stop.set()))   # EOF: the driver went away
        fe = FrontEnd(pool, "tcp://127.0.0.1:*", max_in_flight=4096)
        address = await fe.start()
        print(READY + json.dumps({"address": address, "pid": os.getpid()}), flush=True)
        await stop.wait()
        await fe.shutdown(10)
        await pool.shutdown()

    try:
        asyncio.run(main())
    finally:
        ray.shutdown()


class Server:
    """The soak server in a subprocess; ``with Server(...) as s: s.address``."""

    def __init__(self, model: str, *, num_workers: int = 2, num_kv_blocks: int = 2048, max_num_seqs: int = 128,
                 start_timeout_s: float = 240.0, session_expiry_grace_s: float = 5.0) -> None:
        self.args = [sys.executable, "-m", "benchmarks.soak_server", "--model", model,
                     "--workers", str(num_workers), "--num-kv-blocks", str(num_kv_blocks),
                     "--max-num-seqs", str(max_num_seqs), "--session-expiry-grace", str(session_expiry_grace_s)]
        self.start_timeout_s = start_timeout_s
        self.proc: Optional[subprocess.Popen] = None
        self.address = ""
        self.pid = 0

    def __enter__(self) -> "Server":
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.log = tempfile.NamedTemporaryFile("w+", prefix="soak-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, cwd=REPO, env=env)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith(READY):
                info = json.loads(line[len(READY):])
                self.address, self.pid = info["address"], info["pid"]
                return self
        self.__exit__()
        raise RuntimeError(f"the soak server did not start; its log: {self.log.name}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB (psutil when installed, else /proc/<pid>/status VmRSS)."""
    try:
        import psutil
        return psutil.Process(pid).memory_info().rss / 2 ** 20
    except ImportError:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--num-kv-blocks", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--session-expiry-grace", type=float, default=5.0,
                    help="seconds past a session's TTL before the pool forgets it (RolloutPool session_expiry_grace_s)")
    args = ap.parse_args()
    serve(args.model, args.workers, args.num_kv_blocks, args.max_num_seqs, args.session_expiry_grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
