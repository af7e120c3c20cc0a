"""CudaIpcPayload on the wire without pickle (CPU): ``to_wire`` / ``from_wire`` round-trip a hand-built payload whose
handles have the layout of ``reduce_tensor(cuda_tensor)`` (which itself needs CUDA) through msgpack, and bad input
gets a ValueError naming the field."""
from __future__ import annotations

import copy

import msgpack
import pytest
import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor

from weight_sync.cuda_ipc import CudaIpcPayload


def handle_args(size=4096, event=True):
    """The 15 arguments ``reduce_tensor`` gives ``rebuild_cuda_tensor`` for a uint8 bucket buffer on GPU 0."""
    return (torch.Tensor, torch.Size([size]), (1,), 0, torch.storage.TypedStorage, torch.uint8, 0, b"\x11" * 64,
            size, 512, False, b"/torch_123_456_7", 8, b"\x22" * 64 if event else None, event)


def payload():
    return CudaIpcPayload(b'{"layout": 1}', ((rebuild_cuda_tensor, handle_args()),
                                             (rebuild_cuda_tensor, handle_args(1024, event=False))),
                          version=7, sender_id="ab" * 16, generation=2, device_uuid="GPU-1234")


def through_msgpack(d):
    return msgpack.unpackb(msgpack.packb(d, use_bin_type=True), raw=False, strict_map_key=True)


def test_round_trip_through_msgpack_is_equal_and_keeps_the_types():
    p = payload()
    q = CudaIpcPayload.from_wire(through_msgpack(p.to_wire()))
    assert q == p
    rebuild, args = q.handles[0]
    assert rebuild is rebuild_cuda_tensor
    assert type(args[1]) is torch.Size and type(args[2]) is tuple
    assert args[0] is torch.Tensor and args[4] is torch.storage.TypedStorage and args[5] is torch.uint8
    assert CudaIpcPayload.from_wire(through_msgpack(CudaIpcPayload(b"", ()).to_wire())) == CudaIpcPayload(b"", ())


def test_names_travel_for_classes_and_dtypes():
    wire = payload().to_wire()
    assert wire["handles"][0][:6] == ["torch.Tensor", [4096], [1], 0, "torch.TypedStorage", "uint8"]
    args = list(handle_args())
    args[4], args[5] = torch.UntypedStorage, torch.bfloat16
    p = CudaIpcPayload(b"m", ((rebuild_cuda_tensor, tuple(args)),))
    assert CudaIpcPayload.from_wire(through_msgpack(p.to_wire())) == p


def mutated(path, value):
    d = through_msgpack(payload().to_wire())
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return d


@pytest.mark.parametrize("wire, match", [
    ("not a map", r"must be a map with exactly the keys .* got str"),
    ({"manifest": b""}, r"must be a map with exactly the keys"),
    (mutated(["manifest"], "text"), r"manifest: must be bytes, got str"),
    (mutated(["generation"], True), r"generation: must be int, got bool"),
    (mutated(["version"], "7"), r"version: must be int, got str"),
    (mutated(["sender_id"], 5), r"sender_id: must be str, got int"),
    (mutated(["handles"], {}), r"handles: must be list, got dict"),
    (mutated(["handles", 0], [0] * 14), r"handles\[0\]: rebuild_cuda_tensor takes 15 arguments .* got 14 items"),
    (mutated(["handles", 1], "x"), r"handles\[1\]: rebuild_cuda_tensor takes 15 arguments .* got str"),
    (mutated(["handles", 0, 0], "os.system"), r"handles\[0\]\[0\] \(tensor_cls\): must be one of \['torch.Tensor'"),
    (mutated(["handles", 0, 4], "torch.storage._LegacyStorage"), r"handles\[0\]\[4\] \(storage_cls\)"),
    (mutated(["handles", 0, 5], "float99"), r"handles\[0\]\[5\] \(dtype\): must be a torch dtype's name, got "
                                            r"'float99'"),
    (mutated(["handles", 0, 5], 3), r"handles\[0\]\[5\] \(dtype\)"),
    (mutated(["handles", 0, 1], [4, "4"]), r"handles\[0\]\[1\] \(tensor_size\): must be int, got str"),
    (mutated(["handles", 0, 2], 1), r"handles\[0\]\[2\] \(tensor_stride\): must be list, got int"),
    (mutated(["handles", 1, 6], "cuda:0"), r"handles\[1\]\[6\] \(storage_device\): must be int, got str"),
    (mutated(["handles", 0, 7], "handle"), r"handles\[0\]\[7\] \(storage_handle\): must be bytes, got str"),
    (mutated(["handles", 0, 10], 0), r"handles\[0\]\[10\] \(requires_grad\): must be bool, got int"),
])
def test_malformed_wire_payloads_get_an_error_naming_the_field(wire, match):
    with pytest.raises(ValueError, match=r"^CudaIpcPayload.from_wire: " + match):
        CudaIpcPayload.from_wire(wire)


