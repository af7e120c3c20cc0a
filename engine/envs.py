"""The one place environment variables are read. Every variable carries the ``ROLLOUT_`` prefix.

    ROLLOUT_CACHE_DIR          where converted models and other caches live (default ~/.cache/rollout)
    ROLLOUT_LOG_LEVEL          logging level name: DEBUG, INFO, WARNING, ERROR, CRITICAL (default WARNING)
    ROLLOUT_ATTENTION_BACKEND  force an attention backend by registry name (default: unset = auto)

Core code never calls ``os.environ``; it takes the few fields it needs from ``envs()`` at the edge
(CLI, engine construction) and passes them down. ``envs()`` reads once per process and caches;
tests that change the environment call ``envs.cache_clear()`` or use ``read_envs(mapping)``.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PREFIX = "ROLLOUT_"
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Envs:
    cache_dir: Path                   # ROLLOUT_CACHE_DIR, user-expanded, absolute
    log_level: str                    # ROLLOUT_LOG_LEVEL, upper case, one of _LOG_LEVELS
    attention_backend: str | None     # ROLLOUT_ATTENTION_BACKEND, lower case; None = choose automatically

    def __post_init__(self) -> None:
        if self.log_level not in _LOG_LEVELS:
            raise ValueError(f"{PREFIX}LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, got {self.log_level!r}")
        if self.attention_backend is not None and not self.attention_backend:
            raise ValueError(f"{PREFIX}ATTENTION_BACKEND must be a backend name or unset, got ''")


def read_envs(environ: Mapping[str, str]) -> Envs:
    """Build ``Envs`` from a mapping (``os.environ`` in production). Empty values count as unset."""

    def get(name: str) -> str | None:
        value = environ.get(PREFIX + name, "").strip()
        return value or None

    cache_dir = Path(get("CACHE_DIR") or "~/.cache/rollout").expanduser().absolute()
    log_level = (get("LOG_LEVEL") or "WARNING").upper()
    backend = get("ATTENTION_BACKEND")
    return Envs(
        cache_dir=cache_dir,
        log_level=log_level,
        attention_backend=backend.lower() if backend else None,
    )


@functools.cache
def envs() -> Envs:
    """The process's settings, read from ``os.environ`` on first call."""
    return read_envs(os.environ)
