"""Triton's interpreter (``TRITON_INTERPRET=1``, how the kernel tests run on the CPU), without its redundant work.

Each launch patches ``triton.language`` onto interpreter functions (``_patch_lang``: ``inspect.getmembers`` over
the language modules) and restores it afterwards. Each call of a ``@triton.jit`` helper from inside a kernel
patches again, although the launch around it already did: about 2 ms a call, a quarter of the kernel tests'
time (triton 3.9). ``skip_nested_patching`` makes such a call skip it when every language module the helper
sees was patched already in this launch (by the launch, or by triton's own code for the first helper that saw
it: those patches are never undone); a call outside a launch goes through triton's own code. What the kernels
compute is unchanged: the same patched functions run.
"""
from __future__ import annotations

import inspect
import sys
import threading


def skip_nested_patching() -> None:
    """Install the shortcut on an imported interpreter (idempotent; nothing happens when triton's internals are
    not the ones this was written for)."""
    interp = sys.modules.get("triton.runtime.interpreter")
    if interp is None or getattr(interp, "_tests_skip_nested_patching", False):
        return
    grid_cls, fn_cls = getattr(interp, "GridExecutor", None), getattr(interp, "InterpretedFunction", None)
    if grid_cls is None or fn_cls is None or not all(hasattr(interp, n) for n in ("_patch_lang", "InterpreterError")):
        return
    import triton.language as tl
    lang_modules = (tl, tl.core)
    launch, device_call = grid_cls.__call__, fn_cls.__call__
    state = threading.local()     # the language modules patched by the launch running on this thread

    def langs_of(fn) -> frozenset:
        return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in lang_modules)

    def patched_launch(self, *args, **kwargs):
        outer = getattr(state, "patched", None)
        state.patched = langs_of(self.fn)
        try:
            return launch(self, *args, **kwargs)
        finally:
            state.patched = outer

    def patched_device_call(self, *args, **kwargs):
        patched = getattr(state, "patched", None)
        if patched is None:
            return device_call(self, *args, **kwargs)
        langs = langs_of(self.fn)
        if not langs <= patched:
            # triton's own call patches what this helper sees (triton.language's jit functions, cdiv, zeros, sum,
            # see triton.language.core): its patches stay for the rest of the launch, so the next calls skip
            state.patched = patched | langs
            return device_call(self, *args, **kwargs)
        fn = self.rewrite()       # what device_call does after its _patch_lang
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interp.InterpreterError(repr(e)) from e

    grid_cls.__call__, fn_cls.__call__ = patched_launch, patched_device_call
    interp._tests_skip_nested_patching = True
