"""Host-time split of an engine run: wrap methods to add their wall time to an accumulator."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


def _timed(obj, name: str, acc: dict, label: str) -> None:
    """Wrap obj.name (an instance attribute shadowing the method) to add its wall time to acc[label]."""
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[label] = acc.get(label, 0.0) + time.perf_counter() - t0
    setattr(obj, name, wrapper)


@contextlib.contextmanager
def timed_methods(targets, acc: dict) -> Iterator[dict]:
    """``targets``: (object, method name[, label]) triples; their wall time accumulates in ``acc`` while inside.
    Nested calls count in both (give each a distinct label)."""
    wrapped = []
    for t in targets:
        obj, name = t[0], t[1]
        if obj is None:
            continue
        _timed(obj, name, acc, t[2] if len(t) > 2 else name)
        wrapped.append((obj, name))
    try:
        yield acc
    finally:
        for obj, name in wrapped:
            delattr(obj, name)
