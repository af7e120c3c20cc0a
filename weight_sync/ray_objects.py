"""Named tensors through the Ray object store: the trainer ``put``s flat buckets, engines ``get`` them.

``put_state_dict`` returns ``[manifest_ref, bucket_0_ref, ..., bucket_B-1_ref]``; the manifest object is
``(version, BucketPlan layout JSON bytes)`` and each bucket is a numpy uint8 array (Ray stores numpy zero-copy, so an engine on the
same node reads the bucket straight from shared memory). Pass the list to any number of engines.
"""
from __future__ import annotations

import warnings
from typing import Iterator, Optional

import torch

from weight_sync.base import DEFAULT_BUCKET_BYTES
from weight_sync.buckets import BucketedLoader, BucketPlan, NamedTensors, named_tensor_list, pack_bucket, plan_buckets


def put_state_dict(state_dict: NamedTensors, bucket_bytes: int = DEFAULT_BUCKET_BYTES, *,
                   version: Optional[int] = None, cast: Optional[torch.dtype] = None) -> list:
    """Pack ``state_dict`` (or ``named_parameters()``) into buckets in the object store. -> list of ObjectRefs,
    the manifest first. ``cast``: floating-point tensors are stored in this dtype (the engine's). Needs
    ``ray.init()`` in this process."""
    import numpy as np
    import ray

    tensors = named_tensor_list(state_dict)
    plan = plan_buckets(tensors, bucket_bytes, version, cast=cast)
    by_name = dict(tensors)
    refs = [ray.put((version, plan.to_bytes()))]
    for b, size in enumerate(plan.bucket_sizes):
        arr = np.empty(size, dtype=np.uint8)
        pack_bucket(plan, b, by_name, torch.from_numpy(arr))
        refs.append(ray.put(arr))
        del arr  # the object store holds its own copy
    return refs


class RayObjectLoader(BucketedLoader):
    """Engine side: reads the buckets of ``put_state_dict`` one at a time. Yielded tensors are read-only views of
    object-store memory, valid until the next bucket is fetched."""

    buckets_resident = False     # fetched one by one
    persistent_buffers = False   # a new object per bucket per update

    def __init__(self, refs: list, *, version: Optional[int] = None) -> None:
        if not refs:
            raise ValueError("RayObjectLoader needs the refs put_state_dict returned (manifest first)")
        self._refs = list(refs)
        self._plan: Optional[BucketPlan] = None
        self._version = version
        self._sent_version: Optional[int] = None

    def _get_plan(self) -> BucketPlan:
        if self._plan is None:
            import ray

            head = ray.get(self._refs[0])
            if not (isinstance(head, tuple) and len(head) == 2 and isinstance(head[1], bytes)):
                raise ValueError("RayObjectLoader: the first ref must be put_state_dict's manifest "
                                 "(version, layout bytes)")
            self._sent_version, plan = head[0], BucketPlan.from_bytes(head[1])
            if len(plan.bucket_sizes) != len(self._refs) - 1:
                raise ValueError(f"manifest names {len(plan.bucket_sizes)} buckets, got {len(self._refs) - 1} refs")
            self._plan = plan
        return self._plan

    @property
    def version(self) -> Optional[int]:
        if self._version is not None:
            return self._version
        self._get_plan()
        return self._sent_version

    def bucket_plan(self) -> BucketPlan:
        return self._get_plan()

    def iter_buckets(self) -> Iterator[tuple[int, torch.Tensor]]:
        import ray

        self._get_plan()
        for b, ref in enumerate(self._refs[1:]):
            arr = ray.get(ref)
            with warnings.catch_warnings():
                # NOTE: object-store arrays are read-only; torch warns that writing would be undefined. The
                # engine only reads (copies) them.
                warnings.simplefilter("ignore", UserWarning)
                buf = torch.from_numpy(arr)
            yield b, buf

    def close(self) -> None:
        self._refs = self._refs[:1]  # drop our references to bucket objects so Ray can free them
