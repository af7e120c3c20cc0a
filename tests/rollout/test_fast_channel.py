"""The fast channel (rollout.fast_channel) on CPU. Without Ray: a server whose update handler the test controls and
the pool's client side, end to end over a real ``ipc://`` socket — reports and error codes come back, malformed
requests get BAD_REQUEST naming the field, a call fails with WORKER_DIED the moment its worker's death is known,
UNAVAILABLE on shutdown or past its timeout, and ``close`` stops the thread and removes the socket. Through a
one-worker RolloutPool on local Ray: an IPC update goes over the channel (the engine's CPU refusal comes back
with the code and message the Ray path gives), a worker frozen mid-call and killed fails it with WORKER_DIED and
its restarted actor's new address is used, and closing the pool removes the socket."""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import signal
import stat
import time

import pytest
import zmq.asyncio
from torch.multiprocessing.reductions import rebuild_cuda_tensor

from engine import EngineConfig
from engine.tiny_models import make_tiny_model
from rollout.backend import ErrorCode, RolloutError
from rollout.fast_channel import FastChannelServer, FastUpdate
from rollout.fast_channel_client import FastChannelClient, FastChannels
from rollout.pool_slots import Incarnation, Slot
from tests.rollout.pool_helpers import local_pool
from tests.weight_sync.test_cuda_ipc_wire import handle_args
from weight_sync.cuda_ipc import CudaIpcPayload

NODE = "node-a"


def payload(version=1):
    return CudaIpcPayload(b"{}", ((rebuild_cuda_tensor, handle_args()),), version, "sender", 1, "GPU-x")


def request(version=1, **kw):
    return {"version": version, "mode": "keep", "kv": "keep", "payload": payload(version).to_wire(), **kw}


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Handler:
    """The server's update handler: records each update and hands out a Future the test resolves."""

    def __init__(self):
        self.updates: list[FastUpdate] = []
        self.futures: list[concurrent.futures.Future] = []

    def __call__(self, update: FastUpdate) -> concurrent.futures.Future:
        if update.mode == "refuse":
            raise RolloutError(ErrorCode.BAD_REQUEST, "refused at once")
        self.updates.append(update)
        self.futures.append(concurrent.futures.Future())
        return self.futures[-1]


@pytest.fixture
def server():
    handler = Handler()
    srv = FastChannelServer(handler, name="worker-0")
    srv.handler = handler
    yield srv
    srv.close()


def slot_for(address, node=NODE):
    death = asyncio.get_running_loop().create_future()
    return Slot(0, Incarnation(None, death, info={"fast_address": address, "node_id": node}), asyncio.Event())


async def wait_for_update(handler, n=1):
    deadline = time.monotonic() + 10
    while len(handler.futures) < n:
        assert time.monotonic() < deadline, "the server never handed the update on"
        await asyncio.sleep(0.002)


def test_server_socket_is_private_and_an_update_round_trips(server):
    assert server.address.startswith("ipc://") and os.path.exists(server.path)
    assert stat.S_IMODE(os.stat(os.path.dirname(server.path)).st_mode) == 0o700

    async def scenario():
        channels = FastChannels(NODE)
        slot = slot_for(server.address)
        try:
            call = asyncio.ensure_future(channels.call(slot, request(3)))
            await wait_for_update(server.handler)
            assert slot.actor.inflight == 1
            [update] = server.handler.updates
            assert (update.version, update.mode, update.kv, update.payload) == (3, "keep", "keep", payload(3))
            server.handler.futures[0].set_result({"version": 3, "timeline": {"applied": 1.5}, "digest": None})
            report = await call
            # the channel stamps its own moments into the timeline: sent (pool), received and decoded (worker),
            # in that order on the one monotonic clock
            stamps = report["timeline"]
            assert set(stamps) == {"applied", "channel_sent", "channel_received", "channel_decoded"}
            assert stamps["channel_sent"] <= stamps["channel_received"] <= stamps["channel_decoded"]
            assert {k: v for k, v in report.items() if k != "timeline"} == {"version": 3, "digest": None}
            assert slot.actor.inflight == 0 and channels.calls == 1
            # errors come back with their codes: a RolloutError, a WorkerError-like (code string), anything else
            for exc, code, message in ((RolloutError(ErrorCode.UPDATE_FAILED, "bad shapes"), "update_failed",
                                        "bad shapes"),
                                       (RuntimeError("boom"), "internal", "RuntimeError: boom")):
                call = asyncio.ensure_future(channels.call(slot, request(4)))
                await wait_for_update(server.handler, len(server.handler.futures) + 1)
                server.handler.futures[-1].set_exception(exc)
                with pytest.raises(RolloutError) as info:
                    await call
                assert (info.value.code.value, info.value.message) == (code, message)
            with pytest.raises(RolloutError) as info:      # the handler refusing at once
                await channels.call(slot, request(5, mode="refuse"))
            assert (info.value.code, info.value.message) == (ErrorCode.BAD_REQUEST, "refused at once")
        finally:
            channels.close()
    run(scenario())


