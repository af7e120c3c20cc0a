"""Device memory at fixed virtual addresses that can be given back and taken again (``engine.sleep``), through the
CUDA driver's virtual-memory API called with ctypes (the idea of vLLM's CuMemAllocator sleep mode; no new
dependency):

    create    cuMemAddressReserve                            a range of virtual addresses, kept for the region's life
              cuMemCreate + cuMemMap + cuMemSetAccess        physical memory behind it, read/write for the device
    release   cuMemUnmap + cuMemRelease                      the physical memory goes back to the device; the
                                                             addresses stay reserved
    remap     cuMemCreate + cuMemMap + cuMemSetAccess        new physical memory at the same addresses
    free      release + cuMemAddressFree                     when the region is collected (weakref.finalize)

Tensors over a region (``DeviceRegion.tensor``) are made without a copy, from an object with
``__cuda_array_interface__``, and keep the region alive. CUDA graphs captured over them stay valid across a
release and a remap (same addresses); the contents do not survive (zero them or write them again).

NOTE: between ``release`` and ``remap`` the tensors' addresses are unmapped: a kernel touching them faults with an
illegal-address error, which poisons the CUDA context for good. Whoever releases a region makes sure nothing runs
on it (the engine steps nothing while asleep and hides the tensors: ``engine.sleep``).

Every driver call runs with the device's primary context current (the one torch uses), whatever thread calls:
sleep and wake may come from another thread than the one that built the engine.
"""
from __future__ import annotations

import ctypes
import logging
import math
import threading
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

# cuda.h values (stable since CUDA 10.2)
_ALLOCATION_TYPE_PINNED = 1           # CU_MEM_ALLOCATION_TYPE_PINNED
_LOCATION_TYPE_DEVICE = 1             # CU_MEM_LOCATION_TYPE_DEVICE
_ACCESS_PROT_READWRITE = 3            # CU_MEM_ACCESS_FLAGS_PROT_READWRITE
_GRANULARITY_MINIMUM = 0              # CU_MEM_ALLOC_GRANULARITY_MINIMUM
_ATTRIBUTE_VMM_SUPPORTED = 102        # CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED

ALIGNMENT = 512                       # bytes between tensors packed in one region (the caching allocator's)


class _Location(ctypes.Structure):    # CUmemLocation
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocationProp(ctypes.Structure):   # CUmemAllocationProp: 32 bytes
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):       # CUmemAccessDesc
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


class DriverError(RuntimeError):
    """A CUDA driver call returned an error: ``call`` (its name), ``code`` (the CUresult)."""

    def __init__(self, call: str, code: int, description: str) -> None:
        super().__init__(f"{call} failed: CUresult {code} ({description})")
        self.call, self.code = call, code


