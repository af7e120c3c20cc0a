"""The ``Environment`` protocol for multi-turn rollouts and the registry that names environments.

An environment speaks token ids, never text: ``reset`` returns the first prompt's ids, ``step`` takes the
model's tokens of one turn and returns the observation ids to append (loss mask 0), a reward and whether
the episode is over. A text environment holds a tokenizer and encodes only what it adds (token in, token
out: the history is never re-tokenized).

Ordering rules (what the server-side agent loop in ``rollout.engine_loop`` guarantees):
- ``reset`` is called once, before any ``step``; ``step`` calls of one episode never overlap, and each one
  gets exactly the tokens the model sampled in that turn (its stop/EOS token included when sampled).
- Calls run on a small thread pool, never on the engine thread: an environment may block (a tool call, a
  sandbox), but different episodes' environments may run concurrently, so share nothing mutable between
  instances without a lock.
- The observation of the step that ends the episode (``done``, or the last allowed turn) is not appended.
- Rewards of all steps are summed into ``Trajectory.reward``.

Registry: ``register_environment(name, factory)``; ``get_environment(name, tokenizer=..., **kwargs)`` calls
``factory(tokenizer=tokenizer, **kwargs)`` (the engine's tokenizer, or None for a model without one) so a
ZeroMQ client can name an environment and pass plain keyword arguments. Built-ins: ``calculator``,
``echo_test``, ``slow_test`` (``rollout.envs``).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Protocol, runtime_checkable


@runtime_checkable
class Environment(Protocol):
    def reset(self, **kwargs: Any) -> list[int]:
        """Start an episode; returns the first prompt's token ids (non-empty)."""

    def step(self, model_token_ids: list[int]) -> tuple[list[int], float, bool]:
        """React to one model turn: (observation token ids, reward, done)."""


EnvironmentFactory = Callable[..., Environment]

_REGISTRY: dict[str, EnvironmentFactory] = {}
_LOCK = threading.Lock()


def register_environment(name: str, factory: EnvironmentFactory, *, replace: bool = False) -> None:
    """Name a factory; it is called as ``factory(tokenizer=..., **kwargs)`` for each episode."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"environment name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"environment factory for {name!r} must be callable")
    with _LOCK:
        if name in _REGISTRY and not replace and _REGISTRY[name] is not factory:
            raise ValueError(f"environment {name!r} is already registered (pass replace=True)")
        _REGISTRY[name] = factory


def _ensure_builtins() -> None:
    import rollout.envs  # noqa: F401  (registers the built-in environments on import)


def get_environment(name: str, *, tokenizer: Any = None, **kwargs: Any) -> Environment:
    """A new environment for one episode. Unknown names raise ValueError listing the known ones; bad
    kwargs raise the factory's TypeError/ValueError."""
    _ensure_builtins()
    with _LOCK:
        factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown environment {name!r}; registered: {available_environments()}")
    return factory(tokenizer=tokenizer, **kwargs)


def available_environments() -> list[str]:
    _ensure_builtins()
    with _LOCK:
        return sorted(_REGISTRY)