@pytest.mark.parametrize("change, code, match", [
    ({"version": "2"}, "bad_request", r"^version: must be int, got str$"),
    ({"extra": 1}, "bad_request", r"exactly the keys \['id', 'version', 'mode', 'kv', 'payload'\]"),
    ({"payload": {"manifest": b""}}, "bad_request", r"^payload: CudaIpcPayload.from_wire: must be a map"),
    ({"payload": "dtype"}, "bad_request", r"^payload: CudaIpcPayload.from_wire: must be a map"),
])
def test_malformed_requests_get_bad_request_naming_the_field(server, change, code, match):
    async def scenario():
        ctx = zmq.asyncio.Context()
        client = FastChannelClient(ctx, server.address)
        try:
            _, reply = await client.send({**request(2), **change})
            with pytest.raises(RolloutError) as info:
                await asyncio.wait_for(reply, 10)
            assert info.value.code.value == code
            assert re.search(match, info.value.message), info.value.message
        finally:
            client.close()
            ctx.destroy(linger=0)
    run(scenario())
    assert server.handler.updates == []


def test_a_bad_dtype_name_is_refused_before_the_handler_sees_it(server):
    async def scenario():
        channels = FastChannels(NODE)
        try:
            req = request(2)
            req["payload"]["handles"][0][5] = "float99"
            with pytest.raises(RolloutError) as info:
                await channels.call(slot_for(server.address), req)
            assert info.value.code is ErrorCode.BAD_REQUEST
            assert "handles[0][5] (dtype): must be a torch dtype's name, got 'float99'" in info.value.message
        finally:
            channels.close()
    run(scenario())
    assert server.handler.updates == []


def test_a_call_fails_as_soon_as_its_worker_is_dead_or_the_pool_shuts_down(server):
    async def scenario():
        channels = FastChannels(NODE)
        try:
            for end, code in (("died", ErrorCode.WORKER_DIED), ("shutdown", ErrorCode.UNAVAILABLE)):
                slot = slot_for(server.address)
                call = asyncio.ensure_future(channels.call(slot, request(2)))
                await wait_for_update(server.handler, len(server.handler.futures) + 1)
                t0 = time.monotonic()
                if end == "died":
                    slot.actor.death.set_result(None)     # what Supervisor.worker_died does
                else:
                    slot.actor.death.cancel()             # what Supervisor.stop does
                with pytest.raises(RolloutError) as info:
                    await call
                assert info.value.code is code and time.monotonic() - t0 < 1.0
                assert slot.actor.inflight == 0
                with pytest.raises(RolloutError) as info:  # and at once for the next call
                    await channels.call(slot, request(3))
                assert info.value.code is ErrorCode.WORKER_DIED
            server.handler.futures[0].set_result({"version": 2})   # a late reply is dropped, nothing breaks
            channels.timeout_s = 0.2
            with pytest.raises(RolloutError, match="did not answer a weight update .* within 0.2 s") as info:
                await channels.call(slot_for(server.address), request(4))
            assert info.value.code is ErrorCode.UNAVAILABLE
        finally:
            channels.close()
    run(scenario())


