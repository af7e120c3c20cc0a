"""Host stand-ins for fixed-address device regions (engine.device_memory), so the engine's fixed-address sleep
path runs on CPU: a region's tensors are made the way ``DeviceRegion.tensor`` makes them (their own storage over
the region's bytes); ``release`` fills the bytes with 0xff (NaN as floats: contents do not survive a real
release) and ``remap`` leaves them so (a real remap's contents are undefined)."""
import torch

from engine.device_memory import FixedAddresses

GRANULE = 2 << 20


class CpuRegion:
    def __init__(self, nbytes: int) -> None:
        self.bytes = torch.zeros(-(-nbytes // GRANULE) * GRANULE, dtype=torch.uint8)
        self.nbytes = self.bytes.numel()
        self.mapped = True
        self.offsets: list[int] = []    # of the tensors handed out
        self.releases = 0

    def tensor(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.offsets.append(offset)
        out = torch.empty(0, dtype=dtype)
        out.set_(self.bytes.untyped_storage(), offset // out.element_size(), shape)
        return out

    def release(self) -> int:
        assert self.mapped
        self.bytes.fill_(0xFF)
        self.mapped = False
        self.releases += 1
        return self.nbytes

    def remap(self) -> int:
        assert not self.mapped
        self.mapped = True
        return self.nbytes


class CpuFixedAddresses(FixedAddresses):
    """``FixedAddresses`` over ``CpuRegion``s (no driver)."""

    def __init__(self) -> None:
        self.device, self.granularity, self.regions = torch.device("cpu"), GRANULE, {}
        self.driver = None

    def _new_region(self, nbytes: int) -> CpuRegion:
        return CpuRegion(nbytes)
