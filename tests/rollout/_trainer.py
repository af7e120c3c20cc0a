"""A trainer process for the pool's weight-sync group tests (kept light: spawned children import this).

``serve`` runs commands from a queue and answers each on another, so the test orders every step explicitly:
    ("join", spec)                         join the pool's group as rank 0 (leaving any earlier one)
    ("send", path, version, bucket_bytes)  broadcast a safetensors file with DistributedSender
    ("exit",)
Every answer is ("ok", value) or ("error", "Type: message"); nothing is left to hang the parent.
"""
from __future__ import annotations

import time

import torch.distributed as dist
from safetensors.torch import load_file

from tests.weight_sync._sender import send_part_and_die
from weight_sync import TRAINER_RANK, DistributedSender


def serve(commands, answers) -> None:
    group = None
    while True:
        cmd = commands.get(timeout=600)
        try:
            if cmd[0] == "join":
                if group is not None:
                    group.close()
                group = cmd[1].join(TRAINER_RANK)
                answers.put(("ok", dist.is_initialized()))    # False: no default group was created
            elif cmd[0] == "send":
                _, path, version, bucket_bytes = cmd
                answers.put(("ok", DistributedSender(group, bucket_bytes=bucket_bytes).send(load_file(path),
                                                                                            version=version)))
            elif cmd[0] == "exit":
                answers.put(("ok", None))
                return
            else:
                answers.put(("error", f"unknown command {cmd[0]!r}"))
        except BaseException as e:  # noqa: BLE001 - report, never hang the parent
            answers.put(("error", f"{type(e).__name__}: {e}"))


def join_and_die_mid_send(spec, path: str, version: int, buckets_to_send: int, bucket_bytes: int, joined) -> None:
    """Join as rank 0 (then put the wall-clock time on ``joined``), send the header and ``buckets_to_send``
    buckets of an update, then die (os._exit(1))."""
    group = spec.join(TRAINER_RANK)
    joined.put(time.time())
    send_part_and_die(group, path, version, buckets_to_send, bucket_bytes)
