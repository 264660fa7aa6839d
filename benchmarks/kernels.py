"""sharded.kernels against the memory bandwidth they could reach, and against torch.

For each size N (fp32 elements), every pass is timed with CUDA events (warmup, then
--reps timed calls, median) and reported as effective bandwidth: the bytes the pass
must move at the least, over its time.

    copy                         dst.copy_(src): the HBM bandwidth to compare with       8N
    adamw_ours                   sharded.kernels.fused_adamw_, fp32 grads                28N
    adamw_ours_bf16_grad_lowp    the same, bf16 grads, writing a bf16 copy of p          28N
    adamw_torch_fused            torch.optim.AdamW(fused=True) on the same flat tensor   28N
    adamw_torch_foreach          torch.optim.AdamW(foreach=True)                         28N
    adamw_ours_multi             fused_adamw_ over --tensors tensors: one launch          28N
    adamw_torch_fused_multi      torch.optim.AdamW(fused=True) over the same tensors     28N
    unscale_ours                 sharded.kernels.unscale_and_check_ over --tensors grads 8N
    unscale_torch_amp            torch._amp_foreach_non_finite_check_and_unscale_        8N
    unscale_torch_plain          isfinite().any() per grad, then _foreach_mul_           8N
    copy_in_ours                 sharded.kernels.copy_in: fp32 grads -> bf16 flat, x0.5  6N
    copy_in_torch                torch.mul(src, 0.5, out=flat[slot]) per tensor          6N
    copy_out_ours                sharded.kernels.copy_out: bf16 flat -> fp32 tensors     6N
    copy_out_torch               dst.copy_(flat[slot]) per tensor                        6N

    python benchmarks/kernels.py --sizes 10M,100M,1B --out benchmarks/results/kernels_h100.json
    python benchmarks/kernels.py --sizes 1M,10M,100M --tensors 200 --passes adamw_ours_multi,adamw_torch_fused_multi
    python benchmarks/kernels.py --device cpu --sizes 100K,1M   # smoke test: torch references, wall clock

The multi-tensor passes split N as params are split (`split`): at small N they time the
host work too (the events around a call wait for its launches). The multi-tensor, unscale
and copy passes reuse their tensors, as a training loop reuses its buffers,
so after the first call their segment tables come from the cache (kernels/_segments.py).
A pass that fails (out of memory at 1B on a small GPU) is recorded as an error and the
rest still run. On CPU the kernels' torch references run (no Triton), timed by the wall
clock: a check that the script works, not a measurement of the kernels.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import torch

from sharded import kernels

SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}


def parse_size(text: str) -> int:
    text = text.strip().upper()
    return int(float(text[:-1]) * SUFFIXES[text[-1]]) if text[-1] in SUFFIXES else int(text)


def split(n: int, pieces: int) -> list[int]:
    """n elements as `pieces` tensors of uneven sizes (1..8 parts each), as params are."""
    parts = [1 + i % 8 for i in range(pieces)]
    sizes = [n * p // sum(parts) for p in parts]
    sizes[-1] += n - sum(sizes)
    return sizes


def slots(sizes: list[int]) -> list[int]:
    return [sum(sizes[:i]) for i in range(len(sizes))]


# Each builder allocates its tensors and returns (the pass to time, bytes it must move).

def copy(n, dev, pieces):
    src, dst = torch.randn(n, device=dev), torch.empty(n, device=dev)
    return lambda: dst.copy_(src), 8 * n


def _adamw_state(n, dev, grad_dtype):
    return torch.randn(n, device=dev), (1e-3 * torch.randn(n, device=dev)).to(grad_dtype), torch.zeros(n, device=dev), torch.zeros(n, device=dev)


def adamw_ours(n, dev, pieces, grad_dtype=torch.float32, lowp=None):
    p, g, m, v = _adamw_state(n, dev, grad_dtype)
    out = None if lowp is None else torch.empty(n, device=dev, dtype=lowp)
    count = torch.zeros((), device=dev)

    def step():
        kernels.fused_adamw_(p, g, m, v, step=count.add_(1), lr=1e-4, weight_decay=0.1, out_lowp=out)

    return step, n * (4 + g.element_size() + 4 + 4 + 12 + (0 if out is None else out.element_size()))


def adamw_torch(n, dev, pieces, **impl):
    p, g, _, _ = _adamw_state(n, dev, torch.float32)
    param = torch.nn.Parameter(p)
    param.grad = g
    opt = torch.optim.AdamW([param], lr=1e-4, weight_decay=0.1, **impl)
    return opt.step, 28 * n


def _adamw_states(n, dev, pieces):
    """(params, grads, exp_avgs, exp_avg_sqs): fp32 lists of `pieces` uneven tensors, each its own allocation."""
    return tuple(zip(*(_adamw_state(k, dev, torch.float32) for k in split(n, pieces))))


def adamw_ours_multi(n, dev, pieces):
    params, grads, exp_avgs, exp_avg_sqs = _adamw_states(n, dev, pieces)
    count = torch.zeros((), device=dev)

    def step():
        kernels.fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, step=count.add_(1), lr=1e-4, weight_decay=0.1)

    return step, 28 * n


def adamw_torch_fused_multi(n, dev, pieces):
    params, grads, _, _ = _adamw_states(n, dev, pieces)
    params = [torch.nn.Parameter(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    return opt.step, 28 * n


def _grads(n, dev, pieces):
    return [torch.randn(k, device=dev) for k in split(n, pieces)], torch.ones((), device=dev), torch.zeros((), device=dev)


def unscale_ours(n, dev, pieces):
    grads, scale, found = _grads(n, dev, pieces)  # scale 1: repeated passes keep the values
    return lambda: kernels.unscale_and_check_(grads, scale, found), 8 * n


def unscale_torch_amp(n, dev, pieces):
    grads, scale, found = _grads(n, dev, pieces)
    return lambda: torch._amp_foreach_non_finite_check_and_unscale_(grads, found, scale), 8 * n


def unscale_torch_plain(n, dev, pieces):
    grads, scale, found = _grads(n, dev, pieces)

    def unscale():
        found.copy_(torch.stack([(~torch.isfinite(g)).any() for g in grads]).any())
        torch._foreach_mul_(grads, scale)

    return unscale, 8 * n


def _flat_and_tensors(n, dev, pieces):
    sizes = split(n, pieces)
    return torch.zeros(n, device=dev, dtype=torch.bfloat16), [torch.randn(k, device=dev) for k in sizes], slots(sizes)


def copy_in_ours(n, dev, pieces):
    flat, srcs, offsets = _flat_and_tensors(n, dev, pieces)
    return lambda: kernels.copy_in(flat, srcs, offsets, scale=0.5), 6 * n


def copy_in_torch(n, dev, pieces):
    flat, srcs, offsets = _flat_and_tensors(n, dev, pieces)

    def copy_in():
        for src, offset in zip(srcs, offsets):
            torch.mul(src, 0.5, out=flat[offset : offset + src.numel()])

    return copy_in, 6 * n


def copy_out_ours(n, dev, pieces):
    flat, dsts, offsets = _flat_and_tensors(n, dev, pieces)
    return lambda: kernels.copy_out(flat, dsts, offsets), 6 * n


def copy_out_torch(n, dev, pieces):
    flat, dsts, offsets = _flat_and_tensors(n, dev, pieces)

    def copy_out():
        for dst, offset in zip(dsts, offsets):
            dst.copy_(flat[offset : offset + dst.numel()])

    return copy_out, 6 * n


PASSES = {
    "copy": copy,
    "adamw_ours": adamw_ours,
    "adamw_ours_bf16_grad_lowp": lambda n, dev, k: adamw_ours(n, dev, k, grad_dtype=torch.bfloat16, lowp=torch.bfloat16),
    "adamw_torch_fused": lambda n, dev, k: adamw_torch(n, dev, k, fused=True),
    "adamw_torch_foreach": lambda n, dev, k: adamw_torch(n, dev, k, foreach=True),
    "adamw_ours_multi": adamw_ours_multi,
    "adamw_torch_fused_multi": adamw_torch_fused_multi,
    "unscale_ours": unscale_ours,
    "unscale_torch_amp": unscale_torch_amp,
    "unscale_torch_plain": unscale_torch_plain,
    "copy_in_ours": copy_in_ours,
    "copy_in_torch": copy_in_torch,
    "copy_out_ours": copy_out_ours,
    "copy_out_torch": copy_out_torch,
}


def time_calls(fn, dev: torch.device, warmup: int, reps: int) -> list[float]:
    """Seconds per call: CUDA events around each call on a GPU, the wall clock on CPU."""
    for _ in range(warmup):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def measure(name: str, n: int, dev: torch.device, args) -> dict:
    try:
        fn, nbytes = PASSES[name](n, dev, args.tensors)
        times = time_calls(fn, dev, args.warmup, args.reps)
    except RuntimeError as e:  # an OOM is a result too (torch.cuda.OutOfMemoryError is one)
        return {"error": str(e).splitlines()[0][:300]}
    finally:
        fn = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    med = statistics.median(times)
    return {"median_ms": med * 1e3, "gb_per_s": nbytes / med / 1e9, "bytes": nbytes, "ms": [t * 1e3 for t in times]}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine() or "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10M,100M,1B", help="fp32 elements per pass, comma-separated (K, M, B suffixes)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--passes", default=",".join(PASSES), help="which passes, comma-separated")
    ap.add_argument("--tensors", type=int, default=64, help="tensors the N elements are split into for the multi-tensor passes")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default=os.environ.get("SHARDED_COMMIT"), help="the git commit measured (default: git rev-parse HEAD)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    names = [p.strip() for p in args.passes.split(",") if p.strip()]
    unknown = sorted(set(names) - set(PASSES))
    if unknown:
        ap.error(f"unknown passes {unknown}; choose from {sorted(PASSES)}")

    results = {}
    print(f"{'size':>6} {'pass':<26} {'median ms':>10} {'GB/s':>8} {'of copy':>8}", flush=True)
    for label in args.sizes.split(","):
        n = parse_size(label)
        row = results[label.strip()] = {}
        for name in names:
            row[name] = r = measure(name, n, dev, args)
            copy_gbps = row.get("copy", {}).get("gb_per_s")
            if "error" in r:
                print(f"{label:>6} {name:<26} error: {r['error']}", flush=True)
                continue
            if copy_gbps and name != "copy":
                r["fraction_of_copy_bandwidth"] = r["gb_per_s"] / copy_gbps
            frac = f"{r['fraction_of_copy_bandwidth']:.0%}" if "fraction_of_copy_bandwidth" in r else ""
            print(f"{label:>6} {name:<26} {r['median_ms']:>10.3f} {r['gb_per_s']:>8.1f} {frac:>8}", flush=True)

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = {
        "benchmark": "kernels",
        "device": device_name(dev),
        "torch": torch.__version__,
        "triton": triton_version,
        "kernels": "triton" if kernels.uses_triton(torch.empty(0, device=dev)) else "torch references",
        "date": datetime.date.today().isoformat(),
        "commit": args.commit or git_commit(),
        "timing": f"{'CUDA events' if dev.type == 'cuda' else 'wall clock'}, {args.warmup} warmup calls, median of {args.reps}",
        "bandwidth": "effective: the bytes each pass must move at the least, over its median time (1 GB = 1e9 bytes)",
        "tensors": args.tensors,
        "results": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
