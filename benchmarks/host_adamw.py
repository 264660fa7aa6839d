"""What limits offload's AdamW on the host: torch's fused CPU AdamW over one rank's
state, every rank of the host at once (as offload runs it), run whole from the main
thread, in parts (one per block, as the update in parts cuts it) from the main thread,
in parts from one worker thread (what `HostUpdate` does), and in parts sliced over a
pool of single-threaded workers; with each of three placements of the state in memory:
params and grads pinned (as offload's are) or all pageable, and pinned with each rank
bound to one NUMA node's cores (its memory then allocated there).

    python benchmarks/host_adamw.py --ranks 2 --params 0.66e9 --parts 26 --out benchmarks/results/host_adamw.json
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics

import torch
import _host_ranks as host_ranks
from _harness import provenance, report

LR, WD = 1e-4, 0.1
MODES = ("whole_main", "parts_main", "parts_worker", "parts_worker_fewer_threads", "parts_pool")
PLACEMENTS = ("pinned", "pageable", "pinned_node_bound")


def numa_nodes() -> list[set[int]]:
    """Each NUMA node's CPUs (from sysfs), or one node of every CPU where sysfs says nothing."""
    import glob

    nodes = []
    for path in sorted(glob.glob("/sys/devices/system/node/node[0-9]*/cpulist")):
        cpus: set[int] = set()
        for span in open(path).read().strip().split(","):
            if span:
                a, _, b = span.partition("-")
                cpus |= set(range(int(a), int(b or a) + 1))
        nodes.append(cpus)
    return [n for n in nodes if n] or [set(os.sched_getaffinity(0))]


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
    for placement in PLACEMENTS:
        results[(rank, placement)] = _placed(rank, placement, args, barrier)


def _placed(rank: int, placement: str, args, barrier) -> dict:
    pin = torch.cuda.is_available() and placement != "pageable"
    if placement == "pinned_node_bound":
        nodes = numa_nodes()
        os.sched_setaffinity(0, nodes[rank % len(nodes)])
        threads = max(1, len(os.sched_getaffinity(0)) // -(-args.ranks // len(nodes)))
    else:
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

    times = host_ranks.in_turns(run, MODES, args.repeats, barrier)
    worker.shutdown()
    pool.shutdown()
    return {"threads": threads, **times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    host_ranks.add_args(ap, params=0.66e9, parts=26)
    args = ap.parse_args()
    results = host_ranks.spawn(_rank, args)
    placements = {}
    for placement in PLACEMENTS:
        slowest = {m: [max(results[(r, placement)][m][i] for r in range(args.ranks)) for i in range(args.repeats)] for m in MODES}
        placements[placement] = {
            "threads_per_rank": results[(0, placement)]["threads"],
            "seconds_slowest_rank": {m: {"min": min(t), "median": statistics.median(t), "max": max(t)} for m, t in slowest.items()},
            "gparams_per_s_per_rank": {m: args.params / statistics.median(t) / 1e9 for m, t in slowest.items()},
        }
    result = {
        **provenance("host_adamw", f"host of {len(os.sched_getaffinity(0))} cores", args.commit),
        "numa_nodes": [len(n) for n in numa_nodes()], "ranks": args.ranks, "params_per_rank": int(args.params), "parts": args.parts,
        "placements": placements,
    }
    report(result, args.out)


if __name__ == "__main__":
    main()
