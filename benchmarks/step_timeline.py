"""Where a run's device time goes, step by step: CUDA events around every ``ModelRunner.launch``.

For step k (in launch order) on the main stream:
    busy_k = end_k - start_k        device time from the step's first queued work to its last (kernels, and any
                                    stall inside the step while the host was still queueing it)
    gap_k  = start_k - end_{k-1}    device time between the previous step's last work and this step's first:
                                    the device idle, waiting for the host to queue step k (0 when it was queued
                                    ahead)
Two event records per step (a few microseconds of host time); read once at the end. Steps are grouped by
kind: "graph" (a captured decode graph replayed), "mixed graph" (a step with prefill chunks replayed from
its token bucket's graph), "eager" (anything else), and whether the step
was planned ahead (chained on the previous step's sampled tokens: ``prev`` given).

An optional torch.profiler window (``profile_window=(first_step, num_steps)``) adds the top kernels by
device time over that window and the device's busy fraction in it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class StepRecord:
    kind: str          # "graph" (decode) | "mixed graph" | "eager"
    ahead: bool        # planned ahead: queued before the previous step's tokens were read
    rows: int          # scheduled items
    tokens: int        # batched tokens
    host_s: float      # host wall time of launch()
    start: torch.cuda.Event
    end: torch.cuda.Event


@dataclass
class StepTimeline:
    runner: object                       # engine.model_runner.ModelRunner
    profile_window: tuple[int, int] | None = None
    records: list[StepRecord] = field(default_factory=list)
    profile_summary: str = ""
    _prof: object = None

    def install(self) -> None:
        launch = self.runner.launch
        runner = self.runner

        def timed_launch(output, rows, prev=None):
            if not output.scheduled:
                return launch(output, rows, prev)
            self._profile_tick(len(self.records))
            if runner._graph_batch(output.scheduled) is not None:
                kind = "graph"
            elif runner._mixed_bucket(output.scheduled, output.num_batched_tokens) is not None:
                kind = "mixed graph"
            else:
                kind = "eager"
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            pending = launch(output, rows, prev)
            end.record()
            self.records.append(StepRecord(kind, prev is not None, len(output.scheduled),
                                           output.num_batched_tokens, time.perf_counter() - t0, start, end))
            return pending
        runner.launch = timed_launch

    def uninstall(self) -> None:
        if "launch" in vars(self.runner):
            del self.runner.launch
        if self._prof is not None:
            self._finish_profile()

    def _profile_tick(self, step: int) -> None:
        if self.profile_window is None:
            return
        first, count = self.profile_window
        if step == first and self._prof is None:
            from torch.profiler import ProfilerActivity, profile
            self._prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self._prof.__enter__()
            self._prof_t0 = time.perf_counter()
        elif step == first + count and self._prof is not None:
            self._finish_profile()

    def _finish_profile(self) -> None:
        torch.cuda.synchronize()
        wall = time.perf_counter() - self._prof_t0
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        busy = _device_busy_s(prof)
        try:
            table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=20)
        except Exception:  # older torch names the column cuda
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20)
        head = f"profiled window: {wall * 1e3:.1f} ms wall" + (
            f", device busy {busy * 1e3:.1f} ms ({busy / wall:.0%}; union of kernels and copies)" if busy else "")
        self.profile_summary = head + "\n" + table

    def summary(self) -> dict:
        """Per (kind, ahead): steps, mean rows/tokens, host launch ms, device busy ms, device gap ms (sums in s)."""
        torch.cuda.synchronize()
        groups: dict[str, dict] = {}
        prev_end = None
        for r in self.records:
            key = f"{r.kind}{' ahead' if r.ahead else ''}"
            g = groups.setdefault(key, dict(steps=0, rows=0, tokens=0, host_s=0.0, busy_s=0.0, gap_s=0.0))
            g["steps"] += 1
            g["rows"] += r.rows
            g["tokens"] += r.tokens
            g["host_s"] += r.host_s
            g["busy_s"] += r.start.elapsed_time(r.end) / 1e3
            if prev_end is not None:
                g["gap_s"] += max(0.0, prev_end.elapsed_time(r.start) / 1e3)
            prev_end = r.end
        for g in groups.values():
            n = max(1, g["steps"])
            g["mean_rows"] = g.pop("rows") / n
            g["mean_tokens"] = g.pop("tokens") / n
            g["host_ms"] = g["host_s"] / n * 1e3
            g["busy_ms"] = g["busy_s"] / n * 1e3
        return groups


def _device_busy_s(prof) -> float:
    """Union of device activity intervals (kernels, copies, memsets) in the profile, in seconds (0 if the
    profiler's raw events are not readable on this torch)."""
    try:
        events = prof.profiler.kineto_results.events()
        spans = sorted((e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
                       if e.device_type() == torch.autograd.DeviceType.CUDA)
    except Exception:
        return 0.0
    busy, cur_s, cur_e = 0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    return busy / 1e9