def test_to_wire_refuses_handles_it_cannot_name():
    with pytest.raises(ValueError, match=r"handles\[0\]: not a \(rebuild_cuda_tensor, args\) pair"):
        CudaIpcPayload(b"", ((copy.copy, handle_args()),)).to_wire()
    with pytest.raises(ValueError, match=r"handles\[0\]: rebuild_cuda_tensor takes 15 arguments .* got 14 items"):
        CudaIpcPayload(b"", ((rebuild_cuda_tensor, handle_args()[:14]),)).to_wire()
    args = list(handle_args())
    args[0] = torch.nn.Module
    with pytest.raises(ValueError, match=r"handles\[0\]\[0\] \(tensor_cls\): .*Module.* has no wire name"):
        CudaIpcPayload(b"", ((rebuild_cuda_tensor, tuple(args)),)).to_wire()


def test_a_senders_reused_handles_are_encoded_once_and_new_ones_afresh():
    # CudaIpcSender hands out the same handles tuple push after push: its wire form is reused (the same list
    # object), with each payload's own version; another tuple is encoded (and checked) on its own
    handles = ((rebuild_cuda_tensor, handle_args()),)
    first = CudaIpcPayload(b"m", handles, version=1, sender_id="s", generation=1).to_wire()
    second = CudaIpcPayload(b"m", handles, version=2, sender_id="s", generation=1).to_wire()
    assert second["handles"] is first["handles"] and (first["version"], second["version"]) == (1, 2)
    other = CudaIpcPayload(b"m", ((rebuild_cuda_tensor, handle_args(1024)),)).to_wire()
    assert other["handles"][0][1] == [1024] and first["handles"][0][1] == [4096]
    bad = list(handle_args())
    bad[3] = "zero"
    with pytest.raises(ValueError, match=r"handles\[0\]\[3\] \(tensor_offset\)"):
        CudaIpcPayload(b"m", ((rebuild_cuda_tensor, tuple(bad)),)).to_wire()


def test_a_repeated_handle_list_reuses_its_decode_and_any_change_is_checked_afresh():
    """A sender reusing its buffers sends equal handle lists push after push: the second decode reuses the first's
    handles (same objects). A list that differs in a value or only in a type (0 for False) under the same sender
    and generation is decoded and checked again: the bad one is refused, naming the field."""
    first = CudaIpcPayload.from_wire(through_msgpack(payload().to_wire()))
    again = CudaIpcPayload.from_wire(through_msgpack(payload().to_wire()))
    assert again == first and again.handles is first.handles
    with pytest.raises(ValueError, match=r"handles\[0\]\[10\] \(requires_grad\): must be bool, got int"):
        CudaIpcPayload.from_wire(mutated(["handles", 0, 10], 0))
    other = mutated(["handles", 0, 8], 2048)                     # another storage size: a different buffer
    decoded = CudaIpcPayload.from_wire(other)
    assert decoded.handles is not first.handles and decoded.handles[0][1][8] == 2048
    assert CudaIpcPayload.from_wire(through_msgpack(payload().to_wire())).handles[0][1][8] == 4096
