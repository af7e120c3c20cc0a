"""Fixed-address device memory (engine.device_memory).

CPU: a fake driver library records the calls: a region reserves its addresses once, maps (create, map, read/write
access for its device) at creation and at each remap at the same address, unmaps and releases on release, frees
everything when collected; a failed call raises naming the call and the driver's error and leaves nothing
allocated or mapped; an unusable driver or a failed region falls back with a WARNING. ``materialize`` gives a
meta-device model's parameters storage in one region (ties kept, aligned, loaded like ``to_empty``'s); a KV
storage made the way a region makes tensors is found by ``kv_storage``.
GPU (marked): a region's tensors keep their addresses across release and remap, the memory really goes back to
the device, a CUDA graph captured over them replays correctly after a remap, and release/remap work from another
thread.
"""
import contextlib
import gc
import logging
import threading

import pytest
import torch

from engine.device_memory import ALIGNMENT, CudaDriver, DeviceRegion, DriverError, FixedAddresses
from engine.kv_cache import allocate_kv_cache, kv_storage
from engine.tiny_models import make_tiny_model
from engine.weights import load_model
from tests.engine.cpu_regions import CpuFixedAddresses

GRANULE = 2 << 20
BASE = 0x7F0000000000


class FakeLib:
    """The driver functions a region calls, recording (name, plain argument values); ``fail[name] = code`` makes
    the next call of ``name`` return ``code``."""

    def __init__(self, vmm: bool = True) -> None:
        self.calls: list[tuple] = []
        self.fail: dict[str, int] = {}
        self.vmm = vmm
        self._handles = 0

    def _record(self, name, *args) -> int:
        self.calls.append((name,) + args)
        return self.fail.pop(name, 0)

    def cuInit(self, flags):
        return self._record("cuInit")

    def cuGetErrorName(self, code, out):
        if code.value != 2:
            return 1
        out._obj.value = b"CUDA_ERROR_OUT_OF_MEMORY"
        return 0

    def cuGetErrorString(self, code, out):
        if code.value != 2:
            return 1
        out._obj.value = b"out of memory"
        return 0

    def cuDeviceGet(self, dev, ordinal):
        dev._obj.value = ordinal.value
        return 0

    def cuDeviceGetAttribute(self, out, attribute, dev):
        out._obj.value = int(self.vmm and attribute.value == 102)
        return 0

    def cuMemGetAllocationGranularity(self, out, prop, flags):
        p = prop._obj
        assert (p.type, p.location.type, flags.value) == (1, 1, 0)   # pinned, on a device, minimum granularity
        out._obj.value = GRANULE
        return self._record("granularity", p.location.id)

    def cuMemAddressReserve(self, ptr, size, alignment, addr, flags):
        ptr._obj.value = BASE
        return self._record("reserve", size.value)

    def cuMemCreate(self, handle, size, prop, flags):
        code = self._record("create", size.value, prop._obj.location.id)
        if code == 0:
            self._handles += 1
            handle._obj.value = self._handles
        return code

    def cuMemMap(self, ptr, size, offset, handle, flags):
        return self._record("map", ptr.value, size.value, handle.value)

    def cuMemSetAccess(self, ptr, size, desc, count):
        d = desc._obj
        return self._record("access", ptr.value, size.value, d.location.type, d.location.id, d.flags, count.value)

    def cuMemUnmap(self, ptr, size):
        return self._record("unmap", ptr.value, size.value)

    def cuMemRelease(self, handle):
        return self._record("release", handle.value)

    def cuMemAddressFree(self, ptr, size):
        return self._record("free", ptr.value, size.value)


class FakeDriver(CudaDriver):
    def current(self, index):    # no CUDA context to make current here
        return contextlib.nullcontext()


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    lib = FakeLib()
    return lib, FakeDriver(lib)


def names(calls):
    return [c[0] for c in calls]


