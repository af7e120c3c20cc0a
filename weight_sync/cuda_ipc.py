"""Same-node CUDA IPC: the trainer packs buckets into its own GPU memory and hands out IPC handles; the engine
maps those buffers (no copy through the host) and copies from them into its parameters.

    trainer process                                 engine process (same node)
    sender = CudaIpcSender()
    payload = sender.pack(model.named_parameters()) ──(pickle: Ray / Queue / pipe)──> CudaIpcLoader(payload)
    ... wait until the engine has applied it ...                                      engine applies, closes
    (next update: sender.pack(...) again, same buffers)
    sender.release()   # at the end: frees the bucket buffers

The payload is small (handles and a layout). The buffers are persistent: while the bucket sizes stay the same
(every update of one model), ``pack`` refills the same buffers and hands out the same handles, and the engine keeps
them mapped across updates (``_MAPPINGS``), so a steady-state update opens no handle, parses no manifest and
validates no name: the engine's whole cost is the copy of the bytes (one multi-tensor copy per bucket). All buckets
are mapped before the first write, so the engine needs no rollback copy (``buckets_resident``).

Contract: ``pack`` overwrites the previous update's buffers, so call it only after every engine has applied (closed)
the previous payload; ``CudaIpcLoader.close`` synchronizes the engine's stream, so "closed" means "done reading".
The sender's buffers cost one extra copy of the weights' bytes in trainer GPU memory.

On the wire without pickle: ``payload.to_wire()`` is a dict of plain msgpack values (the handles' classes and dtypes
by name) and ``CudaIpcPayload.from_wire(d)`` rebuilds it from allow-lists only, checking every field (a ValueError
naming the field otherwise): what ``rollout.fast_channel`` sends.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from weight_sync.base import DEFAULT_BUCKET_BYTES
from weight_sync.buckets import BucketedLoader, BucketPlan, NamedTensors, named_tensor_list, pack_bucket, plan_buckets

# Position of the device index among ``rebuild_cuda_tensor``'s arguments (torch.multiprocessing.reductions).
_DEVICE_ARG = 6
# ``reduce_tensor(cuda_tensor)`` -> (rebuild_cuda_tensor, args): the 15 arguments, by name, and what each is on the
# wire. Checked against torch 2.13's torch/multiprocessing/reductions.py; the layout (dtype at 5) is the same in the
# torch 2.x releases whose source was read (2.11 included), and to_wire / from_wire refuse any other arity.
_HANDLE_FIELDS = (("tensor_cls", "tensor_cls"), ("tensor_size", "size"), ("tensor_stride", "ints"),
                  ("tensor_offset", "int"), ("storage_cls", "storage_cls"), ("dtype", "dtype"),
                  ("storage_device", "int"), ("storage_handle", "bytes?"), ("storage_size_bytes", "int"),
                  ("storage_offset_bytes", "int"), ("requires_grad", "bool"), ("ref_counter_handle", "bytes?"),
                  ("ref_counter_offset", "int"), ("event_handle", "bytes?"), ("event_sync_required", "bool"))
_TENSOR_CLASSES = {"torch.Tensor": torch.Tensor, "torch.nn.Parameter": torch.nn.Parameter}
_STORAGE_CLASSES = {"torch.TypedStorage": torch.storage.TypedStorage, "torch.UntypedStorage": torch.UntypedStorage}
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_WIRE_KEYS = ("manifest", "handles", "version", "sender_id", "generation", "device_uuid")
# A sender reuses its buffers (and their handles) push after push: the wire form of the handles is encoded once
# per handles tuple (id -> (the tuple, its encoding); the tuple is kept, so its id is not reused). A few senders'.
_WIRE_CACHE_SIZE = 4
_WIRE_HANDLES: dict[int, tuple[tuple, list]] = {}
# The receiver's side: the last handle lists decoded, by (sender_id, generation, device_uuid) -> (the list packed
# with msgpack, its decoded tuple). A sender reusing its buffers sends equal lists every push; packing one again
# and comparing the bytes costs tens of microseconds against ~0.6 ms to check and rebuild every field (8B: 67
# buckets x 13 fields; H200, 2026-12-04). The bytes are type-exact (1 and True, 1 and 1.0 pack differently), so
# only a list that would decode to the same handles reuses them; anything else is decoded and checked afresh.
_DECODED_HANDLES: dict[tuple, tuple[bytes, tuple]] = {}


def _require_cuda(who: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"{who} needs CUDA (same-node GPU IPC); this machine has none. "
                           "Use the 'distributed' (gloo), 'ray' or 'state_dict' loaders on CPU.")


@dataclass(frozen=True)
class CudaIpcPayload:
    """What crosses the process boundary: the layout JSON, one ``(rebuild_fn, args)`` per bucket, the version, and
    which buffer set of which sender the handles belong to (``sender_id``, ``generation``: equal pairs = the same
    buffers, already mapped by an engine that saw them before)."""

    manifest: bytes
    handles: tuple
    version: Optional[int] = None
    sender_id: str = ""
    generation: int = 0
    device_uuid: str = ""    # the GPU holding the buffers: a receiver finds its own index for it by this

    def to_wire(self) -> dict:
        """Plain msgpack values: every handle must be ``reduce_tensor``'s of a CUDA tensor (ValueError otherwise)."""
        try:
            return self._to_wire()
        except ValueError as e:
            raise ValueError(f"CudaIpcPayload.to_wire: {e}") from None

    @classmethod
    def from_wire(cls, d: object) -> "CudaIpcPayload":
        """``to_wire``'s dict (after msgpack) back to a payload, classes and dtypes from allow-lists; a ValueError
        naming the first bad field."""
        try:
            return cls._from_wire(d)
        except ValueError as e:
            raise ValueError(f"CudaIpcPayload.from_wire: {e}") from None

    def _to_wire(self) -> dict:
        cached = _WIRE_HANDLES.get(id(self.handles))
        if cached is not None and cached[0] is self.handles:   # a sender's reused buffers: encoded once
            handles = cached[1]
        else:
            handles = self._encode_handles()
            if len(_WIRE_HANDLES) >= _WIRE_CACHE_SIZE:
                _WIRE_HANDLES.pop(next(iter(_WIRE_HANDLES)))
            _WIRE_HANDLES[id(self.handles)] = (self.handles, handles)
        return {"manifest": self.manifest, "handles": handles, "version": self.version, "sender_id": self.sender_id,
                "generation": self.generation, "device_uuid": self.device_uuid}

    def _encode_handles(self) -> list:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor
        handles = []
        for b, handle in enumerate(self.handles):
            if not (isinstance(handle, tuple) and len(handle) == 2 and handle[0] is rebuild_cuda_tensor):
                raise ValueError(f"handles[{b}]: not a (rebuild_cuda_tensor, args) pair of a CUDA tensor")
            args = handle[1]
            if type(args) is not tuple or len(args) != len(_HANDLE_FIELDS):
                _check_arity(args, f"handles[{b}]", tuple)
            handles.append(_encode_handle(args, b))
        return handles

    @classmethod
    def _from_wire(cls, d: object) -> "CudaIpcPayload":
        from torch.multiprocessing.reductions import rebuild_cuda_tensor
        if not isinstance(d, dict) or set(d) != set(_WIRE_KEYS):
            keys = sorted(map(str, d)) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"must be a map with exactly the keys {list(_WIRE_KEYS)}, got {keys}")
        _expect(d["manifest"], bytes, "manifest")
        _expect(d["sender_id"], str, "sender_id")
        _expect(d["device_uuid"], str, "device_uuid")
        _expect(d["generation"], int, "generation")
        if d["version"] is not None:
            _expect(d["version"], int, "version")
        wire_handles = _expect(d["handles"], list, "handles")
        key = (d["sender_id"], d["generation"], d["device_uuid"])
        packed = _pack_handles(wire_handles)
        cached = _DECODED_HANDLES.get(key)
        if cached is not None and packed is not None and cached[0] == packed:
            handles = cached[1]
        else:
            decoded = []
            for b, args in enumerate(wire_handles):
                if type(args) is not list or len(args) != len(_HANDLE_FIELDS):
                    _check_arity(args, f"handles[{b}]", list)
                decoded.append((rebuild_cuda_tensor, _decode_handle(args, b)))
            handles = tuple(decoded)
            _DECODED_HANDLES.pop(key, None)
            if packed is not None:
                if len(_DECODED_HANDLES) >= _WIRE_CACHE_SIZE:
                    _DECODED_HANDLES.pop(next(iter(_DECODED_HANDLES)))
                _DECODED_HANDLES[key] = (packed, handles)
        return cls(d["manifest"], handles, d["version"], d["sender_id"], d["generation"], d["device_uuid"])


