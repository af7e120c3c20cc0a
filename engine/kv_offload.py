"""Host copies of KV blocks for offloaded idle sessions (the scheduler decides, this moves bytes).

    host_k, host_v: [num_host_blocks, block_size, num_kv_heads, head_dim] per layer, pinned on CUDA

Copies run on the current stream, before the step's forward: swap-outs (device -> host) first, so a
device block freed by an offload can be overwritten by a swap-in or the forward of the same step;
the scheduler defers reuse of host blocks freed by a swap-in to the next step.

One device->host transfer per step: every layer's K and V blocks are gathered into one device buffer
and read back at once (not 2 x num_layers synchronous copies).
"""
from __future__ import annotations

import torch


class HostKVCache:
    def __init__(self, device_caches: list[tuple[torch.Tensor, torch.Tensor]], num_host_blocks: int) -> None:
        self.device_caches = device_caches
        self.num_blocks = num_host_blocks
        k0 = device_caches[0][0]
        self.device = k0.device
        shape = (num_host_blocks,) + tuple(k0.shape[1:])
        pin = k0.is_cuda
        self.host_caches = [
            (torch.empty(shape, dtype=k0.dtype, pin_memory=pin), torch.empty(shape, dtype=k0.dtype, pin_memory=pin))
            for _ in device_caches
        ]

    def swap(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        if swap_out:
            dev = torch.tensor([d for d, _ in swap_out], device=self.device)
            host = torch.tensor([h for _, h in swap_out])
            # [2 * num_layers, n, block_size, H_kv, D] gathered on the device, one read back
            gathered = torch.stack([c.index_select(0, dev) for pair in self.device_caches for c in pair])
            gathered = gathered.to("cpu")
            for i, (hk, hv) in enumerate(self.host_caches):
                hk.index_copy_(0, host, gathered[2 * i])
                hv.index_copy_(0, host, gathered[2 * i + 1])
        if swap_in:
            host = torch.tensor([h for h, _ in swap_in])
            dev = torch.tensor([d for _, d in swap_in], device=self.device)
            staged = torch.stack([c.index_select(0, host) for pair in self.host_caches for c in pair])
            if staged.device != self.device:
                staged = staged.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" \
                    else staged.to(self.device)
            for i, (dk, dv) in enumerate(self.device_caches):
                dk.index_copy_(0, dev, staged[2 * i])
                dv.index_copy_(0, dev, staged[2 * i + 1])
