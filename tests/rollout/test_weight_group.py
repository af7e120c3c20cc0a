"""The pool's weight-sync group on local Ray (2 CPUs), two CPU workers, gloo: a trainer process (spawned, rank 0)
pushes weights with ``DistributedSender`` through a group formed by ``RolloutPool.init_weight_sync_group``.

- greedy outputs on both workers equal a fresh engine on the new weights; versions (the pool's, each worker's,
  every token's) are the update's; a refused update is received and dropped, so the trainer's send completes;
- a trainer killed mid-broadcast: every worker keeps serving the old version, the caller gets UPDATE_FAILED
  within the group's timeout, the group is invalid until formed again, and a new group works;
- a worker restarted after a group update cannot rejoin the old group: the group is invalid, the trainer's
  send on it fails at once, the restarted worker is held out of routing until a new group's update lands.

The NCCL path is the same code with the backend chosen by device (tests/weight_sync/test_distributed.py runs
the transport on two GPUs). Tests run in file order and share one pool and one trainer process.
"""
import asyncio
import os
import signal
import time

import pytest

ray = pytest.importorskip("ray")

import torch.multiprocessing as mp  # noqa: E402

from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from rollout.backend import ErrorCode, RolloutError  # noqa: E402
from rollout.trajectory import ENV_VERSION  # noqa: E402
from tests.rollout import _trainer  # noqa: E402
from tests.rollout.pool_helpers import local_pool, tiny_model_pair  # noqa: E402

GREEDY = SamplingParams(max_tokens=4, ignore_eos=True)
GROUP_TIMEOUT_S = 20.0      # the stated bound: a broken broadcast fails within it (at once when a peer is gone)
BUCKET_BYTES = 16 << 10     # several buckets for the tiny model, so a broadcast can be cut half-way
PROMPTS = [[(5 * i + j) % 300 + 2 for j in range(3 + i % 4)] for i in range(6)]


def config(path):
    return EngineConfig(model=str(path), num_kv_blocks=512, block_size=8, max_model_len=128)


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_model_pair(tmp_path_factory.mktemp("group"))


@pytest.fixture(scope="module")
def oracles(models):
    return {"a": LLMEngine(config(models[0])), "b": LLMEngine(config(models[1]))}


@pytest.fixture(scope="module")
def pool(models):
    with local_pool(config(models[0])) as pool:
        yield pool


class Trainer:
    """The spawned trainer process, one command at a time (tests/rollout/_trainer.py)."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.commands, self.answers = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=_trainer.serve, args=(self.commands, self.answers), daemon=True)
        self.process.start()

    def ask(self, *cmd):
        self.commands.put(cmd)

    def answer(self, timeout=120):
        return self.answers.get(timeout=timeout)

    def stop(self) -> None:
        if self.process.is_alive():
            self.ask("exit")
            self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)


@pytest.fixture(scope="module")
def trainer():
    t = Trainer()
    yield t
    t.stop()


def weights(models, name):
    return str(models[0 if name == "a" else 1] / "model.safetensors")


def form_and_join(pool, trainer):
    spec = run(pool.init_weight_sync_group(host="127.0.0.1", timeout_s=GROUP_TIMEOUT_S))
    assert (spec.world_size, spec.backend) == (3, "gloo")
    trainer.ask("join", spec)
    assert trainer.answer() == ("ok", False)          # joined; the trainer's default group was never created
    return spec


def push(pool, trainer, path, sent_version, **kw):
    """The trainer sends ``path`` as ``sent_version`` while the pool applies (``kw``: its arguments);
    -> (the pool's report or error, the trainer's answer)."""
    trainer.ask("send", path, sent_version, BUCKET_BYTES)
    try:
        report = run(pool.update_weights_from_distributed(**kw), timeout=GROUP_TIMEOUT_S + 60)
    except RolloutError as e:
        report = e
    return report, trainer.answer()


def served(pool, oracle, version, workers=(0, 1)):
    """Greedy outputs equal ``oracle``'s, come from ``workers`` and carry ``version`` on every token."""
    async def all_prompts():
        return await asyncio.gather(*(pool.generate(p, GREEDY) for p in PROMPTS * 2))
    trajs = [t[0] for t in run(all_prompts())]
    expected = [c.token_ids for c in oracle.generate(PROMPTS * 2, GREEDY)]
    assert [t.token_ids for t in trajs] == expected
    assert {t.metrics["worker"] for t in trajs} == set(workers)
    assert {v for t in trajs for v in t.versions} == {version}


