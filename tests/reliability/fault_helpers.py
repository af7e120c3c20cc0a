"""What the fault-injection tests share: the tiny engine config, a bounded asyncio runner, a free loopback port."""
from __future__ import annotations

import asyncio
import socket

from engine import EngineConfig, SamplingParams

BIND = "tcp://127.0.0.1:*"
GREEDY = SamplingParams(max_tokens=4, ignore_eos=True)


def config(path, **kw):
    return EngineConfig(model=str(path), num_kv_blocks=512, block_size=8, max_model_len=256, **kw)


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
