"""Checkpoint loaders (safetensors, state dict, distributed, CUDA IPC, Ray objects) and trainer-side senders.

Transports of named tensors with Hugging Face names; torch only, nothing of the engine. Loaders follow the
``CheckpointLoader`` protocol (``weight_sync.base``) and are built by name with ``get_loader``; users add their own
with ``register_loader``. See docs/weight_sync.md.
"""
from weight_sync.base import (DEFAULT_BUCKET_BYTES, CheckpointLoader, Manifest, available_loaders, get_loader,
                              register_loader)
from weight_sync.buckets import BucketPlan, plan_buckets
from weight_sync.cuda_ipc import CudaIpcLoader, CudaIpcPayload, CudaIpcSender
from weight_sync.digest import DigestingLoader, DigestMismatch, TensorDigest, digesting
from weight_sync.distributed import (TRAINER_RANK, DistributedLoader, DistributedSender, WeightSyncGroup,
                                    WeightSyncGroupSpec, backend_for, init_weight_sync_group)
from weight_sync.ray_objects import RayObjectLoader, put_state_dict
from weight_sync.safetensors_loader import SafetensorsLoader
from weight_sync.state_dict_loader import StateDictLoader

register_loader("safetensors", SafetensorsLoader)
register_loader("state_dict", StateDictLoader)
register_loader("distributed", DistributedLoader)
register_loader("ray", RayObjectLoader)
register_loader("cuda_ipc", CudaIpcLoader)

__all__ = [
    "DEFAULT_BUCKET_BYTES", "CheckpointLoader", "Manifest", "available_loaders", "get_loader", "register_loader",
    "BucketPlan", "plan_buckets",
    "SafetensorsLoader", "StateDictLoader",
    "DistributedLoader", "DistributedSender", "WeightSyncGroup", "WeightSyncGroupSpec", "init_weight_sync_group",
    "TRAINER_RANK", "backend_for",
    "RayObjectLoader", "put_state_dict",
    "CudaIpcLoader", "CudaIpcPayload", "CudaIpcSender",
    "DigestingLoader", "DigestMismatch", "TensorDigest", "digesting",
]