class CudaDriver:
    """The driver calls a region needs, each checked (``DriverError`` names the call and the error).

    ``lib``: the loaded ``libcuda.so.1`` (default), or any object with the same functions (tests)."""

    def __init__(self, lib=None) -> None:
        self._lib = ctypes.CDLL("libcuda.so.1") if lib is None else lib
        self._primary: dict[int, ctypes.c_void_p] = {}
        self._lock = threading.Lock()
        self.call("cuInit", ctypes.c_uint(0))

    def call(self, name: str, *args) -> None:
        code = int(getattr(self._lib, name)(*args))
        if code != 0:
            raise DriverError(name, code, self.describe(code))

    def describe(self, code: int) -> str:
        """"CUDA_ERROR_OUT_OF_MEMORY: out of memory" (cuGetErrorName, cuGetErrorString), or what is known."""
        parts = []
        for fn in ("cuGetErrorName", "cuGetErrorString"):
            text = ctypes.c_char_p()
            try:
                ok = int(getattr(self._lib, fn)(ctypes.c_int(code), ctypes.byref(text))) == 0
            except (AttributeError, OSError):
                ok = False
            if ok and text.value:
                parts.append(text.value.decode(errors="replace"))
        return ": ".join(parts) or "unknown CUresult"

    @contextmanager
    def current(self, index: int) -> Iterator[None]:
        """Device ``index`` current for torch, and its primary context current for the driver."""
        with torch.cuda.device(index):
            ctx = ctypes.c_void_p()
            self.call("cuCtxGetCurrent", ctypes.byref(ctx))
            primary = self.primary_context(index)
            if ctx.value != primary.value:
                self.call("cuCtxSetCurrent", primary)
            yield

    def primary_context(self, index: int) -> ctypes.c_void_p:
        """The device's primary context, retained once for the process (torch's context: never released)."""
        with self._lock:
            if index not in self._primary:
                dev, ctx = ctypes.c_int(), ctypes.c_void_p()
                self.call("cuDeviceGet", ctypes.byref(dev), ctypes.c_int(index))
                self.call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
                self._primary[index] = ctx
            return self._primary[index]

    def supports_vmm(self, index: int) -> bool:
        dev, value = ctypes.c_int(), ctypes.c_int()
        self.call("cuDeviceGet", ctypes.byref(dev), ctypes.c_int(index))
        self.call("cuDeviceGetAttribute", ctypes.byref(value), ctypes.c_int(_ATTRIBUTE_VMM_SUPPORTED), dev)
        return bool(value.value)

    @staticmethod
    def allocation_prop(index: int) -> _AllocationProp:
        prop = _AllocationProp()
        prop.type = _ALLOCATION_TYPE_PINNED
        prop.location.type, prop.location.id = _LOCATION_TYPE_DEVICE, index
        return prop

    def granularity(self, index: int) -> int:
        value = ctypes.c_size_t()
        self.call("cuMemGetAllocationGranularity", ctypes.byref(value), ctypes.byref(self.allocation_prop(index)),
                  ctypes.c_int(_GRANULARITY_MINIMUM))
        return int(value.value)


class _Mapping:
    """A region's driver state, shared with its finalizer (which must not hold the region itself)."""

    def __init__(self, driver: CudaDriver, index: int, size: int) -> None:
        self.driver, self.index, self.size = driver, index, size
        self.ptr = 0
        self.handle: int | None = None      # the physical allocation mapped now, None while released

    def reserve(self) -> None:
        ptr = ctypes.c_uint64()
        self.driver.call("cuMemAddressReserve", ctypes.byref(ptr), ctypes.c_size_t(self.size), ctypes.c_size_t(0),
                         ctypes.c_uint64(0), ctypes.c_uint64(0))
        self.ptr = int(ptr.value)

    def map(self) -> None:
        """Physical memory behind the addresses; on any failure nothing stays allocated or mapped."""
        d, ptr, size = self.driver, ctypes.c_uint64(self.ptr), ctypes.c_size_t(self.size)
        handle = ctypes.c_uint64()
        d.call("cuMemCreate", ctypes.byref(handle), size, ctypes.byref(d.allocation_prop(self.index)),
               ctypes.c_uint64(0))
        try:
            d.call("cuMemMap", ptr, size, ctypes.c_size_t(0), handle, ctypes.c_uint64(0))
            try:
                access = _AccessDesc()
                access.location.type, access.location.id = _LOCATION_TYPE_DEVICE, self.index
                access.flags = _ACCESS_PROT_READWRITE
                d.call("cuMemSetAccess", ptr, size, ctypes.byref(access), ctypes.c_size_t(1))
            except BaseException:
                _quietly(d, "cuMemUnmap", ptr, size)
                raise
        except BaseException:
            _quietly(d, "cuMemRelease", handle)
            raise
        self.handle = int(handle.value)

    def unmap(self) -> None:
        self.driver.call("cuMemUnmap", ctypes.c_uint64(self.ptr), ctypes.c_size_t(self.size))
        handle, self.handle = self.handle, None
        self.driver.call("cuMemRelease", ctypes.c_uint64(handle))

    @staticmethod
    def free(state: "_Mapping") -> None:
        """Finalizer: unmap, release, free the addresses (errors logged, never raised: it runs from the GC)."""
        try:
            with state.driver.current(state.index):
                if state.handle is not None:
                    torch.cuda.synchronize(state.index)    # kernels still queued on it finish first
                    state.unmap()
                state.driver.call("cuMemAddressFree", ctypes.c_uint64(state.ptr), ctypes.c_size_t(state.size))
        except Exception as e:     # a dying process, a lost context: the driver reclaims it anyway
            logger.debug("freeing a device region of %d bytes: %s", state.size, e)