def group_status(pool):
    return run(pool.stats())["weight_sync_group"]


# ====================================================================== the group manager alone (no Ray)
def test_group_manager_backend_ranks_generations_and_invalidation():
    """``WeightGroups`` with stand-in slots: the backend follows the workers' device (NCCL for CUDA workers:
    the GPU path is this same code), ranks are 1..N in slot order, every form is a new generation, a member's
    death or a failed join invalidates the group and makes the live members leave, and an invalid group is
    refused at once."""
    from rollout.pool_slots import Incarnation, Slot
    from rollout.weight_group import WeightGroups
    from weight_sync import backend_for

    async def scenario():
        loop = asyncio.get_running_loop()
        slots = [Slot(i, Incarnation(None, loop.create_future()), asyncio.Event()) for i in range(2)]
        calls, joined = [], loop.create_future()

        async def call(slot, method, *args):
            calls.append((slot.index, method, args))
            if method == "join_weight_group":
                await joined
                if slot.index == 1 and joined.result() == "fail":
                    raise RolloutError(ErrorCode.UNAVAILABLE, "could not join")
        groups = WeightGroups("test-pool", call, backend_for("cuda"))
        spec = groups.form(slots, "10.0.0.1", 29500, None, 30.0)
        assert (spec.backend, spec.world_size, spec.host, spec.port) == ("nccl", 3, "10.0.0.1", 29500)
        await asyncio.sleep(0)
        assert [(i, m, a[1:]) for i, m, a in calls] == [(0, "join_weight_group", (1, 1)),
                                                          (1, "join_weight_group", (2, 1))]
        with pytest.raises(RolloutError) as info:
            groups.form(slots, "10.0.0.1", 29500, "gloo", float("nan"))
        assert info.value.code is ErrorCode.BAD_REQUEST and "timeout_s" in info.value.message
        assert groups.current.generation == 1 and groups.current.invalid is None     # a bad form changes nothing
        joined.set_result("ok")
        group = await groups.ready()
        assert group.slots == slots and groups.status()["valid"]
        calls.clear()
        assert groups.member_lost(slots[0], Incarnation(None, loop.create_future())) == []   # not a member
        assert groups.status()["valid"]
        slots[0].actor.death.set_result(None)
        await asyncio.gather(*groups.member_lost(slots[0], slots[0].actor))
        assert groups.status()["invalid_reason"] == "worker 0 died"
        assert calls == [(1, "leave_weight_group", (1,))]                           # only the live member
        with pytest.raises(RolloutError) as info:
            await groups.ready()
        assert info.value.code is ErrorCode.UPDATE_FAILED and "worker 0 died" in info.value.message
        # A new generation; one member cannot join: the group is invalid and says who and why.
        slots[0].actor = Incarnation(None, loop.create_future())
        joined = loop.create_future()
        spec = groups.form(slots, "10.0.0.1", 29501, "gloo", 30.0)
        assert spec.backend == "gloo" and spec.group_name.endswith("/g2") and groups.current.generation == 2
        joined.set_result("fail")
        with pytest.raises(RolloutError) as info:
            await groups.ready()
        assert "worker 1 could not join: could not join" in info.value.message
        # CPU workers cannot form an NCCL group.
        cpu_groups = WeightGroups("test-pool", call, backend_for("cpu"))
        with pytest.raises(RolloutError) as info:
            cpu_groups.form(slots, "10.0.0.1", 29502, "nccl", 30.0)
        assert info.value.code is ErrorCode.BAD_REQUEST and "CUDA" in info.value.message
    run(scenario())


