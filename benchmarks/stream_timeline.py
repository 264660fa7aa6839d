"""One profiled step of a `speed_vs_torch` system, rank 0, as a timeline per CUDA stream:
when each stream's kernels and copies ran, how busy each was, where the compute stream
waited. The whole torch.profiler trace is too large to bring back from the device;
this keeps what a reader needs to see what bounds a step that overlaps copies with
compute (offload).

    python benchmarks/stream_timeline.py --system sharded_zero3_offload_device --out timeline.json
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
from collections import defaultdict

import speed_vs_torch as svt
import torch
from _harness import common_args, gc_paused, provenance, report
from _profile import _merge

import sharded


def _kind(event: dict) -> str:
    name = event["name"]
    if event.get("cat") == "gpu_memcpy":
        return "copy " + ("up" if "HtoD" in name else "down" if "DtoH" in name else "on device")
    if "nccl" in name.lower():
        return "nccl"
    return "kernel"


def timeline(trace: dict, gap_ms: float) -> dict:
    """Per (stream, kind): busy ms and its merged spans (ms from the first GPU event); the
    compute stream's (the one with the most kernel time) gaps longer than `gap_ms`."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    t0 = min(e["ts"] for e in events)
    spans: dict[tuple[int, str], list] = defaultdict(list)
    nbytes: dict[tuple[int, str], int] = defaultdict(int)
    for e in events:
        key = (e["args"].get("stream", -1), _kind(e))
        spans[key].append(((e["ts"] - t0) / 1e3, (e["ts"] + e["dur"] - t0) / 1e3))
        nbytes[key] += int(e["args"].get("bytes", 0))
    merged = {k: _merge(v) for k, v in spans.items()}
    compute = max((k for k in merged if k[1] == "kernel"), key=lambda k: sum(b - a for a, b in merged[k]))
    gaps = [(a[1], b[0]) for a, b in zip(merged[compute], merged[compute][1:]) if b[0] - a[1] > gap_ms]
    return {
        "window_ms": max(b for v in merged.values() for _, b in v),
        "compute_stream": compute[0],
        "streams": {
            f"{s} {kind}": {"busy_ms": round(sum(b - a for a, b in v), 3), "first_ms": round(v[0][0], 3), "last_ms": round(v[-1][1], 3),
                            "gb": round(nbytes[(s, kind)] / 1e9, 3), "spans_ms": [(round(a, 2), round(b, 2)) for a, b in v]}
            for (s, kind), v in sorted(merged.items())
        },
        "compute_gaps_ms": [(round(a, 2), round(b - a, 2)) for a, b in gaps],
    }


def measure(name: str, args) -> dict:
    dev = sharded.distributed.device()
    cfg = svt._config(args)
    world = sharded.distributed.world_size()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch * world, args.seq), generator=g).to(dev)
    y = torch.randint(0, cfg.vocab_size, (args.batch * world, args.seq), generator=g).to(dev)
    torch.manual_seed(0)
    step = svt.BUILD[name](cfg, args.precision, args)
    for _ in range(args.warmup):
        step(x, y)
    torch.cuda.synchronize()
    with gc_paused(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(x, y)
        torch.cuda.synchronize()
    if sharded.distributed.rank() != 0:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    if args.trace_out:
        with gzip.open(args.trace_out, "wt") as f:
            json.dump(trace, f)
    return timeline(trace, args.gap_ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(ap, nproc=2, batch=4, batch_help="sequences per rank")
    ap.add_argument("--system", default="sharded_zero3_offload_device", choices=svt.SYSTEMS)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "autocast"])
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--gap-ms", type=float, default=0.5, help="report the compute stream's idle gaps longer than this")
    ap.add_argument("--trace-out", default=None, help="also write rank 0's whole trace here (.json.gz)")
    args = ap.parse_args()
    result = sharded.launch(measure, args.system, args, nprocs=args.nproc, device="cuda", timeout=900)
    report({**provenance("stream_timeline", f"{args.nproc}x {torch.cuda.get_device_name(0)}", args.commit), "system": args.system, **result}, args.out, quiet=True)


if __name__ == "__main__":
    main()
