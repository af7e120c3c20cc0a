"""A py-spy-like wall-clock sampler in pure Python: every ``interval_s`` a daemon thread reads every other
thread's current frame (``sys._current_frames``) and counts, per thread name, where it is: the innermost frame
(``leaf``: ``file:function``, followed after ``<-`` by the innermost frame of this repository when they
differ) and the whole stack (``inclusive``: each function once per sample). Time blocked in a Python-level wait
shows up too (``threading.py:wait``, ``selectors.py:select``), which cProfile of one thread's CPU would hide.

NOTE: a thread blocked in C called from our code (``SimpleQueue.get``, a CUDA sync) is sampled at that Python
line, e.g. ``rollout/engine_loop.py:_run`` for the engine loop waiting for commands: read leaves as "where",
not "busy". The sampler needs the GIL to read the frames, so it adds a little to what it measures (1-2 ms
intervals cost a few percent). Counts are samples, i.e. time in units of ``interval_s``.
"""
from __future__ import annotations

import collections
import sys
import threading
from pathlib import Path
from typing import Optional

ROOT = str(Path(__file__).resolve().parents[1])
IDLE_LEAVES = frozenset({"threading.py:wait", "selectors.py:select", "queue.py:get", "thread.py:_worker",
                         "base_events.py:_run_once", "threading.py:_wait_for_tstate_lock", "poll.py:poll"})


def _where(code) -> str:
    path = code.co_filename
    path = path[len(ROOT) + 1:] if path.startswith(ROOT) else path.rsplit("/", 1)[-1]
    return f"{path}:{code.co_name}"


class ThreadSampler:
    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.samples: collections.Counter = collections.Counter()      # thread name -> samples
        self.idle: collections.Counter = collections.Counter()         # ... of those, in an IDLE_LEAVES frame
        self.leaf: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.inclusive: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "ThreadSampler":
        self._thread = threading.Thread(target=self._run, name="thread-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> "ThreadSampler":
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval_s):
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident != me:
                    self._record(names.get(ident, str(ident)), frame)

    def _record(self, name: str, frame) -> None:
        top, leaf, seen = _where(frame.f_code), None, set()
        while frame is not None:
            where = _where(frame.f_code)
            if leaf is None and frame.f_code.co_filename.startswith(ROOT):
                leaf = where
            seen.add(where)
            frame = frame.f_back
        self.samples[name] += 1
        self.idle[name] += top in IDLE_LEAVES
        self.leaf[name][top if leaf in (None, top) else f"{top} <- {leaf}"] += 1
        for where in seen:
            self.inclusive[name][where] += 1

    def report(self, threads: Optional[list[str]] = None, top: int = 12, min_busy: float = 0.01) -> str:
        """Per thread (named with one of ``threads``' prefixes, when given) that was out of an idle wait for at
        least ``min_busy`` of the samples of the longest-lived thread: its top leaf and inclusive entries, in
        percent of that thread's samples."""
        lines = []
        longest = max(self.samples.values(), default=0)
        for name, total in self.samples.most_common():
            if threads is not None and not any(name.startswith(t) for t in threads):
                continue
            if total - self.idle[name] < min_busy * longest:
                continue
            lines.append(f"thread {name}: {total} samples ({total * self.interval_s:.2f} s), "
                         f"{100 * self.idle[name] / total:.0f}% in an idle wait")
            for title, counter in (("leaf (innermost frame <- innermost repository frame)", self.leaf[name]),
                                   ("inclusive", self.inclusive[name])):
                lines.append(f"  {title}:")
                for where, n in counter.most_common(top):
                    lines.append(f"    {100 * n / total:5.1f}%  {where}")
        return "\n".join(lines)
