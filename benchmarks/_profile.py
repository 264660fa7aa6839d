"""What a torch.profiler trace of a few steps says about one rank's GPU time: how long
communication (NCCL kernels) ran, how much of that was hidden under compute kernels,
how long the GPU sat idle, and which kernels took the time.

Intervals are merged before they are measured, so collectives running side by side on
two streams count once, and "hidden" means some compute kernel ran at the same moment.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
from _harness import gc_paused

__all__ = ["gpu_time_summary", "profile_steps"]

Intervals = list[tuple[float, float]]


def _merge(intervals: Intervals) -> Intervals:
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def _length(intervals: Intervals) -> float:
    return sum(b - a for a, b in intervals)


def _overlap(a: Intervals, b: Intervals) -> float:
    """Total length of the intersection of two merged, sorted interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def gpu_time_summary(prof: torch.profiler.profile, steps: int, top: int = 12) -> dict:
    """Per-step seconds of communication, its hidden fraction, compute and idle time, and
    the `top` kernels by time (microseconds in the trace become seconds here)."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:
        return {"error": "the profiler recorded no CUDA kernels"}
    is_comm = lambda e: "nccl" in e.name.lower()  # noqa: E731
    spans = lambda es: _merge([(e.time_range.start, e.time_range.end) for e in es])  # noqa: E731
    comm, compute, busy = spans(filter(is_comm, kernels)), spans(k for k in kernels if not is_comm(k)), spans(kernels)
    window = max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
    hidden = _overlap(comm, compute)
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in kernels:
        by_name[e.name].append(e.time_range.end - e.time_range.start)
    per_step = lambda us: us / 1e6 / steps  # noqa: E731
    return {
        "comm_s": per_step(_length(comm)),
        "hidden_fraction": hidden / _length(comm) if comm else None,
        "exposed_comm_s": per_step(_length(comm) - hidden),
        "compute_s": per_step(_length(compute)),
        "idle_s": per_step(window - _length(busy)),
        "top_kernels": [
            {"name": name[:90], "s": per_step(sum(ts)), "calls": len(ts) / steps}
            for name, ts in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
        ],
    }


def profile_steps(step: Callable[[], None], steps: int, trace: str | None = None, top: int = 12) -> dict:
    """Run `step` under the CUDA profiler and summarize the GPU time of its last `steps`
    runs. Two runs come first, unrecorded: the ranks start their profilers at different
    moments, and the first collective after that waits for the latest rank (once ~0.4 s
    on 2 H200s), which a recorded run would count as communication. The cyclic GC is
    paused, as in the timed steps: a collection stalls one rank's host, and the other
    rank's collectives wait for it. With `trace`, the host's ops are recorded too and the
    whole trace is written there (Chrome's format, gzipped: open it in Perfetto)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    schedule = torch.profiler.schedule(wait=1, warmup=1, active=steps)
    activities = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if trace else [])
    with gc_paused(), torch.profiler.profile(activities=activities, schedule=schedule) as prof:
        for i in range(steps + 2):
            step()
            if i == steps + 1:
                torch.cuda.synchronize()
            prof.step()
    if trace:
        prof.export_chrome_trace(trace)
    return gpu_time_summary(prof, steps, top=top)
