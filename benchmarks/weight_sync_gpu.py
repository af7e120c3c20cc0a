"""GPU mode of ``benchmarks/weight_sync.py``: a trainer process updates an engine process, next to the raw transfer
of the same bytes measured in the same run.

    python -m benchmarks.weight_sync --gpu [--tiny] [--shapes qwen2.5-1.5b,llama-3.1-8b] [--repeats 5]

Cases (each its own pair of spawned processes; the parent never touches the GPU):

- copy bandwidth: 1 GiB device-to-device copy in the engine process, counting bytes read + written.
- IPC (one GPU): trainer (``CudaIpcSender``) and engine (``LLMEngine``, load_format="dummy", bf16) on cuda:0.
  Update = engine side, from ``CudaIpcLoader`` creation to ``update_weights`` returning plus a device synchronize
  (so the copies are done), with ``backup_budget_bytes=0`` and with the default backup. Raw = in the engine process,
  the IPC-mapped buckets of the same bytes copied into one scratch buffer (the handles are opened before the clock
  starts; the open time is reported apart as "IPC open"). Trainer pack time is reported apart.
- NCCL (two GPUs): trainer rank 0 on cuda:0 (``DistributedSender``), engine rank 1 on cuda:1 (``DistributedLoader``),
  dedicated group from ``init_weight_sync_group``. Raw = bucketed broadcasts of the same bucket sizes in the same
  group, back to back. Each timed region starts after a barrier broadcast and a synchronize on the engine.
  The first update of each shape is the keep-mode demo: a request is mid-generation (``step`` a few times),
  the update is applied with ``mode="keep"``, stepping continues; its per-token versions are reported.
- Verification (both cases): the trainer's per-tensor checksums (int64 sums over the raw bits, plain and
  position-weighted) equal the engine's parameters' after the updates; in the IPC case also the updated engine's
  greedy output equals a fresh engine's given the trainer's tensors (``StateDictLoader`` over per-tensor IPC views),
  and differs from the output before the update.

Without CUDA, ``--tiny`` runs the same code on the CPU (tiny qwen2 config, gloo instead of NCCL, IPC skipped): a smoke
of the code paths, not a figure.
"""
from __future__ import annotations

import gc
import json
import os
import socket
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch

# NVLink multicast stays off on shared hosts (KINDS.md); children inherit these.
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)

SHAPES = ("qwen2.5-1.5b", "llama-3.1-8b")
TINY = "tiny-qwen2"
_TINY_FIELDS = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                    tie_word_embeddings=True, bos_token_id=0, eos_token_id=1,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
TRAINER_SEED = 1234
PROMPTS = ([11, 42, 7, 99, 3, 250, 18, 77, 5, 301, 64, 12], [200, 13, 8, 450, 91, 2, 33, 170, 6, 59, 400, 21, 15, 88])
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ----------------------------------------------------------------------------------------------- model shapes
def write_config(shape: str, path: str | Path) -> Path:
    """config.json of a published shape (engine.tiny_models.REAL_SHAPES) or of the tiny CPU smoke model."""
    from engine.tiny_models import write_real_shape_config

    if shape != TINY:
        return write_real_shape_config(shape, path)
    import transformers

    config = transformers.Qwen2Config(**_TINY_FIELDS)
    config.architectures = ["Qwen2ForCausalLM"]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    return path


