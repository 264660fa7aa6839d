"""What the GPU benchmarks share: their common flags, and running each system in its
own fresh ranks (so its peak memory is its own), an error being a result too."""
from __future__ import annotations

import argparse
import json
import os
from typing import Callable

import sharded


def common_args(ap: argparse.ArgumentParser, nproc: int, batch: int, batch_help: str) -> None:
    ap.add_argument("--nproc", type=int, default=nproc)
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=batch, help=batch_help)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default=os.environ.get("SHARDED_COMMIT"))


def run_each(names: list[str], measure: Callable, args: argparse.Namespace, device: str = "cuda") -> dict:
    """{name: measure(name, args) on rank 0 of args.nproc fresh ranks, or {"error": ...}}."""
    systems = {}
    for name in names:
        try:
            systems[name] = sharded.launch(measure, name, args, nprocs=args.nproc, device=device, timeout=900)
        except sharded.RankError as e:  # an OOM is a result too: record it, measure the rest
            systems[name] = {"error": str(e).splitlines()[-1][:300]}
        print(name, json.dumps({k: v for k, v in systems[name].items() if k != "step_s"}), flush=True)
    return systems


def report(result: dict, out: str | None) -> None:
    """Print the result (without the per-system detail) and write it all to `out`."""
    print(json.dumps({k: v for k, v in result.items() if k != "systems"}, indent=2))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