def _quietly(driver: CudaDriver, name: str, *args) -> None:
    """Clean-up after a failure: log a second error rather than hide the first."""
    try:
        driver.call(name, *args)
    except DriverError as e:
        logger.warning("cleaning up after a failed mapping: %s", e)


class _ArrayInterface:
    """``__cuda_array_interface__`` over bytes of a region: torch.as_tensor makes a uint8 tensor of them without a
    copy and keeps this object (and so the region) alive as long as the tensor's storage lives."""

    def __init__(self, region: "DeviceRegion", ptr: int, nbytes: int) -> None:
        self.region = region
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None, "stream": None}


class DeviceRegion:
    """``nbytes`` (rounded up to the allocation granularity) of device memory at fixed addresses."""

    def __init__(self, nbytes: int, device: torch.device, driver: CudaDriver) -> None:
        if nbytes <= 0:
            raise ValueError(f"a device region needs a positive size, got {nbytes}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        self._driver = driver
        with driver.current(index):
            granularity = driver.granularity(index)
            self._state = state = _Mapping(driver, index, -(-nbytes // granularity) * granularity)
            state.reserve()
            try:
                state.map()
            except BaseException:
                _quietly(driver, "cuMemAddressFree", ctypes.c_uint64(state.ptr), ctypes.c_size_t(state.size))
                raise
        finalizer = weakref.finalize(self, _Mapping.free, state)
        finalizer.atexit = False    # at exit the driver reclaims everything; no calls into a dying context

    @property
    def ptr(self) -> int:
        return self._state.ptr

    @property
    def nbytes(self) -> int:
        """Bytes reserved (and mapped, while mapped): the request rounded up to the granularity."""
        return self._state.size

    @property
    def mapped(self) -> bool:
        return self._state.handle is not None

    def tensor(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous ``shape`` tensor of ``dtype`` at byte ``offset``: its own storage over the region's bytes
        (not a view of another tensor: ``kv_storage`` sees it as a base)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(shape) * itemsize
        if offset % itemsize or offset < 0 or offset + nbytes > self.nbytes or nbytes == 0:
            raise ValueError(f"{nbytes} bytes at offset {offset} do not fit a region of {self.nbytes} bytes")
        with self._driver.current(self._state.index):
            raw = torch.as_tensor(_ArrayInterface(self, self.ptr + offset, nbytes), device=self.device)
        if raw.data_ptr() != self.ptr + offset or raw.device != self.device:
            raise RuntimeError(f"torch.as_tensor put the region's bytes at {raw.device} {raw.data_ptr():#x}, "
                               f"not {self.device} {self.ptr + offset:#x}")
        # uint8 -> dtype and shape, on the same storage (typestr has no bfloat16; a .view() would make a view)
        out = torch.empty(0, dtype=dtype, device=self.device)
        out.set_(raw.untyped_storage(), 0, shape)
        return out

    def release(self) -> int:
        """Give the physical memory back (the device must be done with it: this synchronizes) -> bytes."""
        if not self.mapped:
            raise RuntimeError("release: the device region is already released")
        with self._driver.current(self._state.index):
            torch.cuda.synchronize(self.device)
            self._state.unmap()
        return self.nbytes

    def remap(self) -> int:
        """New physical memory at the same addresses (contents undefined) -> bytes. On failure (out of memory:
        the memory is not free yet) the region stays released and the call can be repeated."""
        if self.mapped:
            raise RuntimeError("remap: the device region is mapped already")
        with self._driver.current(self._state.index):
            self._state.map()
        return self.nbytes


def _warn_fallback(name: str, err: Exception) -> None:
    # the message only: a record holding the exception would hold its frames, and so the failed region
    logger.warning("%s: no fixed-address device memory (%s: %s): allocated with torch instead, so a wake from sleep "
                   "re-captures the CUDA graphs", name, type(err).__name__, str(err))


def _layout(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    """Byte offsets of ``tensors`` packed in one region (each at a multiple of ``ALIGNMENT``) and the total."""
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end += -(-(t.numel() * t.element_size()) // ALIGNMENT) * ALIGNMENT
    return offsets, end


class FixedAddresses:
    """The engine's regions by name ("weights", "fp32 head", "kv"), on one device. Creating one is allowed to
    fail: ``materialize`` returns False and ``empty`` None (one WARNING with the reason), and the caller
    allocates with torch instead."""

    def __init__(self, device: torch.device, driver: CudaDriver) -> None:
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", self.index)
        self.driver = driver
        with driver.current(self.index):
            self.granularity = driver.granularity(self.index)
        self.regions: dict[str, DeviceRegion] = {}

    @classmethod
    def open(cls, device: torch.device, driver: CudaDriver | None = None) -> "FixedAddresses | None":
        """None where the driver's virtual-memory API cannot be used (one WARNING saying why), and off CUDA."""
        if device.type != "cuda":
            return None
        try:
            driver = driver or CudaDriver()
            index = device.index if device.index is not None else torch.cuda.current_device()
            with driver.current(index):
                if not driver.supports_vmm(index):
                    raise RuntimeError(f"device {index} does not support virtual memory management")
            return cls(device, driver)
        except Exception as e:      # no libcuda, an old driver, a refused call: torch allocations instead
            logger.warning("fixed-address device memory unavailable (%s: %s): sleep/wake re-allocate with torch "
                           "and re-capture the CUDA graphs", type(e).__name__, str(e))
            return None

    def _check_new(self, name: str) -> None:
        if name in self.regions:
            raise ValueError(f"a device region {name!r} exists already")

    def _new_region(self, nbytes: int) -> DeviceRegion:
        torch.cuda.empty_cache()   # what torch caches but does not use: cuMemCreate cannot take it from torch
        return DeviceRegion(nbytes, self.device, self.driver)

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """One tensor (uninitialised) filling a new region ``name``; None (logged) when it cannot be had."""
        self._check_new(name)
        itemsize = torch.empty((), dtype=dtype).element_size()
        try:
            region = self._new_region(math.prod(shape) * itemsize)
            out = region.tensor(0, tuple(shape), dtype)
        except Exception as e:      # out of memory, a refused call, a torch that will not wrap the pointer
            _warn_fallback(name, e)
            return None
        self.regions[name] = region
        return out

    def materialize(self, name: str, module: nn.Module, buffers: bool = False) -> bool:
        """Storage for every parameter of ``module`` (built on the meta device) in one new region ``name``, in
        place of ``module.to_empty``: new Parameter objects as ``to_empty`` makes, one per tied Parameter (ties
        kept), contents uninitialised. Buffers go in the region too with ``buffers``, else (derived tables such
        as the rotary ones, recomputed anyway) they get torch's storage, as do zero-size tensors. False (nothing
        changed, logged) when the region cannot be had."""
        self._check_new(name)
        slots = [(table, key) for m in module.modules() for table in (m._parameters, m._buffers)
                 for key, t in table.items() if t is not None]
        unique = list({id(table[key]): table[key] for table, key in slots}.values())
        if any(not t.is_meta for t in unique):
            raise ValueError(f"materialize {name!r}: the module's tensors must be on the meta device")
        placed = [t for t in unique if t.numel() and (buffers or isinstance(t, nn.Parameter))]
        offsets, total = _layout(placed)
        try:
            region = self._new_region(max(total, 1))
            views = {id(t): region.tensor(off, tuple(t.shape), t.dtype) for t, off in zip(placed, offsets)}
        except Exception as e:
            _warn_fallback(name, e)
            return False
        new: dict[int, torch.Tensor] = {}
        for t in unique:
            data = views.get(id(t))
            if data is None:
                data = torch.empty(t.shape, dtype=t.dtype, device=self.device)
            new[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
        for table, key in slots:
            table[key] = new[id(table[key])]
        self.regions[name] = region
        return True

    def release(self, names: list[str]) -> int:
        """Unmap the regions ``names`` -> bytes given back."""
        return sum(self.regions[n].release() for n in names)

    def remap(self, names: list[str]) -> int:
        """Map the regions ``names`` again at their addresses -> bytes; all or none (a failure re-releases the
        ones this call mapped, then raises)."""
        done = []
        try:
            for n in names:
                self.regions[n].remap()
                done.append(n)
        except BaseException:
            for n in done:
                self.regions[n].release()
            raise
        return sum(self.regions[n].nbytes for n in names)