# ====================================================================== through a real pool
def test_bad_group_requests_get_clear_errors(pool):
    with pytest.raises(RolloutError) as info:
        run(pool.update_weights_from_distributed())
    assert info.value.code is ErrorCode.UPDATE_FAILED and "init_weight_sync_group first" in info.value.message
    for kwargs, field in (({"port": 0}, "port"), ({"port": "29500"}, "port"), ({"host": ""}, "host"),
                          ({"timeout_s": -1.0}, "timeout_s"), ({"backend": "mpi"}, "backend")):
        with pytest.raises(RolloutError) as info:
            run(pool.init_weight_sync_group(**kwargs))
        assert info.value.code is ErrorCode.BAD_REQUEST and field in info.value.message, (kwargs, info.value)
    with pytest.raises(RolloutError) as info:
        run(pool.init_weight_sync_group(backend="nccl"))
    assert info.value.code is ErrorCode.BAD_REQUEST and "CUDA" in info.value.message
    assert group_status(pool) is None and run(pool.health())["ok"]          # nothing was formed or changed


def test_trainer_pushes_weights_through_the_pool_group(pool, trainer, models, oracles):
    form_and_join(pool, trainer)
    sid = run(pool.open_session())
    first = run(pool.step_session(sid, [3, 4, 5], GREEDY))
    report, sent = push(pool, trainer, weights(models, "b"), 1, version=1)
    assert sent[0] == "ok" and report["version"] == 1 and report["num_workers"] == 2, (report, sent)
    assert report["num_bytes"] == sent[1]
    assert pool.version == 1 and [w["version"] for w in run(pool.health())["workers"]] == [1, 1]
    served(pool, oracles["b"], 1)
    # A session that spans the update: its tokens before it carry version 0, after it version 1.
    run(pool.step_session(sid, [6], GREEDY))
    whole = run(pool.close_session(sid))
    assert whole.versions == [0] * 4 + [ENV_VERSION] + [1] * 4 and first.versions == [0] * 4
    # The same layout again (header only): back to model a, at version 2.
    report, sent = push(pool, trainer, weights(models, "a"), 2)       # version: the pool's + 1
    assert sent[0] == "ok" and report["version"] == 2, (report, sent)
    served(pool, oracles["a"], 2)
    # Refused by the pool (the version does not grow): received and dropped, the trainer is not left blocked,
    # nothing changes, and the group stays usable.
    report, sent = push(pool, trainer, weights(models, "b"), 3, version=2)
    assert isinstance(report, RolloutError) and report.code is ErrorCode.BAD_REQUEST and sent[0] == "ok"
    assert group_status(pool)["valid"] and pool.version == 2
    served(pool, oracles["a"], 2)
    # The trainer's header says another version than the pool applies: every worker drops it (no silent
    # mislabelling of the tokens), and a failed group update invalidates the group.
    report, sent = push(pool, trainer, weights(models, "b"), 5, version=3)
    assert isinstance(report, RolloutError) and report.code is ErrorCode.UPDATE_FAILED and sent[0] == "ok"
    assert "the trainer sent version 5 but the pool applies version 3" in report.message
    assert pool.version == 2 and not group_status(pool)["valid"]
    served(pool, oracles["a"], 2)


