"""The engine's side of a resident bucketed update (CUDA IPC's), in one process: ``WeightUpdater.apply`` of the
same buckets copied per tensor and through the one-launch kernel (engine.kernels.bulk_copy), against one raw
device memcpy of the same bytes (the least an update can cost).

    python benchmarks/bucket_apply_gpu.py [--shapes llama-3.1-8b,qwen2.5-0.5b] [--repeats 7]

Per shape: the engine's model with dummy bf16 weights at fixed addresses (as the engine allocates them), random
trainer weights with Hugging Face names packed into buckets on the same GPU (``plan_buckets`` / ``pack_bucket``,
the senders' packing), and a loader over those buffers that behaves as ``CudaIpcLoader`` does (resident,
persistent, ``close`` synchronizes the stream). Every variant is checked bitwise (each parameter slice equals its
bucket view) before it is timed; medians of ``--repeats`` applies after one warm-up each.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.report import append_results, markdown_table  # noqa: E402
from benchmarks.weight_sync_gpu import copy_bandwidth, random_state_dict, timed, write_config  # noqa: E402

logger = logging.getLogger("bucket_apply_gpu")


class ResidentBuckets:
    """A loader over this process's bucket buffers with CudaIpcLoader's flags and close."""

    buckets_resident = True
    persistent_buffers = True
    version = None

    def __init__(self, plan, buffers: list[torch.Tensor]) -> None:
        self.plan, self.buffers = plan, buffers

    def bucket_plan(self):
        return self.plan

    def iter_buckets(self):
        yield from enumerate(self.buffers)

    def names_and_shapes(self):
        return self.plan.manifest()

    def close(self) -> None:
        torch.cuda.current_stream().synchronize()


def landed(updater, plan, buffers) -> bool:
    """Every parameter slice equals its bucket view, bitwise."""
    from weight_sync.buckets import unpack_bucket
    params = updater.params
    for b, buf in enumerate(buffers):
        for name, view in unpack_bucket(plan, b, buf):
            target = updater.mapper.resolve(name)
            if target is None:
                continue
            dst = params[target.param_name].data
            dst = dst[target.shard] if target.shard is not None else dst
            if not torch.equal(dst.reshape(-1).view(torch.uint8), view.reshape(-1).view(torch.uint8)):
                return False
    return True


def measure(shape: str, repeats: int, bucket_bytes: int, dev: torch.device) -> dict:
    from engine.device_memory import FixedAddresses
    from engine.weight_update import WeightUpdater
    from engine.weights import load_model
    from weight_sync.buckets import BucketPlan, plan_buckets, pack_bucket

    with tempfile.TemporaryDirectory() as tmp:
        path = write_config(shape, Path(tmp) / shape)
        fixed = FixedAddresses.open(dev)
        model, config = load_model(path, torch.bfloat16, dev, random_weights=True,
                                   materialize=(lambda m: fixed.materialize("weights", m)) if fixed else None)
        sd = random_state_dict(path, dev)
    updater = WeightUpdater(model, config)
    sent = plan_buckets(list(sd.items()), bucket_bytes)
    buffers = [torch.empty(n, dtype=torch.uint8, device=dev) for n in sent.bucket_sizes]
    for b, buf in enumerate(buffers):
        pack_bucket(sent, b, sd, buf)
    del sd
    torch.cuda.empty_cache()
    loader = ResidentBuckets(BucketPlan.from_bytes(sent.to_bytes()), buffers)
    nbytes = sum(e.nbytes for e in sent.entries)
    out = {"shape": shape, "bytes": nbytes, "tensors": len(sent.entries), "buckets": len(buffers),
           "fixed_addresses": fixed is not None, "kernel": updater.copy_kernel_device is not None}
    out.update(time_variants(updater, loader, repeats, dev))
    del model, updater, loader, buffers
    torch.cuda.empty_cache()
    out["raw_s"] = raw_copy(nbytes, repeats, dev)
    return out


# (name, bucket_copy.KERNEL_MAX_BYTES, bulk_copy.BLOCK_WORDS, bulk_copy.NUM_WARPS) for the kernel variants; None
# in the last two: the module's default. "kernel" is what the engine runs by default.
KERNEL_VARIANTS = [("kernel", "default", None, None), ("kernel_all", None, None, None),
                   ("split_4m", 4 << 20, None, None), ("split_64m", 64 << 20, None, None),
                   ("kernel_all_b2048_w8", None, 2048, 8), ("kernel_all_b4096_w8", None, 4096, 8),
                   ("kernel_all_b1024_w8", None, 1024, 8)]


def time_variants(updater, loader: ResidentBuckets, repeats: int, dev: torch.device) -> dict:
    """Per variant: landed bitwise (from zeroed parameters) and the median apply; the kernel's chunk count."""
    from engine import bucket_copy
    from engine.kernels import bulk_copy

    out = {}
    variants = [("per_tensor", None, "default", None, None)]
    if updater.copy_kernel_device is not None:
        variants += [(name, updater.copy_kernel_device, *cfg) for name, *cfg in KERNEL_VARIANTS]
    defaults = (bucket_copy.KERNEL_MAX_BYTES, bulk_copy.BLOCK_WORDS, bulk_copy.NUM_WARPS)
    out["kernel_default"] = {"kernel_max_bytes": defaults[0], "block_words": defaults[1], "num_warps": defaults[2]}
    for name, device, max_bytes, block, warps in variants:
        updater.copy_kernel_device = device
        bucket_copy.KERNEL_MAX_BYTES = defaults[0] if max_bytes == "default" else max_bytes
        bulk_copy.BLOCK_WORDS = block or defaults[1]
        bulk_copy.NUM_WARPS = warps or defaults[2]
        try:
            with torch.no_grad():                      # so that a variant copying nothing cannot pass the check
                for param in updater.params.values():
                    param.zero_()
            updater.apply(loader)                      # warm-up: layout validated, chunk table built
            out[f"{name}_landed"] = landed(updater, loader.plan, loader.buffers)
            out[f"{name}_s"] = statistics.median(timed(lambda: updater.apply(loader), dev) for _ in range(repeats))
            plan = next(iter(updater._bucket_plans.values()))
            if name == "kernel" and plan.chunks is not None:
                table = plan.chunks.table
                out["chunks"], out["kernel_rest"] = table.num_chunks if table else 0, len(plan.chunks.rest)
                out["kernel_large"] = len(plan.chunks.large)
        finally:
            bucket_copy.KERNEL_MAX_BYTES, bulk_copy.BLOCK_WORDS, bulk_copy.NUM_WARPS = defaults
    return out