def hf_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name of a complete checkpoint of this config -> its shape (the engine's view)."""
    from engine.model_config import ModelConfig
    from engine.weights import WeightMapper

    return WeightMapper(ModelConfig.from_pretrained(path)).expected_hf_names()


def random_state_dict(path: str | Path, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                      seed: int = TRAINER_SEED) -> dict[str, torch.Tensor]:
    """Random trainer weights with HF names, drawn directly on ``device`` (no CPU init): N(0, 0.02), norms 1 +/- 0.05."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in hf_shapes(path).items():
        t = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        if name.endswith("norm.weight"):
            t.mul_(0.05).add_(1.0)
        else:
            t.mul_(0.02)
        out[name] = t
    return out


def bucket_sizes(path: str | Path, bucket_bytes: int, dtype: torch.dtype = torch.bfloat16) -> list[int]:
    """The bucket sizes a sender makes of ``random_state_dict(path)`` (same order), without any tensor data."""
    from weight_sync.buckets import plan_buckets

    meta = [(n, torch.empty(s, dtype=dtype, device="meta")) for n, s in hf_shapes(path).items()]
    return list(plan_buckets(meta, bucket_bytes).bucket_sizes)


# ----------------------------------------------------------------------------------------------- verification
def checksums(named: dict[str, torch.Tensor], chunk: int = 1 << 26) -> dict[str, list[int]]:
    """name -> [sum of the raw bits as ints, position-weighted sum]; one host sync for all tensors. Integer sums
    wrap identically in any order, so equal bits give equal sums on any device."""
    sums = []
    for t in named.values():
        x = t.detach().contiguous().reshape(-1).view(_INT_OF_SIZE[t.element_size()])
        s = torch.zeros(2, dtype=torch.int64, device=x.device)
        for off in range(0, x.numel(), chunk):
            c = x[off:off + chunk].to(torch.int64)
            w = torch.arange(off, off + c.numel(), device=x.device, dtype=torch.int64).remainder_(65521).add_(1)
            s[0] += c.sum()
            s[1] += (c * w).sum()
        sums.append(s)
    values = torch.stack(sums).tolist() if sums else []
    return dict(zip(named.keys(), values))


def engine_tensors(engine, names) -> dict[str, torch.Tensor]:
    """The engine's parameter slice that each HF name landed in (fused qkv / gate_up rows included)."""
    out = {}
    for name in names:
        target = engine.updater.mapper.resolve(name)
        if target is None:
            continue
        p = engine.updater.params[target.param_name].data
        out[name] = p if target.shard is None else p[target.shard]
    return out


def compare_checksums(trainer: dict[str, list[int]], engine) -> dict[str, Any]:
    mine = checksums(engine_tensors(engine, trainer))
    bad = sorted(n for n in mine if mine[n] != trainer[n])
    return {"tensors_checked": len(mine), "mismatched": bad[:8], "num_mismatched": len(bad),
            "bitwise_equal": not bad and len(mine) == len(trainer)}


# ----------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of ``fn`` with the device idle before and drained after."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> dict[str, float]:
    """Median device-to-device copy of ``nbytes`` (random data); GB/s counts bytes read + written."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    t = statistics.median(timed(lambda: dst.copy_(src), device) for _ in range(repeats))
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"bytes": nbytes, "seconds": t, "gbps_read_write": 2 * nbytes / t / 1e9}


def _stats(times: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "all_s": times}


# ----------------------------------------------------------------------------------------------- engine
def make_engine(path: str | Path, device: torch.device, tiny: bool):
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    dev = str(device) if device.type == "cpu" else f"cuda:{device.index}"
    return LLMEngine(EngineConfig(
        model=str(path), device=dev, dtype="bfloat16", load_format="dummy", block_size=16,
        num_kv_blocks=64 if tiny else 256, max_num_seqs=4, max_num_batched_tokens=512 if tiny else 2048,
        max_model_len=512 if tiny else 2048, enable_prefix_caching=False, cuda_graph_max_batch=4, seed=0))


def greedy(engine, max_tokens: int = 16) -> list[list[int]]:
    from engine.sampling import SamplingParams

    prompts = [[t % engine.vocab_size for t in p] for p in PROMPTS]
    return [list(c.token_ids) for c in engine.generate(prompts, SamplingParams(max_tokens=max_tokens,
                                                                                ignore_eos=True))]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _Trainer:
    """Engine-side handle on the trainer process: a command queue and a reply queue."""

    def __init__(self, cmd_q, reply_q, timeout_s: float = 300.0) -> None:
        self.cmd_q, self.reply_q, self.timeout_s = cmd_q, reply_q, timeout_s

    def post(self, *cmd) -> None:
        self.cmd_q.put(cmd)

    def reply(self):
        status, value = self.reply_q.get(timeout=self.timeout_s)
        if status != "ok":
            raise RuntimeError(f"trainer failed:\n{value}")
        return value

    def call(self, *cmd):
        self.post(*cmd)
        return self.reply()


def load_trainer_weights(path: str | Path, dev: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainer's random bf16 weights on ``dev`` and what to report of them (count, bytes, seconds)."""
    t0 = time.perf_counter()
    sd = random_state_dict(path, dev)
    _sync(dev)
    return sd, {"tensors": len(sd), "bytes": sum(t.numel() * t.element_size() for t in sd.values()),
                "init_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------- IPC case
def ipc_trainer_main(cmd_q, reply_q) -> None:
    """Trainer on cuda:0: holds a bf16 state dict and packs it into CUDA IPC buckets on demand."""
    from torch.multiprocessing.reductions import reduce_tensor

    from weight_sync import CudaIpcSender

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 0)
    sd: Optional[dict] = None
    sender: Optional[CudaIpcSender] = None
    shared = None
    while True:
        cmd, *args = cmd_q.get()
        if cmd == "quit":
            return
        try:
            if cmd == "load":
                sd, value = load_trainer_weights(args[0], dev)
            elif cmd == "pack":  # one persistent sender per bucket size: same buffers, same handles
                bucket_bytes, version = args
                if sender is None or sender.bucket_bytes != bucket_bytes:
                    if sender is not None:
                        sender.release()
                    sender = CudaIpcSender(bucket_bytes=bucket_bytes, device=dev)
                t0 = time.perf_counter()
                payload = sender.pack(sd, version=version)  # synchronizes before returning
                value = (payload, time.perf_counter() - t0)
            elif cmd == "release":
                if sender is not None:
                    sender.release()
                sender = None
                torch.cuda.ipc_collect()
                value = None
            elif cmd == "checksums":
                value = checksums(sd)
            elif cmd == "share":  # per-tensor IPC views, for the fresh-engine check (untimed)
                torch.cuda.ipc_collect()
                torch.cuda.empty_cache()  # hand the released bucket memory back for the fresh engine
                shared = {n: reduce_tensor(t) for n, t in sd.items()}
                value = shared
            elif cmd == "unshare":
                shared = None
                torch.cuda.ipc_collect()
                value = None
            elif cmd == "free":
                sd = sender = shared = None
                _free(dev)
                torch.cuda.ipc_collect()
                value = None
            else:
                raise ValueError(f"unknown command {cmd!r}")
            reply_q.put(("ok", value))
        except BaseException:
            reply_q.put(("error", traceback.format_exc()))


def ipc_engine_main(shapes: list[tuple[str, str]], bucket_mbs: list[int], repeats: int, cmd_q, reply_q,
                    result_q) -> None:
    """Engine on cuda:0 and driver of the IPC case; results go to ``result_q`` as each shape finishes."""
    try:
        from weight_sync import CudaIpcLoader, StateDictLoader
        from weight_sync.cuda_ipc import unmap_all

        torch.cuda.set_device(0)
        dev = torch.device("cuda", 0)
        trainer = _Trainer(cmd_q, reply_q)
        result_q.put(("card", {"ipc_device": torch.cuda.get_device_name(dev), "torch": torch.__version__}))
        result_q.put(("copy_bw", copy_bandwidth(dev)))
        for shape, path in shapes:
            info = trainer.call("load", path)
            t0 = time.perf_counter()
            engine = make_engine(path, dev, tiny=False)
            res: dict[str, Any] = {"shape": shape, **info, "engine_init_s": time.perf_counter() - t0, "rows": []}
            before = greedy(engine)
            version = 0

            def update(bucket_bytes: int, backup: bool) -> tuple[float, float, int]:
                nonlocal version
                version += 1
                payload, pack_s = trainer.call("pack", bucket_bytes, version)

                def go():
                    engine.update_weights(CudaIpcLoader(payload), version=version,
                                          backup_budget_bytes=None if backup else 0)

                t = timed(go, dev)  # the loader's close synchronizes: the trainer may refill its buffers after
                return t, pack_s, len(payload.handles)

            for mb in bucket_mbs:
                bb = mb << 20
                # This bucket size's buffers: opened here once for the raw copy (the open timed apart), then the
                # first update (maps them, validates the layout), then steady-state updates into the same buffers.
                payload, _ = trainer.call("pack", bb, None)
                t0 = time.perf_counter()
                bufs = [rebuild(*args) for rebuild, args in payload.handles]
                _sync(dev)
                opens = [time.perf_counter() - t0]
                scratch = torch.empty(max(b.numel() for b in bufs), dtype=torch.uint8, device=dev)
                warm, _, nbuckets = update(bb, True)
                raw, nobak, bak, packs = [], [], [], []
                for _ in range(repeats):
                    raw.append(timed(lambda: [scratch[:b.numel()].copy_(b) for b in bufs], dev))
                    t, p, _ = update(bb, False)
                    nobak.append(t)
                    packs.append(p)
                    t, p, _ = update(bb, True)
                    bak.append(t)
                    packs.append(p)
                del bufs, scratch, payload
                unmap_all()
                trainer.call("release")
                res["rows"].append({"bucket_mb": mb, "buckets": nbuckets, "warmup_s": warm, "raw": _stats(raw),
                                    "ipc_open": _stats(opens), "update_no_backup": _stats(nobak),
                                    "update_backup": _stats(bak), "trainer_pack": _stats(packs)})
                _free(dev)
            res["final_version"] = version
            res["verify"] = compare_checksums(trainer.call("checksums"), engine)
            result_q.put(("ipc", res))  # timings first: the fresh-engine check below may run out of time
            after = greedy(engine)
            fresh_check: dict[str, Any] = {"shape": shape}
            try:
                shared = trainer.call("share")
                tensors = {n: rebuild(*args) for n, (rebuild, args) in shared.items()}
                _free(dev)
                fresh = make_engine(path, dev, tiny=False)
                fresh.update_weights(StateDictLoader(tensors), version=1, backup_budget_bytes=0)
                fresh_out = greedy(fresh)
                del fresh, tensors, shared
                fresh_check.update({"greedy_equal_fresh": after == fresh_out,
                                    "greedy_changed_by_update": after != before, "greedy_tokens": after})
            except torch.OutOfMemoryError as e:
                fresh_check["greedy_equal_fresh"] = f"not run: out of memory ({str(e).splitlines()[0]})"
            _free(dev)
            trainer.call("unshare")
            del engine
            _free(dev)
            trainer.call("free")
            result_q.put(("ipc_fresh", fresh_check))
    except BaseException:
        result_q.put(("error", "ipc: " + traceback.format_exc()))
    finally:
        cmd_q.put(("quit",))
        result_q.put(("done", None))


# ----------------------------------------------------------------------------------------------- NCCL case
def _devices(cuda: bool) -> tuple[torch.device, torch.device]:
    return (torch.device("cuda", 0), torch.device("cuda", 1)) if cuda else (torch.device("cpu"), torch.device("cpu"))


def nccl_trainer_main(port: int, cuda: bool, cmd_q, reply_q) -> None:
    """Rank 0 on cuda:0 (gloo on the CPU without CUDA): sends updates and raw broadcasts when told."""
    from weight_sync import DistributedSender, init_weight_sync_group

    dev, _ = _devices(cuda)
    if cuda:
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(1)
    try:
        group = init_weight_sync_group("127.0.0.1", port, 0, 2, device=dev, timeout_s=300)
    except BaseException:
        reply_q.put(("error", traceback.format_exc()))
        return
    barrier = torch.zeros(1, device=dev)
    sd = None
    while True:
        cmd, *args = cmd_q.get()
        if cmd == "quit":
            return
        try:
            if cmd == "load":
                sd, value = load_trainer_weights(args[0], dev)
            elif cmd == "send":
                bucket_bytes, version = args
                group.broadcast(barrier, 0).wait()
                value = DistributedSender(group, bucket_bytes=bucket_bytes).send(sd, version=version)
            elif cmd == "raw":
                sizes = args[0]
                slots = [torch.randint(0, 256, (max(sizes),), dtype=torch.uint8, device=dev) for _ in range(2)]
                group.broadcast(barrier, 0).wait()
                works = [group.broadcast(slots[i % 2][:s], 0) for i, s in enumerate(sizes)]
                for w in works:
                    w.wait()
                _sync(dev)
                del slots
                value = sum(sizes)
            elif cmd == "checksums":
                value = checksums(sd)
            elif cmd == "free":
                sd = None
                _free(dev)
                value = None
            else:
                raise ValueError(f"unknown command {cmd!r}")
            reply_q.put(("ok", value))
        except BaseException:
            reply_q.put(("error", traceback.format_exc()))


def nccl_engine_main(port: int, cuda: bool, shapes: list[tuple[str, str]], bucket_mbs: list[int], repeats: int,
                     demo_shapes: list[str], cmd_q, reply_q, result_q) -> None:
    """Rank 1 (engine on cuda:1, or the CPU) and driver of the two-GPU case."""
    try:
        from engine.sampling import SamplingParams
        from weight_sync import DistributedLoader, init_weight_sync_group

        _, dev = _devices(cuda)
        if cuda:
            torch.cuda.set_device(dev)
            result_q.put(("card", {"nccl_devices": [torch.cuda.get_device_name(0), torch.cuda.get_device_name(1)],
                                   "nccl_version": ".".join(map(str, torch.cuda.nccl.version()))}))
        else:
            torch.set_num_threads(1)
        trainer = _Trainer(cmd_q, reply_q)
        group = init_weight_sync_group("127.0.0.1", port, 1, 2, device=dev, timeout_s=300)
        barrier = torch.zeros(1, device=dev)

        def after_barrier() -> None:
            group.broadcast(barrier, 0).wait()
            _sync(dev)

        for shape, path in shapes:
            tiny = shape == TINY
            info = trainer.call("load", path)
            t0 = time.perf_counter()
            engine = make_engine(path, dev, tiny=tiny)
            res: dict[str, Any] = {"shape": shape, **info, "engine_init_s": time.perf_counter() - t0, "rows": []}
            version = 0

            def update(bucket_bytes: int, backup: bool, mode: str = "keep") -> float:
                nonlocal version
                version += 1
                trainer.post("send", bucket_bytes, version)
                after_barrier()
                t = timed(lambda: engine.update_weights(DistributedLoader(group, src=0), mode=mode,
                                                        backup_budget_bytes=None if backup else 0), dev)
                trainer.reply()
                return t

            first_bb = bucket_mbs[0] << 20
            if shape in demo_shapes:  # keep-mode: a request is mid-generation when the update lands
                rid = engine.add_request(list(PROMPTS[0]), SamplingParams(max_tokens=24, ignore_eos=True))
                done = []
                for _ in range(6):
                    done += engine.step()
                demo_update_s = update(first_bb, True, mode="keep")
                while engine.has_unfinished():
                    done += engine.step()
                c = next(c for c in done if c.request_id == rid)
                res["keep_demo"] = {"update_s": demo_update_s, "versions": list(c.versions),
                                    "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason,
                                    "steps_before_update": 6}
            else:
                update(first_bb, True)  # warm-up
            for mb in bucket_mbs:
                bb = mb << 20
                sizes = bucket_sizes(path, bb)
                update(bb, True)  # warm-up of this bucket size
                raw, nobak, bak = [], [], []
                for _ in range(repeats):
                    slots = [torch.empty(max(sizes), dtype=torch.uint8, device=dev) for _ in range(2)]
                    trainer.post("raw", sizes)
                    after_barrier()

                    def recv():
                        works = [group.broadcast(slots[i % 2][:s], 0) for i, s in enumerate(sizes)]
                        for w in works:
                            w.wait()

                    raw.append(timed(recv, dev))
                    trainer.reply()
                    del slots
                    nobak.append(update(bb, False))
                    bak.append(update(bb, True))
                res["rows"].append({"bucket_mb": mb, "buckets": len(sizes), "raw": _stats(raw),
                                    "update_no_backup": _stats(nobak), "update_backup": _stats(bak)})
                _free(dev)
            res["final_version"] = version
            res["verify"] = compare_checksums(trainer.call("checksums"), engine)
            del engine
            _free(dev)
            trainer.call("free")
            result_q.put(("nccl", res))
    except BaseException:
        result_q.put(("error", "nccl: " + traceback.format_exc()))
    finally:
        cmd_q.put(("quit",))
        result_q.put(("done", None))


# ----------------------------------------------------------------------------------------------- orchestration
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(trainer_target, trainer_args, engine_target, engine_args, results: dict, on_result,
              timeout_s: float) -> None:
    """Spawn trainer + engine; feed each message of the engine's result queue to ``on_result``."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    cmd_q, reply_q, result_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
    trainer = ctx.Process(target=trainer_target, args=(*trainer_args, cmd_q, reply_q), daemon=True)
    engine = ctx.Process(target=engine_target, args=(*engine_args, cmd_q, reply_q, result_q), daemon=True)
    trainer.start()
    engine.start()
    deadline = time.monotonic() + timeout_s
    ok = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                results.setdefault("errors", []).append(f"{engine_target.__name__}: timed out after {timeout_s} s")
                break
            try:
                kind, value = result_q.get(timeout=min(left, 5.0))
            except Exception:  # queue.Empty
                if not engine.is_alive():
                    results.setdefault("errors", []).append(
                        f"{engine_target.__name__}: engine process died (exit code {engine.exitcode})")
                    break
                continue
            if kind == "done":
                ok = True
                break
            on_result(kind, value)
    finally:
        if not ok:  # timed out or died: no grace
            engine.kill()
        for p in (engine, trainer):
            p.join(timeout=30 if ok else 5)
        for p in (engine, trainer):
            if p.is_alive():
                p.kill()
                p.join(timeout=10)


def run(shapes: list[str], bucket_mbs: list[int], repeats: int, tiny: bool, demo_shapes: Optional[list[str]],
        write: Callable[[dict], None], root: Path, case_timeout_s: float = 600.0,
        total_timeout_s: Optional[float] = None) -> dict:
    """Run every case that this machine allows; ``write(results)`` after each shape (partial results survive).
    ``total_timeout_s``: the IPC case gets at most 55% of it, the NCCL case what is left."""
    start = time.monotonic()
    total = total_timeout_s or 2 * case_timeout_s
    cuda = torch.cuda.is_available()
    ngpu = torch.cuda.device_count() if cuda else 0
    results: dict[str, Any] = {"mode": "gpu" if cuda else "cpu-fallback (code paths only, not GPU figures)",
                               "shapes": shapes, "bucket_mb": bucket_mbs, "repeats": repeats, "ipc": [], "nccl": [],
                               "not_run": []}
    paths = [(s, str(write_config(s, root / s))) for s in shapes]
    demo = list(shapes) if demo_shapes is None else demo_shapes

    def on_result(kind: str, value: Any) -> None:
        if kind in ("ipc", "nccl"):
            results[kind].append(value)
        elif kind == "ipc_fresh":
            for r in results["ipc"]:
                if r["shape"] == value["shape"]:
                    r["verify"].update(value)
        elif kind == "error":
            results.setdefault("errors", []).append(value)
            print(value, flush=True)
        else:
            results[kind] = {**results.get(kind, {}), **value} if isinstance(value, dict) else value
        if kind not in ("card",):
            print(f"[weight_sync --gpu] {kind}: {_brief(kind, value)}", flush=True)
        write(results)

    if cuda and not tiny:
        _run_pair(ipc_trainer_main, (), ipc_engine_main, (paths, bucket_mbs, repeats), results, on_result,
                  min(case_timeout_s, 0.55 * total))
    else:
        results["not_run"].append("IPC case: " + ("needs CUDA" if not cuda else "not run with --tiny"))
        if not cuda:
            results["copy_bw"] = copy_bandwidth(torch.device("cpu"), 64 << 20, 3)
    if (cuda and ngpu >= 2 and not tiny) or not cuda:
        port = _free_port()
        _run_pair(nccl_trainer_main, (port, cuda), nccl_engine_main, (port, cuda, paths, bucket_mbs, repeats, demo),
                  results, on_result, min(case_timeout_s, total - (time.monotonic() - start) - 5))
    else:
        results["not_run"].append(f"two-GPU NCCL case: {ngpu} GPU(s) visible" if not tiny else
                                  "two-GPU NCCL case: not run with --tiny on a GPU machine")
    write(results)
    return results


def _brief(kind: str, value: Any) -> str:
    if kind in ("ipc", "nccl"):
        rows = ", ".join(f"{r['bucket_mb']}MB: raw {r['raw']['median_s'] * 1e3:.1f} ms, update "
                         f"{r['update_no_backup']['median_s'] * 1e3:.1f} / {r['update_backup']['median_s'] * 1e3:.1f}"
                         f" ms" for r in value["rows"])
        return f"{value['shape']} {rows}; verify {value.get('verify')}"
    return str(value)[:300]


# ----------------------------------------------------------------------------------------------- report
def _ms(s: float) -> str:
    return f"{s * 1e3:,.1f}"


def tables(results: dict) -> str:
    out = []
    bw = results.get("copy_bw")
    if bw:
        out.append(f"Copy bandwidth ({bw['bytes'] >> 20} MiB device-to-device, median): "
                   f"{bw['gbps_read_write']:,.0f} GB/s counting bytes read + written "
                   f"({_ms(bw['seconds'])} ms).\n")
    if results["ipc"]:
        out.append("**CUDA IPC, one GPU** (trainer and engine in separate processes; update = engine side, loader "
                   "creation to `update_weights` returned + synchronize; raw = the same bytes copied from the "
                   "IPC-mapped buckets in the engine process, handles opened beforehand)\n")
        out.append("| shape | MB | bucket MB | buckets | raw copy ms (GB/s) | update, no backup ms | / raw | "
                   "update, default backup ms | / raw | first update ms | IPC open ms | trainer pack ms | bitwise | "
                   "greedy = fresh |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
        for r in results["ipc"]:
            v = r.get("verify", {})
            for row in r["rows"]:
                raw, nb, b = (row[k]["median_s"] for k in ("raw", "update_no_backup", "update_backup"))
                out.append(f"| {r['shape']} | {r['bytes'] / 1e6:,.0f} | {row['bucket_mb']} | {row['buckets']} | "
                           f"{_ms(raw)} ({r['bytes'] / raw / 1e9:,.0f}) | {_ms(nb)} | {nb / raw:.2f}x | {_ms(b)} | "
                           f"{b / raw:.2f}x | {_ms(row['warmup_s'])} | {_ms(row['ipc_open']['median_s'])} | "
                           f"{_ms(row['trainer_pack']['median_s'])} | {v.get('bitwise_equal')} | "
                           f"{v.get('greedy_equal_fresh')} |")
        out.append("")
    if results["nccl"]:
        out.append("**NCCL, two GPUs** (trainer rank 0 on cuda:0, engine rank 1 on cuda:1, dedicated group; update = "
                   "engine side after a barrier, loader creation to `update_weights` returned + synchronize; raw = "
                   "broadcasts of the same bucket sizes in the same group, back to back)\n")
        out.append("| shape | MB | bucket MB | buckets | raw broadcast ms (GB/s) | update, no backup ms | / raw | "
                   "update, default backup ms | / raw | bitwise |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in results["nccl"]:
            v = r.get("verify", {})
            for row in r["rows"]:
                raw, nb, b = (row[k]["median_s"] for k in ("raw", "update_no_backup", "update_backup"))
                out.append(f"| {r['shape']} | {r['bytes'] / 1e6:,.0f} | {row['bucket_mb']} | {row['buckets']} | "
                           f"{_ms(raw)} ({r['bytes'] / raw / 1e9:,.0f}) | {_ms(nb)} | {nb / raw:.2f}x | {_ms(b)} | "
                           f"{b / raw:.2f}x | {v.get('bitwise_equal')} |")
        out.append("")
        for r in results["nccl"]:
            d = r.get("keep_demo")
            if d:
                out.append(f"Keep mode, {r['shape']}: a request stepped {d['steps_before_update']} times, update "
                           f"applied between steps ({_ms(d['update_s'])} ms), stepping continued; per-token versions "
                           f"`{d['versions']}` ({d['num_tokens']} tokens, {d['finish_reason']}).")
        out.append("")
    for item in results.get("not_run", []):
        out.append(f"Not run: {item}.")
    for err in results.get("errors", []):
        out.append(f"Error: `{err.strip().splitlines()[-1]}`")
    return "\n".join(out).strip() + "\n"


def verdicts(results: dict) -> list[str]:
    """The issue's targets, judged on the default bucket size (first in the list) and on the best one."""
    lines = []
    for r in results["ipc"]:
        for row in r["rows"]:
            raw, nb, b = (row[k]["median_s"] for k in ("raw", "update_no_backup", "update_backup"))
            lines.append(f"IPC {r['shape']} {row['bucket_mb']} MB buckets: no backup {nb / raw:.2f}x raw "
                         f"({'meets' if nb <= 1.5 * raw else 'misses'} <= 1.5x), default backup {b / raw:.2f}x "
                         f"({'meets' if b <= 1.5 * raw else 'misses'})"
                         + (f"; 8B under 1 s: {'yes' if max(nb, b) < 1 else 'no'} ({_ms(b)} ms with backup)"
                            if "8b" in r["shape"] else ""))
    for r in results["nccl"]:
        for row in r["rows"]:
            raw, nb, b = (row[k]["median_s"] for k in ("raw", "update_no_backup", "update_backup"))
            lines.append(f"NCCL {r['shape']} {row['bucket_mb']} MB buckets: no backup {nb / raw:.2f}x raw "
                         f"({'meets' if nb <= 1.5 * raw else 'misses'} <= 1.5x), default backup {b / raw:.2f}x "
                         f"({'meets' if b <= 1.5 * raw else 'misses'})")
    return lines


def markdown(results: dict, commit: str, stamp: str) -> str:
    card = results.get("card", {})
    cards = card.get("nccl_devices") or [card.get("ipc_device", "CPU")]
    used = "CPU only" if results["mode"].startswith("cpu") else f"{len(card.get('nccl_devices', [])) or 1} GPU(s) used"
    head = (f"\n## weight_sync --gpu — {stamp}\n\n{' + '.join(dict.fromkeys(cards))} ({used}) · torch {card.get('torch', torch.__version__)}"
            f"{' · NCCL ' + card['nccl_version'] if 'nccl_version' in card else ''} · commit `{commit}` · "
            f"mode {results['mode']} · bf16 random weights with HF names (trainer) onto `LLMEngine(load_format="
            f"'dummy')`; {results['repeats']} repeats, median; figures in ms.\n\n")
    body = tables(results)
    v = verdicts(results)
    if v:
        body += "\nAgainst the issue's targets:\n\n" + "\n".join(f"- {line}" for line in v) + "\n"
    return head + body


def save(results: dict, out_dir: Path, commit: str, stamp: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "weight_sync_gpu.json").write_text(json.dumps({**results, "commit": commit, "stamp": stamp},
                                                             indent=1, default=str))
    md = out_dir / "weight_sync_gpu.md"
    md.write_text(markdown(results, commit, stamp))
    return md
