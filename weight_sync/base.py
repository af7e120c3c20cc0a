"""The checkpoint-loader protocol and the loader registry.

A loader is a single-use source of one weight update: ``(hf_name, tensor)`` pairs plus a version. The engine
(``engine.weight_update.WeightUpdater``) consumes it duck-typed; nothing here imports the engine.

Ordering rules (what a loader may rely on, what the engine guarantees)::

    loader = get_loader("safetensors", path=...)   # construction: cheap, reads no tensor bytes
    loader.names_and_shapes()                      # at most once, before iter_tensors; may block (a
                                                   #   distributed loader receives the sender's manifest here)
    for name, t in loader.iter_tensors(): ...      # at most once; may be abandoned half-way on a failure
    loader.close()                                 # always, exactly once, success or failure

``close`` must leave the other side unblocked: a distributed loader receives (and drops) whatever the sender
still has to send, so a rejected update never hangs the trainer.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Protocol, runtime_checkable

import torch

# hf_name -> (shape, dtype): what an update will carry, known before any tensor byte is read.
Manifest = dict[str, tuple[tuple[int, ...], torch.dtype]]

DEFAULT_BUCKET_BYTES = 256 << 20  # senders pack tensors into flat buffers of about this size


@runtime_checkable
class CheckpointLoader(Protocol):
    """One weight update: named tensors with Hugging Face names, plus the policy version they are.

    ``version``: the policy version of these weights, or None to let the engine number it (previous + 1).
    ``iter_tensors()``: yields ``(hf_name, tensor)`` in any order, each name at most once. A tensor may be on
        any device and in any floating dtype (the engine casts); it may be a read-only view that is only valid
        until the next item is requested, so consumers copy it before asking for the next one.
    ``names_and_shapes()``: the manifest ``{hf_name: (shape, dtype)}`` of exactly the tensors ``iter_tensors``
        will yield, or None when not known up front. When given, the engine validates it whole before reading
        any tensor bytes, and checks that every yielded tensor matches it.
    ``close()``: release files, buffers and peers; idempotent.
    """

    version: Optional[int]

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]: ...

    def names_and_shapes(self) -> Optional[Manifest]: ...

    def close(self) -> None: ...


LoaderFactory = Callable[..., CheckpointLoader]
_REGISTRY: dict[str, LoaderFactory] = {}


def register_loader(name: str, factory: LoaderFactory, *, replace: bool = False) -> None:
    """Make ``get_loader(name, **kwargs)`` call ``factory(**kwargs)``. A name is registered once unless
    ``replace=True`` (so two plugins cannot silently shadow each other)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"loader name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"loader factory for {name!r} must be callable, got {type(factory).__name__}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"a loader named {name!r} is already registered (pass replace=True to override)")
    _REGISTRY[name] = factory


def get_loader(name: str, **kwargs) -> CheckpointLoader:
    """A new loader from the factory registered as ``name``; kwargs go to the factory unchanged (a typo
    raises the factory's TypeError)."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown loader {name!r}; registered: {available_loaders()}") from None
    return factory(**kwargs)


def available_loaders() -> list[str]:
    return sorted(_REGISTRY)
