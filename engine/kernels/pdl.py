"""Programmatic dependent launch (Hopper and later): let a kernel start while the one before it finishes.

A decode step at batch 1 is a chain of ~170 small kernels; between two of them the GPU drains one grid
and launches the next (a microsecond or two each, more than some of the kernels take). With PDL a kernel
launched with ``launch_pdl=True`` may start as soon as every program of the previous kernel has called
``gdc_launch_dependents`` (ours do it first thing); it then loads what does not depend on the previous
kernel (weights, the step's static inputs) and calls ``gdc_wait``, which returns once the previous grid
has completed and its writes are visible. The rule every kernel here follows under ``USE_PDL``:

    nothing written by an earlier kernel of the step is read, and nothing at all is written, before gdc_wait.

Since each kernel waits for the one before it to complete, and that one waited for its own predecessor,
completion is transitive: after gdc_wait every earlier kernel in the stream is done. Kernels launched the
ordinary way (cuBLAS, torch ops) after one of ours wait for it to complete as usual.

Off on the CPU interpreter, before sm_90, and when this Triton lacks the griddepcontrol ops; ``set_enabled``
switches it off for A/B measurements (graphs captured afterwards use the new setting).
"""
from __future__ import annotations

import logging
from functools import lru_cache

import torch
import triton

logger = logging.getLogger(__name__)

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAVE_GDC = True
except ImportError:  # an older Triton: the kernels are compiled with USE_PDL=False and never reach these
    HAVE_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Use PDL for kernels launched from now on (where supported)."""
    global _enabled
    _enabled = bool(enabled)


@lru_cache(maxsize=None)
def _supported(device_index: int) -> bool:
    major, _ = torch.cuda.get_device_capability(device_index)
    ok = HAVE_GDC and major >= 9
    logger.info("programmatic dependent launch %s on cuda:%d (sm_%d%s)", "on" if ok else "off", device_index,
                major * 10, "" if HAVE_GDC else ", Triton without griddepcontrol")
    return ok


def use_pdl(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device launch with PDL (False on the CPU / interpreter)."""
    if not _enabled or t.device.type != "cuda":
        return False
    return _supported(t.device.index if t.device.index is not None else torch.cuda.current_device())


def launch_options(pdl: bool) -> dict:
    """Extra launch keywords for a kernel compiled with ``USE_PDL=pdl``."""
    return {"launch_pdl": True} if pdl else {}


__all__ = ["HAVE_GDC", "gdc_launch_dependents", "gdc_wait", "launch_options", "set_enabled", "use_pdl"]
