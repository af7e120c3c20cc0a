"""Same-node CUDA IPC: the trainer packs buckets into its own GPU memory and hands out IPC handles; the engine
maps those buffers (no copy through the host) and copies from them into its parameters.

    trainer process                                 engine process (same node)
    sender = CudaIpcSender()
    payload = sender.pack(model.named_parameters()) ──(pickle: Ray / Queue / pipe)──> CudaIpcLoader(payload)
    ... wait until the engine has applied it ...                                      engine applies, closes
    sender.release()   # frees the bucket buffers

The payload is small (handles and a manifest). The sender keeps every bucket alive until ``release``, so an update
costs one extra copy of the weights' bytes in trainer GPU memory while it is in flight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from weight_sync.base import DEFAULT_BUCKET_BYTES, Manifest
from weight_sync.buckets import BucketPlan, NamedTensors, named_tensor_list, pack_bucket, plan_buckets, unpack_bucket

# Position of the device index among ``rebuild_cuda_tensor``'s arguments (torch.multiprocessing.reductions).
_DEVICE_ARG = 6


def _require_cuda(who: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"{who} needs CUDA (same-node GPU IPC); this machine has none. "
                           "Use the 'distributed' (gloo), 'ray' or 'state_dict' loaders on CPU.")


@dataclass(frozen=True)
class CudaIpcPayload:
    """What crosses the process boundary: the manifest JSON and one ``(rebuild_fn, args)`` per bucket."""

    manifest: bytes
    handles: tuple


class CudaIpcSender:
    def __init__(self, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, device: torch.device | str | None = None) -> None:
        _require_cuda("CudaIpcSender")
        self.bucket_bytes = bucket_bytes
        self.device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        self._buffers: list[torch.Tensor] = []

    def pack(self, named_tensors: NamedTensors, *, version: Optional[int] = None) -> CudaIpcPayload:
        """Copy ``named_tensors`` into fresh bucket buffers on this GPU; -> a picklable payload of IPC handles.
        Call ``release`` once every engine that got the payload has closed its loader."""
        from torch.multiprocessing.reductions import reduce_tensor

        self.release()
        tensors = named_tensor_list(named_tensors)
        plan = plan_buckets(tensors, self.bucket_bytes, version)
        by_name = dict(tensors)
        handles = []
        for b, size in enumerate(plan.bucket_sizes):
            buf = torch.empty(size, dtype=torch.uint8, device=self.device)
            pack_bucket(plan, b, by_name, buf)
            self._buffers.append(buf)
            handles.append(reduce_tensor(buf))
        # NOTE: the receiver reads the buffers on its own stream; finish the packing copies before handing out.
        torch.cuda.synchronize(self.device)
        return CudaIpcPayload(plan.to_bytes(), tuple(handles))

    def release(self) -> None:
        self._buffers.clear()


class CudaIpcLoader:
    """Engine side. ``device``: this process's index for the sender's GPU when the two processes number GPUs
    differently (e.g. different ``CUDA_VISIBLE_DEVICES``); default: the index the sender used."""

    def __init__(self, payload: CudaIpcPayload, *, version: Optional[int] = None,
                 device: torch.device | str | int | None = None) -> None:
        _require_cuda("CudaIpcLoader")
        self._payload = payload
        self._plan = BucketPlan.from_bytes(payload.manifest)
        if len(self._plan.bucket_sizes) != len(payload.handles):
            raise ValueError(f"manifest names {len(self._plan.bucket_sizes)} buckets, payload has "
                             f"{len(payload.handles)} handles")
        self.version = version if version is not None else self._plan.version
        self._device_index = device if isinstance(device, int) or device is None else torch.device(device).index

    def names_and_shapes(self) -> Manifest:
        return self._plan.manifest()

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for b, (rebuild, args) in enumerate(self._payload.handles):
            if self._device_index is not None:
                args = (*args[:_DEVICE_ARG], self._device_index, *args[_DEVICE_ARG + 1:])
            yield from unpack_bucket(self._plan, b, rebuild(*args))

    def close(self) -> None:
        self._payload = CudaIpcPayload(self._payload.manifest, ())
