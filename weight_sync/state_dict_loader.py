"""``StateDictLoader``: tensors already in this process (a state dict, ``named_parameters()``, a generator)."""
from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Optional, Union

import torch

from weight_sync.base import Manifest


class StateDictLoader:
    """A mapping gives a manifest up front (validated before any write); any other iterable of
    ``(name, tensor)`` pairs is streamed as it comes and has no manifest."""

    def __init__(self, tensors: Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]], *,
                 version: Optional[int] = None) -> None:
        self.version = version
        self._tensors = tensors
        self._consumed = False

    def names_and_shapes(self) -> Optional[Manifest]:
        if not isinstance(self._tensors, Mapping):
            return None
        return {name: (tuple(t.shape), t.dtype) for name, t in self._tensors.items()}

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self._consumed:
            raise RuntimeError("StateDictLoader.iter_tensors called twice; a loader serves one update")
        self._consumed = True
        items = self._tensors.items() if isinstance(self._tensors, Mapping) else self._tensors
        for name, tensor in items:
            yield name, tensor.detach() if isinstance(tensor, torch.Tensor) else tensor

    def close(self) -> None:
        self._tensors = {}