def test_a_failed_call_names_the_call_and_the_driver_error(fake):
    lib, driver = fake
    lib.fail["create"] = 2
    message = r"cuMemCreate failed: CUresult 2 \(CUDA_ERROR_OUT_OF_MEMORY: out of memory\)"
    with pytest.raises(DriverError, match=message) as err:
        DeviceRegion(100, torch.device("cuda", 1), driver)
    assert (err.value.call, err.value.code) == ("cuMemCreate", 2) and isinstance(err.value, RuntimeError)
    assert names(lib.calls)[-1] == "free"           # the reservation did not leak
    lib.fail["reserve"] = 999
    with pytest.raises(DriverError, match=r"cuMemAddressReserve failed: CUresult 999 \(unknown CUresult\)"):
        DeviceRegion(100, torch.device("cuda", 1), driver)


def test_a_region_keeps_its_addresses_across_release_and_remap(fake):
    lib, driver = fake
    region = DeviceRegion(GRANULE + 1, torch.device("cuda", 1), driver)
    size = 2 * GRANULE                              # rounded up to the granularity
    assert (region.ptr, region.nbytes, region.mapped) == (BASE, size, True)
    assert lib.calls[-4:] == [("reserve", size), ("create", size, 1), ("map", BASE, size, 1),
                              ("access", BASE, size, 1, 1, 3, 1)]   # read/write for device 1
    lib.calls.clear()
    assert region.release() == size and not region.mapped
    assert lib.calls == [("unmap", BASE, size), ("release", 1)]
    with pytest.raises(RuntimeError, match="already released"):
        region.release()
    lib.calls.clear()
    assert region.remap() == size and region.mapped and region.ptr == BASE
    assert lib.calls == [("create", size, 1), ("map", BASE, size, 2), ("access", BASE, size, 1, 1, 3, 1)]
    lib.calls.clear()
    del region
    gc.collect()
    assert lib.calls == [("unmap", BASE, size), ("release", 2), ("free", BASE, size)]


def test_a_failed_mapping_leaves_nothing_mapped_and_can_be_retried(fake):
    lib, driver = fake
    lib.fail["access"] = 2
    with pytest.raises(DriverError, match="cuMemSetAccess"):
        DeviceRegion(GRANULE, torch.device("cuda", 0), driver)
    assert names(lib.calls)[-3:] == ["unmap", "release", "free"]
    region = DeviceRegion(GRANULE, torch.device("cuda", 0), driver)
    region.release()
    lib.fail["map"] = 2
    with pytest.raises(DriverError, match="cuMemMap"):
        region.remap()
    assert not region.mapped and names(lib.calls)[-2:] == ["map", "release"]   # the new handle went back
    region.remap()
    assert region.mapped


def test_regions_remap_all_or_none(fake):
    lib, driver = fake
    fixed = FixedAddresses(torch.device("cuda", 0), driver)
    assert fixed.granularity == GRANULE
    fixed.regions = {n: DeviceRegion(GRANULE, torch.device("cuda", 0), driver) for n in ("kv", "weights")}
    assert fixed.release(["kv", "weights"]) == 2 * GRANULE
    lib.fail["create"] = 2
    lib.calls.clear()
    with pytest.raises(DriverError):
        fixed.remap(["weights", "kv"])
    assert not any(r.mapped for r in fixed.regions.values())
    assert fixed.remap(["weights", "kv"]) == 2 * GRANULE and all(r.mapped for r in fixed.regions.values())


def test_no_usable_driver_means_torch_allocations_with_one_warning(caplog, fake):
    with caplog.at_level(logging.WARNING, logger="engine.device_memory"):
        assert FixedAddresses.open(torch.device("cuda", 0), FakeDriver(FakeLib(vmm=False))) is None
    [record] = caplog.records
    assert "does not support virtual memory management" in record.getMessage()
    assert "re-capture the CUDA graphs" in record.getMessage()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU torch: torch.as_tensor refuses the device pointer")
def test_a_region_torch_cannot_wrap_falls_back_and_is_freed(caplog, fake):
    lib, driver = fake
    fixed = FixedAddresses.open(torch.device("cuda", 0), driver)
    assert fixed is not None
    with caplog.at_level(logging.WARNING, logger="engine.device_memory"):
        assert fixed.empty("kv", (4, GRANULE), torch.bfloat16) is None
    gc.collect()
    assert "kv" not in fixed.regions and names(lib.calls)[-3:] == ["unmap", "release", "free"]
    assert sum("kv: no fixed-address device memory" in r.getMessage() for r in caplog.records) == 1