def test_trainer_killed_mid_broadcast_leaves_every_worker_on_the_old_version(pool, trainer, models, oracles):
    spec = run(pool.init_weight_sync_group(host="127.0.0.1", timeout_s=GROUP_TIMEOUT_S))
    assert group_status(pool)["generation"] == 2 and group_status(pool)["valid"]
    pending = pool.start_update_from_distributed(version=3)   # the workers wait for the trainer (sync API)
    ctx = mp.get_context("spawn")
    joined = ctx.Queue()
    dying = ctx.Process(target=_trainer.join_and_die_mid_send,
                        args=(spec, weights(models, "b"), 3, 2, BUCKET_BYTES, joined))
    dying.start()
    try:
        joined_at = joined.get(timeout=120)
        with pytest.raises(RolloutError) as info:
            pending.result(timeout=GROUP_TIMEOUT_S + 60)
        failed_s = time.time() - joined_at                  # from the trainer's join: its header and 2 buckets
        dying.join(30)
        assert dying.exitcode == 1                                           # it died mid-update
    finally:
        if dying.is_alive():
            dying.kill()
            dying.join(10)
    assert info.value.code is ErrorCode.UPDATE_FAILED
    assert "every worker rejected version 3 and keeps serving version 2" in info.value.message, info.value.message
    assert failed_s < GROUP_TIMEOUT_S, failed_s
    health = run(pool.health())
    assert health["ok"] and pool.version == 2 and [w["version"] for w in health["workers"]] == [2, 2]
    served(pool, oracles["a"], 2)                                            # old weights, old version, bitwise
    status = group_status(pool)
    assert not status["valid"] and "the update to version 3 failed" in status["invalid_reason"]
    t0 = time.monotonic()
    with pytest.raises(RolloutError) as info:                                # refused at once, no waiting
        run(pool.update_weights_from_distributed(version=3))
    assert info.value.code is ErrorCode.UPDATE_FAILED and "form a new one" in info.value.message
    assert time.monotonic() - t0 < 5.0
    # A new group (generation 4) with the live trainer: the update lands.
    form_and_join(pool, trainer)
    report, sent = push(pool, trainer, weights(models, "b"), 3, version=3)
    assert sent[0] == "ok" and report["version"] == 3, (report, sent)
    served(pool, oracles["b"], 3)
    print(f"trainer killed mid-broadcast: the pool's update failed {failed_s:.2f} s after the trainer joined "
          f"(bound: the group timeout, {GROUP_TIMEOUT_S} s)")


def test_restarted_worker_cannot_rejoin_an_old_group(pool, trainer, models, oracles):
    assert group_status(pool)["valid"] and pool.version == 3
    pids = {w["worker"]: w["pid"] for w in run(pool.health())["workers"]}
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        w0 = run(pool.health())["workers"][0]
        if w0["restarts"] == 1 and w0["awaiting_weights"]:
            break
        assert time.monotonic() < deadline and not w0["failed"], w0
        time.sleep(0.5)
    assert "came through the weight-sync group, which cannot be replayed" in w0["awaiting_weights"]
    status = group_status(pool)
    assert not status["valid"] and status["invalid_reason"] == "worker 0 died"
    # The old group is gone for everyone: the trainer's send on it fails at once, the pool refuses at once.
    t0 = time.monotonic()
    trainer.ask("send", weights(models, "a"), 4, BUCKET_BYTES)
    answer = trainer.answer(timeout=GROUP_TIMEOUT_S + 30)
    assert answer[0] == "error" and time.monotonic() - t0 < GROUP_TIMEOUT_S, answer
    with pytest.raises(RolloutError) as info:
        run(pool.update_weights_from_distributed(version=4))
    assert info.value.code is ErrorCode.UPDATE_FAILED and "worker 0 died" in info.value.message
    # Meanwhile the restarted worker (at its own weights) is never routed to; worker 1 serves version 3.
    served(pool, oracles["b"], 3, workers=(1,))
    assert run(pool.stats())["inconsistent"] is False
    # A new group includes the restarted worker; its update brings both to version 4.
    spec = form_and_join(pool, trainer)
    assert group_status(pool)["workers"] == [0, 1] and spec.world_size == 3
    report, sent = push(pool, trainer, weights(models, "a"), 4, version=4)
    assert sent[0] == "ok" and report["num_workers"] == 2, (report, sent)
    health = run(pool.health())
    assert health["ok"] and [w["version"] for w in health["workers"]] == [4, 4]
    assert all(w["awaiting_weights"] is None for w in health["workers"])
    served(pool, oracles["a"], 4)
    # Destroyed by the caller: both live members leave (closing their connections), so a trainer still sending
    # on the group fails at once rather than after the group timeout.
    run(pool.destroy_weight_sync_group())
    assert group_status(pool)["invalid_reason"] == "destroyed by destroy_weight_sync_group"
    t0 = time.monotonic()
    trainer.ask("send", weights(models, "b"), 5, BUCKET_BYTES)
    answer = trainer.answer(timeout=GROUP_TIMEOUT_S + 30)
    refused_s = time.monotonic() - t0
    assert answer[0] == "error" and refused_s < 5.0, (answer, refused_s)
    assert pool.version == 4 and run(pool.health())["ok"]
    print(f"trainer's send on a group the pool destroyed failed after {refused_s:.2f} s: {answer[1][:100]}")