def test_only_a_reachable_channel_is_used(server, tmp_path):
    async def scenario():
        channels = FastChannels(NODE)
        assert channels.reachable(slot_for(server.address).actor) == server.address
        assert channels.reachable(slot_for(server.address, node="node-b").actor) is None   # ipc is node-local
        assert channels.reachable(slot_for(f"ipc://{tmp_path}/gone.sock").actor) is None
        assert channels.reachable(slot_for(None).actor) is None
        assert channels.reachable(slot_for("tcp://127.0.0.1:5555").actor) is None
    run(scenario())


def test_close_stops_the_thread_and_removes_the_socket():
    srv = FastChannelServer(Handler(), name="worker-9")
    path, thread = srv.path, srv._thread
    assert thread.is_alive() and os.path.exists(path)
    t0 = time.monotonic()
    srv.close()
    assert time.monotonic() - t0 < 1.0             # woken, not a poll timeout away
    assert not thread.is_alive() and not os.path.exists(path) and not os.path.exists(os.path.dirname(path))
    srv.close()                                     # twice: nothing happens


# ---------------------------------------------------------------- through a RolloutPool (local Ray, one CPU worker)
@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    pytest.importorskip("ray")
    model = make_tiny_model("qwen2", tmp_path_factory.mktemp("fast") / "a", seed=5)
    with local_pool(EngineConfig(model=str(model), num_kv_blocks=64, block_size=8, max_model_len=64), 1) as p:
        yield p


def socket_of(pool) -> str:
    address = pool.worker_info[0]["fast_address"]
    assert address.startswith("ipc://")
    return address[len("ipc://"):]


def ipc_error(pool, version=1) -> RolloutError:
    with pytest.raises(RolloutError) as info:
        pool.update_weights_from_ipc_blocking(payload(version), timeout_s=60)
    return info.value


def test_a_pools_ipc_update_goes_over_the_fast_channel_with_the_ray_paths_errors(pool):
    assert os.path.exists(socket_of(pool))
    before = pool._fast.calls
    fast = ipc_error(pool)        # on CPU the engine cannot map IPC handles: every worker rejects the update
    assert pool._fast.calls == before + 1
    assert fast.code is ErrorCode.UPDATE_FAILED and "CudaIpcLoader needs CUDA" in fast.message
    slot = pool._slots[0]
    info = slot.actor.info
    slot.actor.info = {**info, "fast_address": None}   # a worker without a channel: through Ray
    try:
        ray_path = ipc_error(pool)
    finally:
        slot.actor.info = info
    assert pool._fast.calls == before + 1
    assert (ray_path.code, ray_path.message) == (fast.code, fast.message)
    assert pool.version == 0 and pool._sync(pool.health(), 30)["ok"]


def test_a_worker_killed_during_a_fast_call_fails_it_and_its_restart_gets_a_new_channel(pool):
    slot = pool._slots[0]
    old_path, pid = socket_of(pool), pool.worker_info[0]["pid"]
    os.kill(pid, signal.SIGSTOP)           # frozen: the call is in flight and stays there
    try:
        call = asyncio.run_coroutine_threadsafe(pool._fast.call(slot, request(1)), pool._loop)
        deadline = time.monotonic() + 10
        while slot.actor.inflight == 0:
            assert time.monotonic() < deadline and not call.done()
            time.sleep(0.005)
    finally:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(RolloutError) as info:
        call.result(30)
    latency = time.monotonic() - killed
    assert info.value.code is ErrorCode.WORKER_DIED and latency < 10, (info.value, latency)
    assert not os.path.exists(os.path.dirname(old_path))   # the pool removed what the killed worker left
    deadline = time.monotonic() + 90
    while not pool._sync(pool.health(), 30)["ok"]:
        assert time.monotonic() < deadline, "the worker did not come back"
        time.sleep(0.2)
    new_path = socket_of(pool)
    assert new_path != old_path and os.path.exists(new_path) and pool.worker_info[0]["pid"] != pid
    before = pool._fast.calls
    err = ipc_error(pool)                   # the new actor answers over its own channel
    assert pool._fast.calls == before + 1 and err.code is ErrorCode.UPDATE_FAILED
    print(f"a fast call failed {latency:.2f} s after its worker was killed")


def test_closing_the_pool_stops_the_channel_and_removes_its_socket(pool):
    path = socket_of(pool)
    pool.close()
    pool._thread.join(10)
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))
    assert pool._fast._clients == {} and pool._fast._ctx is None
