"""What the host benchmarks share: one spawned process per rank of a host, all at once
(as offload's ranks update at once), no process group; each mode timed in turns."""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from typing import Callable, Sequence


def add_args(ap: argparse.ArgumentParser, params: float, parts: int) -> None:
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--params", type=float, default=params, help="params per rank")
    ap.add_argument("--parts", type=int, default=parts)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default=os.environ.get("SHARDED_COMMIT"))


def spawn(target: Callable, args: argparse.Namespace) -> dict:
    """`target(rank, args, barrier, results)` in `args.ranks` processes at once; `results`."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(args.ranks), ctx.Manager().dict()
    procs = [ctx.Process(target=target, args=(r, args, barrier, results)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return dict(results)


def in_turns(run: Callable[[str], None], modes: Sequence[str], repeats: int, barrier) -> dict[str, list[float]]:
    """Each mode's seconds per round, every rank starting each mode at once; the first
    round, which warms each path, is dropped."""
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(repeats + 1):
        for mode in modes:
            barrier.wait()
            began = time.perf_counter()
            run(mode)
            times[mode].append(time.perf_counter() - began)
    return {m: t[1:] for m, t in times.items()}
