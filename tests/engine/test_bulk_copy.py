"""The one-launch bucket copy (``engine.kernels.bulk_copy``) against slicing (the updater's resident path through
it: tests/weight_sync/test_bucketed_update.py). On the CPU the kernel runs under ``TRITON_INTERPRET=1`` (raw host addresses
stand in for device pointers), natively on CUDA."""
from __future__ import annotations

import importlib
import os
import sys
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"   # before the kernel module is decorated (see test_kernels.py)
pytest.importorskip("triton")
if not torch.cuda.is_available() and "engine.kernels.bulk_copy" in sys.modules:
    importlib.reload(sys.modules["engine.kernels.bulk_copy"])

from engine.kernels.bulk_copy import ALIGN, CHUNK_BYTES, copy_chunks, plan_chunks  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_chunks_copy_exactly_the_ranges_and_nothing_else(request):
    g = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    src = torch.randint(0, 256, (3 * CHUNK_BYTES,), dtype=torch.uint8, generator=g).to(DEVICE)
    dst = torch.zeros(3 * CHUNK_BYTES, dtype=torch.uint8, device=DEVICE)
    # (src offset, dst offset, bytes): longer than a chunk with a tail, one word pair, adjacent ranges, a
    # range ending at the buffers' last byte
    spans = [(16, 48, CHUNK_BYTES + 80), (CHUNK_BYTES + 4096, 2 * CHUNK_BYTES, 16),
             (2 * CHUNK_BYTES, 2 * CHUNK_BYTES + 16, 64), (2 * CHUNK_BYTES + 64, 2 * CHUNK_BYTES + 80, 32),
             (3 * CHUNK_BYTES - 160, 3 * CHUNK_BYTES - 160, 160)]
    # offsets from bases inside the buffers (negative ones too)
    table = plan_chunks([(src.data_ptr() + s, dst.data_ptr() + d, n) for s, d, n in spans], src[CHUNK_BYTES:],
                        dst[4096:])
    assert table.num_chunks == len(spans) + 1      # the first range takes two chunks
    copy_chunks(table)
    expected = torch.zeros_like(dst)
    for s, d, n in spans:
        expected[d:d + n] = src[s:s + n]
    assert torch.equal(dst.cpu(), expected.cpu())


@pytest.mark.parametrize("span, why", [((8, 0, 16), "src"), ((0, 0, 24), "length"), ((0, 0, 0), "empty")])
def test_ranges_off_the_boundaries_are_refused(span, why):
    buf = torch.zeros(64, dtype=torch.uint8, device=DEVICE)
    s, d, n = span
    with pytest.raises(ValueError, match=f"on {ALIGN}-byte boundaries"):
        plan_chunks([(buf.data_ptr() + s, buf.data_ptr() + d, n)], buf, buf)
    with pytest.raises(ValueError, match=f"dst_base at 0x[0-9a-f]+ is not {ALIGN}-byte aligned"):
        plan_chunks([(buf.data_ptr(), buf.data_ptr(), 16)], buf, buf[8:])


_COMPILE = """
import json, re, sys
from collections import Counter
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engine.kernels import bulk_copy
aligned = [["tt.divisibility", 16]]
src = ASTSource(fn=bulk_copy._copy_chunks_kernel, signature={"table_ptr": "*i64", "src_base": "*i64",
                "dst_base": "*i64", "CHUNK_WORDS": "constexpr", "BLOCK": "constexpr"},
                constexprs={"CHUNK_WORDS": bulk_copy._CHUNK_WORDS, "BLOCK": bulk_copy.BLOCK_WORDS},
                attrs={(0,): aligned, (1,): aligned, (2,): aligned})
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
print(json.dumps(Counter(re.findall(r"((?:ld|st)\\.global[\\w.:]*)", ptx))))
"""


def test_kernel_moves_16_byte_vectors_on_hopper():
    """Compiled for sm_90 (no GPU needed): every load and store of the copy is a 16-byte vector. The first version
    (table addresses cast to pointers) compiled to 8-byte accesses and ran no faster than per-tensor memcpys.
    In a fresh process: after interpreter runs, this process's triton.language is not fit to compile."""
    import json
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode == 0, done.stderr[-2000:]
    ops = json.loads(done.stdout.strip().splitlines()[-1])
    data = {op: n for op, n in ops.items() if op.startswith("st.") or "evict_first" in op}   # not the table's loads
    assert data and all(op.endswith(".v2.b64") for op in data), ops