def test_materialize_packs_the_parameters_in_one_region_and_keeps_ties(tmp_path):
    path = make_tiny_model("llama", tmp_path / "m", seed=2)          # tied embeddings
    fixed = CpuFixedAddresses()
    model, _ = load_model(path, torch.float32, "cpu", materialize=lambda m: fixed.materialize("weights", m))
    ref, _ = load_model(path, torch.float32, "cpu")
    assert model.lm_head.weight is model.embed_tokens.weight
    params = dict(model.named_parameters())
    assert params.keys() == dict(ref.named_parameters()).keys()
    for name, p in params.items():
        assert isinstance(p, torch.nn.Parameter) and not p.requires_grad
        assert torch.equal(p, ref.get_parameter(name)), name
    region = fixed.regions["weights"]
    base = region.bytes.data_ptr()
    spans = sorted((p.data_ptr() - base, p.numel() * p.element_size()) for p in params.values())
    assert all(off % ALIGNMENT == 0 for off, _ in spans) and len(region.offsets) == len(params)
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:]))       # no overlap
    assert spans[-1][0] + spans[-1][1] <= region.bytes.numel()
    assert torch.equal(model.rope_cos, ref.rope_cos)                       # buffers still computed
    with pytest.raises(ValueError, match="exists already"):
        fixed.materialize("weights", model)
    # the float32 head's copies are buffers: in the region only when asked
    from engine.models.fp32_head import Fp32Head
    head = Fp32Head(512, 64, 1e-6, torch.device("meta"))
    assert fixed.materialize("fp32 head", head, buffers=True)
    head_bytes = fixed.regions["fp32 head"].bytes
    assert [b.data_ptr() - head_bytes.data_ptr() for b in head.buffers()] == [0, ALIGNMENT]   # 64 floats, aligned


def test_kv_storage_finds_a_storage_made_over_region_bytes():
    raw = torch.full((2 * 2 * 5 * 4 * 2 * 16 * 2,), 7, dtype=torch.uint8)   # [2L, blocks, bs, Hkv, D] bf16 bytes
    storage = torch.empty(0, dtype=torch.bfloat16)
    storage.set_(raw.untyped_storage(), 0, (4, 5, 4, 2, 16))

    class MC:
        num_layers, num_kv_heads, head_dim = 2, 2, 16
    kv = allocate_kv_cache(MC, 5, 4, torch.bfloat16, "cpu", storage)
    assert kv_storage(kv) is storage and bool((raw == 0).all())          # zeroed in place, found as the base
    with pytest.raises(ValueError, match="contiguous base tensor"):
        allocate_kv_cache(MC, 5, 4, torch.bfloat16, "cpu", storage[:, :4])


# ----------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_region_tensors_keep_their_addresses_and_graphs_over_them_stay_valid(dtype):
    fixed = FixedAddresses.open(torch.device("cuda", 0))
    assert fixed is not None, "the driver's virtual-memory API should work on this GPU"
    n = 64 << 20                                                        # elements: 128 / 256 MB
    x = fixed.empty("x", (n,), dtype)
    assert x is not None and x.is_cuda and x.dtype == dtype and x._base is None
    region = fixed.regions["x"]
    assert x.data_ptr() == region.ptr and region.nbytes % fixed.granularity == 0
    x.fill_(1.0)
    y = torch.empty(n, dtype=dtype, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.copy_(x * 2)
    torch.cuda.synchronize()
    ptr = x.data_ptr()
    free0 = torch.cuda.mem_get_info()[0]
    # release and remap from another thread than the one that allocated (the engine's loop thread does that)
    errors = []

    def other_thread(step):
        try:
            step()
        except BaseException as e:   # pragma: no cover - reported below
            errors.append(e)
    t = threading.Thread(target=other_thread, args=(lambda: fixed.release(["x"]),))
    t.start()
    t.join()
    assert not errors, errors
    torch.cuda.synchronize()
    assert torch.cuda.mem_get_info()[0] - free0 >= 0.9 * region.nbytes
    t = threading.Thread(target=other_thread, args=(lambda: fixed.remap(["x"]),))
    t.start()
    t.join()
    assert not errors, errors
    assert x.data_ptr() == ptr
    x.fill_(3.0)
    graph.replay()
    torch.cuda.synchronize()
    assert bool((y == 6.0).all())
    del graph, x
    gc.collect()