def _pack_handles(wire_handles: list) -> Optional[bytes]:
    """The handle lists as msgpack bytes (the cache's exact key), or None when they are not plain msgpack values
    (then the field checks name what is wrong)."""
    import msgpack
    try:
        return msgpack.packb(wire_handles, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return None


def _expect(x: object, typ: type, field: str) -> object:
    if not isinstance(x, typ) or (typ is int and isinstance(x, bool)):
        raise ValueError(f"{field}: must be {typ.__name__}, got {type(x).__name__}")
    return x


def _check_arity(args: object, field: str, typ: type) -> object:
    if not isinstance(args, typ) or len(args) != len(_HANDLE_FIELDS):
        got = f"{len(args)} items" if isinstance(args, (list, tuple)) else type(args).__name__
        raise ValueError(f"{field}: rebuild_cuda_tensor takes {len(_HANDLE_FIELDS)} arguments "
                         f"({', '.join(n for n, _ in _HANDLE_FIELDS)}) in a {typ.__name__}, got {got}; a torch "
                         f"whose CUDA IPC layout differs from this code's? (torch {torch.__version__} here)")
    return args


# kind -> the names a class or dtype travels by (the receiver rebuilds only these)
_BY_NAME = {"tensor_cls": _TENSOR_CLASSES, "storage_cls": _STORAGE_CLASSES, "dtype": _DTYPES}
_PLAIN = {"int": int, "bool": bool, "bytes?": bytes}


def _encode_arg(kind: str, x: object, field: str) -> object:
    if kind in _BY_NAME:
        names = [n for n, v in _BY_NAME[kind].items() if v is x]
        if not names:
            raise ValueError(f"{field}: {x!r} has no wire name (allowed: {sorted(_BY_NAME[kind])})")
        return names[0]
    if kind in ("size", "ints"):
        if not isinstance(x, (tuple, list)):
            raise ValueError(f"{field}: must be a tuple of ints, got {type(x).__name__}")
        return [_expect(n, int, field) for n in x]
    if kind == "bytes?" and x is None:
        return None
    return _expect(x, _PLAIN[kind], field)


_BAD = object()
# kind -> {class or dtype: the name it travels by}: the first allowed name, as _encode_arg picks it
_NAME_OF = {kind: {v: n for n, v in reversed(list(table.items()))} for kind, table in _BY_NAME.items()}


def _encode_fast(kind: str, x: object) -> object:
    """``_encode_arg`` without a field name: the wire value, or ``_BAD`` (the caller asks ``_encode_arg`` why).
    Field names are formatted only on failure, as in ``_decode_fast``: formatting ~960 of them per push of an
    8B model was most of the pool's own time in an IPC update."""
    names = _NAME_OF.get(kind)
    if names is not None:
        try:
            return names.get(x, _BAD)
        except TypeError:   # unhashable
            return _BAD
    if kind == "size" or kind == "ints":
        if not isinstance(x, (tuple, list)) or not all(type(n) is int for n in x):
            return _BAD
        return list(x)
    if kind == "bytes?":
        return x if x is None or type(x) is bytes else _BAD
    return x if type(x) is _PLAIN[kind] else _BAD


def _encode_handle(args: tuple, b: int) -> list:
    out = []
    for i, (name, kind) in enumerate(_HANDLE_FIELDS):
        v = _encode_fast(kind, args[i])
        if v is _BAD:   # the checked path: raises naming the field, or accepts what the fast one would not
            v = _encode_arg(kind, args[i], f"handles[{b}][{i}] ({name})")
        out.append(v)
    return out


def _decode_fast(kind: str, x: object) -> object:
    """``_decode_arg`` without a field name: the value, or ``_BAD`` (the caller asks ``_decode_arg`` why). Field
    names are formatted only on failure: a push of an 8B model carries ~64 handles of 15 fields, and building
    their names took most of the decode (1.6 ms on an H200 host)."""
    table = _BY_NAME.get(kind)
    if table is not None:
        return table.get(x, _BAD) if type(x) is str else _BAD
    if kind == "size" or kind == "ints":
        if type(x) is not list or not all(type(n) is int for n in x):
            return _BAD
        return torch.Size(x) if kind == "size" else tuple(x)
    if kind == "bytes?":
        return x if x is None or type(x) is bytes else _BAD
    return x if type(x) is _PLAIN[kind] else _BAD   # exact types: a bool is not an int here


def _decode_handle(args: list, b: int) -> tuple:
    out = []
    for i, (name, kind) in enumerate(_HANDLE_FIELDS):
        v = _decode_fast(kind, args[i])
        if v is _BAD:
            _decode_arg(kind, args[i], f"handles[{b}][{i}] ({name})")   # raises, naming the field
            raise ValueError(f"handles[{b}][{i}] ({name}): bad value {args[i]!r}")   # a type _decode_arg allows
        out.append(v)
    return tuple(out)


def _decode_arg(kind: str, x: object, field: str) -> object:
    if kind in _BY_NAME:
        table = _BY_NAME[kind]
        if not isinstance(x, str) or x not in table:
            allowed = "a torch dtype's name" if kind == "dtype" else f"one of {sorted(table)}"
            raise ValueError(f"{field}: must be {allowed}, got {x!r}")
        return table[x]
    if kind in ("size", "ints"):
        ints = tuple(_expect(n, int, field) for n in _expect(x, list, field))
        return torch.Size(ints) if kind == "size" else ints
    if kind == "bytes?" and x is None:
        return None
    return _expect(x, _PLAIN[kind], field)


class CudaIpcSender:
    def __init__(self, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, device: torch.device | str | None = None,
                 cast: Optional[torch.dtype] = None) -> None:
        """``cast``: send floating-point tensors in this dtype (the engine's), converted while packing."""
        _require_cuda("CudaIpcSender")
        self.bucket_bytes = bucket_bytes
        self.cast = cast
        self.device = torch.device(device if device is not None else "cuda")
        if self.device.index is None:   # "cuda": the current device, by index (its UUID goes in every payload)
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.device_uuid = gpu_uuid(self.device.index)
        self.sender_id = uuid.uuid4().hex
        self.generation = 0
        self._buffers: list[torch.Tensor] = []
        self._handles: tuple = ()

    def pack(self, named_tensors: NamedTensors, *, version: Optional[int] = None) -> CudaIpcPayload:
        """Copy ``named_tensors`` into this sender's bucket buffers on its GPU (reused while the bucket sizes stay
        the same); -> a picklable payload of IPC handles. Call it again only once every engine that got the
        previous payload has closed its loader; ``release`` frees the buffers."""
        from torch.multiprocessing.reductions import reduce_tensor

        tensors = named_tensor_list(named_tensors)
        plan = plan_buckets(tensors, self.bucket_bytes, version, cast=self.cast)
        if tuple(b.numel() for b in self._buffers) != plan.bucket_sizes:
            self.release()
            self._buffers = [torch.empty(size, dtype=torch.uint8, device=self.device) for size in plan.bucket_sizes]
            self._handles = tuple(reduce_tensor(buf) for buf in self._buffers)
            self.generation += 1
        by_name = dict(tensors)
        for b, buf in enumerate(self._buffers):
            pack_bucket(plan, b, by_name, buf)
        # NOTE: the receiver reads the buffers on its own stream; finish the packing copies before handing out.
        torch.cuda.synchronize(self.device)
        return CudaIpcPayload(plan.to_bytes(), self._handles, version, self.sender_id, self.generation,
                              self.device_uuid)

    def release(self) -> None:
        """Free the buffers (engines still mapping them keep the memory until they map a newer set or unmap)."""
        self._buffers = []
        self._handles = ()


def gpu_uuid(index: int) -> str:
    """The GPU's UUID, the same in every process whatever CUDA_VISIBLE_DEVICES numbers it as."""
    return str(torch.cuda.get_device_properties(index).uuid)


def local_index_of(device_uuid: str) -> int:
    """This process's CUDA index for the GPU ``device_uuid``; ValueError naming both sides if it sees no such GPU
    (the sender's buffers are on a GPU this process cannot map: CUDA IPC needs the same GPU)."""
    seen = [gpu_uuid(i) for i in range(torch.cuda.device_count())]
    if device_uuid not in seen:
        raise ValueError(f"CUDA IPC: the sender's buffers are on GPU {device_uuid}, which this process does not see "
                         f"(it sees {seen}); IPC updates need a receiver on the sender's GPU (colocated), "
                         "use a broadcast (update_weights_from_distributed) or the object store otherwise")
    return seen.index(device_uuid)


# (sender_id, generation, device index) -> mapped bucket tensors, kept open across updates. One entry per sender:
# a newer generation of the same sender replaces (unmaps) the older one.
_MAPPINGS: dict[tuple[str, int, Optional[int]], list[torch.Tensor]] = {}
_MAX_SENDERS = 8


def _map(payload: CudaIpcPayload, device_index: Optional[int]) -> list[torch.Tensor]:
    key = (payload.sender_id, payload.generation, device_index)
    if payload.sender_id and key in _MAPPINGS and len(_MAPPINGS[key]) == len(payload.handles):
        return _MAPPINGS[key]
    buffers = []
    for rebuild, args in payload.handles:
        if device_index is not None:
            args = (*args[:_DEVICE_ARG], device_index, *args[_DEVICE_ARG + 1:])
        buffers.append(rebuild(*args))
    if payload.sender_id:
        for old in [k for k in _MAPPINGS if k[0] == payload.sender_id]:
            del _MAPPINGS[old]
        _MAPPINGS[key] = buffers
        while len(_MAPPINGS) > _MAX_SENDERS:
            del _MAPPINGS[next(iter(_MAPPINGS))]
    return buffers


def unmap_all() -> None:
    """Close every mapping kept across updates (e.g. when the trainer goes away)."""
    _MAPPINGS.clear()


class CudaIpcLoader(BucketedLoader):
    """Engine side. ``device``: this process's index for the sender's GPU when the two processes number GPUs
    differently (e.g. different ``CUDA_VISIBLE_DEVICES``); default: found by the payload's GPU UUID (or, for a
    payload without one, the index the sender used)."""

    buckets_resident = True      # every bucket is mapped before the first is yielded
    persistent_buffers = True    # the same mapped buffers come back while the sender reuses them

    def __init__(self, payload: CudaIpcPayload, *, version: Optional[int] = None,
                 device: torch.device | str | int | None = None) -> None:
        _require_cuda("CudaIpcLoader")
        if not isinstance(payload, CudaIpcPayload):
            raise TypeError(f"payload must be a CudaIpcPayload, got {type(payload).__name__}")
        self._plan = BucketPlan.from_bytes(payload.manifest)
        if len(self._plan.bucket_sizes) != len(payload.handles):
            raise ValueError(f"manifest names {len(self._plan.bucket_sizes)} buckets, payload has "
                             f"{len(payload.handles)} handles")
        self.version = version if version is not None else payload.version
        self._device_index = device if isinstance(device, int) or device is None else torch.device(device).index
        if self._device_index is None and payload.device_uuid:
            self._device_index = local_index_of(payload.device_uuid)
        elif self._device_index is not None and payload.device_uuid and \
                gpu_uuid(self._device_index) != payload.device_uuid:
            raise ValueError(f"CUDA IPC: device {self._device_index} is GPU {gpu_uuid(self._device_index)}, the "
                             f"sender's buffers are on GPU {payload.device_uuid}")
        self._buffers: Optional[list[torch.Tensor]] = _map(payload, self._device_index)

    def bucket_plan(self) -> BucketPlan:
        return self._plan

    def iter_buckets(self) -> Iterator[tuple[int, torch.Tensor]]:
        if self._buffers is None:
            raise RuntimeError("CudaIpcLoader is closed")
        yield from enumerate(self._buffers)

    def close(self) -> None:
        if self._buffers is None:
            return
        # NOTE: the engine's copies out of the sender's buffers are queued on its stream; finish them before the
        # trainer is told it may refill the buffers.
        if self._buffers:
            torch.cuda.current_stream(self._buffers[0].device).synchronize()
        self._buffers = None
