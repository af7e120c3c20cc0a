"""Watchdog: callbacks fire at their deadlines in order, cancelled ones never do, cancelled entries do not pile
up, and arming a deadline starts no thread per call (what the per-call threading.Timer it replaced did)."""
import threading
import time

from rollout.watchdog import Watchdog


def test_deadlines_fire_in_order_and_cancelled_ones_never():
    dog = Watchdog("test-watchdog")
    fired = []
    done = threading.Event()
    dog.arm(0.15, lambda: (fired.append("late"), done.set()))
    dog.arm(0.05, lambda: fired.append("early"))
    dog.arm(0.10, lambda: fired.append("cancelled")).cancel()
    assert done.wait(5)
    assert fired == ["early", "late"]
    dog.close()


def test_a_failing_callback_does_not_stop_the_others():
    dog = Watchdog("test-watchdog")
    done = threading.Event()
    dog.arm(0.01, lambda: 1 / 0)
    dog.arm(0.02, done.set)
    assert done.wait(5)
    dog.close()


def test_one_thread_for_many_deadlines_and_cancelled_ones_are_compacted():
    dog = Watchdog("test-watchdog")
    before = threading.active_count()
    for _ in range(10_000):
        dog.arm(600.0, lambda: None).cancel()   # what every environment call that returns in time does
    assert threading.active_count() <= before + 1
    assert len(dog._heap) < 200
    dog.close()


def test_close_lets_armed_deadlines_fire_then_the_thread_ends():
    dog = Watchdog("test-watchdog")
    done = threading.Event()
    dog.arm(0.05, done.set)
    dog.close()
    assert done.wait(5), "a deadline armed before close still fires (a hung env call still fails its episode)"
    t0 = time.monotonic()
    while dog._thread is not None and time.monotonic() - t0 < 5:
        time.sleep(0.01)
    assert dog._thread is None