def raw_copy(nbytes: int, repeats: int, dev: torch.device) -> float:
    """Median of one device memcpy of ``nbytes``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return statistics.median(timed(lambda: dst.copy_(src), dev) for _ in range(repeats))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama-3.1-8b,qwen2.5-0.5b")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--bucket-mb", type=int, default=None, help="default: weight_sync's DEFAULT_BUCKET_BYTES")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("bucket_apply_gpu needs CUDA")
    from weight_sync.base import DEFAULT_BUCKET_BYTES
    dev = torch.device("cuda", torch.cuda.current_device())
    bucket_bytes = args.bucket_mb << 20 if args.bucket_mb else DEFAULT_BUCKET_BYTES
    bw = copy_bandwidth(dev)
    results = []
    for shape in [s for s in args.shapes.split(",") if s]:
        r = measure(shape, args.repeats, bucket_bytes, dev)
        logger.info("%s", r)
        results.append(r)
    names = ["per_tensor"] + [v[0] for v in KERNEL_VARIANTS]
    headers = ["shape", "GB", "tensors / buckets", "raw memcpy ms"] + [f"{n} ms (/ raw)" for n in names] + \
        ["default: chunks / memcpys / other", "landed bitwise"]
    rows = []
    for r in results:
        cells = [f"{r[n + '_s'] * 1e3:.2f} ({r[n + '_s'] / r['raw_s']:.2f}x)" if n + "_s" in r else "n/a"
                 for n in names]
        rows.append([r["shape"], f"{r['bytes'] / 1e9:.2f}", f"{r['tensors']} / {r['buckets']}",
                     f"{r['raw_s'] * 1e3:.2f}", *cells,
                     f"{r.get('chunks', 'n/a')} / {r.get('kernel_large', 'n/a')} / {r.get('kernel_rest', 'n/a')}",
                     "yes" if all(r.get(n + "_landed", True) for n in names) else "NO"])
    table = markdown_table(headers, rows)
    print(table)
    if not args.no_append:
        append_results("Resident bucket apply in the engine: per-tensor copies vs one kernel launch", str(dev), table,
                       notes=f"Device-to-device copy bandwidth in the same run: {bw['gbps_read_write']:.0f} GB/s "
                             f"(read + write). `benchmarks/bucket_apply_gpu.py`: WeightUpdater.apply of buckets "
                             f"resident on the same GPU (CUDA IPC's loader flags, without the IPC mapping), bucket "
                             f"size {bucket_bytes >> 20} MiB, medians of {args.repeats} after a warm-up; raw: one "
                             f"memcpy of the same bytes. kernel: the default split "
                             f"({results[0].get('kernel_default') if results else ''}); kernel_all: every tensor "
                             f"in the launch; split_N: tensors of N or more by memcpy; _bB_wW: BLOCK_WORDS, "
                             f"num_warps.")
    return results


if __name__ == "__main__":
    main()
