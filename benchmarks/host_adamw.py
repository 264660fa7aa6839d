"""What limits offload's AdamW on the host: torch's fused CPU AdamW over one rank's
state, every rank of the host at once (as offload runs it), run whole from the main
thread, in parts (one per block, as the update in parts cuts it) from the main thread,
in parts from one worker thread (what `HostUpdate` does), and in parts sliced over a
pool of single-threaded workers.

    python benchmarks/host_adamw.py --ranks 2 --params 0.66e9 --parts 26 --out benchmarks/results/host_adamw.json
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing as mp
import os
import statistics
import time

import torch

LR, WD = 1e-4, 0.1
MODES = ("whole_main", "parts_main", "parts_worker", "parts_worker_fewer_threads", "parts_pool")


def _state(params: int, parts: int, pin: bool) -> list[list[torch.Tensor]]:
    """Per part: [param, grad, m, v] flat fp32, the grads (and params) pinned as offload's are."""
    n = params // parts
    out = []
    for _ in range(parts):
        p = torch.empty(n, pin_memory=pin).normal_()
        g = torch.empty(n, pin_memory=pin).normal_()
        out.append([p, g, torch.zeros(n), torch.zeros(n)])
    return out


def _adamw(tensors: list[list[torch.Tensor]], count: torch.Tensor) -> None:
    p, g, m, v = (list(x) for x in zip(*tensors))
    torch._fused_adamw_(p, g, m, v, [], [count] * len(p), lr=LR, beta1=0.9, beta2=0.999, weight_decay=WD, eps=1e-8, amsgrad=False, maximize=False)


def _with_threads(n: int, fn, *args) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        fn(*args)
    finally:
        torch.set_num_threads(before)


def _sliced(part: list[torch.Tensor], k: int, n: int, count: torch.Tensor) -> None:
    _adamw([[x.tensor_split(n)[k] for x in part]], count)


def _rank(rank: int, args, barrier, results) -> None:
    pin = torch.cuda.is_available()
    threads = max(1, len(os.sched_getaffinity(0)) // args.ranks)
    state = _state(int(args.params), args.parts, pin)
    count = torch.tensor(1.0)
    worker = concurrent.futures.ThreadPoolExecutor(1)
    pool = concurrent.futures.ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,))

    def run(mode: str) -> None:
        if mode == "whole_main":
            _with_threads(threads, _adamw, state, count)
        elif mode == "parts_main":
            for part in state:
                _with_threads(threads, _adamw, [part], count)
        elif mode in ("parts_worker", "parts_worker_fewer_threads"):
            n = threads if mode == "parts_worker" else max(1, threads - 1)
            for f in [worker.submit(_with_threads, n, _adamw, [part], count) for part in state]:
                f.result()
        else:
            for part in state:
                for f in [pool.submit(_sliced, part, k, threads, count) for k in range(threads)]:
                    f.result()

    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.repeats + 1):  # the first round warms each path
        for mode in MODES:
            barrier.wait()
            began = time.perf_counter()
            run(mode)
            times[mode].append(time.perf_counter() - began)
    results[rank] = {"threads": threads, **{m: t[1:] for m, t in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--params", type=float, default=0.66e9, help="params per rank")
    ap.add_argument("--parts", type=int, default=26)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default=os.environ.get("SHARDED_COMMIT"))
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(args.ranks), ctx.Manager().dict()
    procs = [ctx.Process(target=_rank, args=(r, args, barrier, results)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    slowest = {m: [max(results[r][m][i] for r in range(args.ranks)) for i in range(args.repeats)] for m in MODES}
    result = {
        "benchmark": "host_adamw", "commit": args.commit, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "host_cores": len(os.sched_getaffinity(0)), "ranks": args.ranks, "params_per_rank": int(args.params), "parts": args.parts,
        "threads_per_rank": results[0]["threads"],
        "seconds_slowest_rank": {m: {"min": min(t), "median": statistics.median(t), "max": max(t)} for m, t in slowest.items()},
        "gparams_per_s_per_rank": {m: args.params / statistics.median(t) / 1e9 for m, t in slowest.items()},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
