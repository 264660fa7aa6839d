"""What the GPU benchmarks share: the step they run through sharded, their common flags,
and running each system in its own fresh ranks (so its peak memory is its own), an
error being a result too."""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import time
from typing import Callable

import torch

import sharded
from sharded.models import loss_fn


def gpt_train_step(model: sharded.Model):
    """The user's step over a traced GPT, its forward under bf16 autocast: the same step
    every benchmark runs through sharded's transforms."""
    device = next(iter(model.params.values())).device.type

    def loss(params, batch):
        with torch.autocast(device, torch.bfloat16):
            return loss_fn(model.apply(params, batch[0]), batch[1])

    def train_step(state, batch):
        value, grads = sharded.value_and_grad(loss)(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    return train_step


@contextlib.contextmanager
def gc_paused():
    """Timed steps without Python's cyclic collector: one collection first, then none
    until the end (torchtitan's training loop also schedules it itself). A gen-2
    collection in a timed step took ~0.1 s on the device's host; every system, baseline
    included, runs its timed steps inside this."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def common_args(ap: argparse.ArgumentParser, nproc: int, batch: int, batch_help: str) -> None:
    ap.add_argument("--nproc", type=int, default=nproc)
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=batch, help=batch_help)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default=os.environ.get("SHARDED_COMMIT"))


def built_and_warm(names: list[str], make: Callable[[str], Callable], warmup: int, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, dict]:
    """({name: step}, {name: error}): each system built by `make(name)` in these ranks and
    run `warmup` times (where it compiles, or passes its own warmup); one that cannot
    run is a result too."""
    steps, errors = {}, {}
    for name in names:
        torch.manual_seed(0)
        try:
            steps[name] = make(name)
            for _ in range(warmup):
                steps[name](x, y)
            torch.cuda.synchronize()
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
            steps.pop(name, None)
    return steps, errors


def alternate(steps: dict[str, Callable], rounds: int, per_round: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict]:
    """Time the systems in turns, round after round, so drift falls on all alike: per
    system each step's GPU time, its host time (until the step's launches return: near
    the step time, the host bounds it) and its last output."""
    out = {name: {"step_s": [], "host_s": [], "last": None} for name in steps}
    with gc_paused():
        for _ in range(rounds):
            for name, run in steps.items():
                for _ in range(per_round):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    began = time.perf_counter()
                    out[name]["last"] = run(x, y)
                    out[name]["host_s"].append(time.perf_counter() - began)
                    end.record()
                    torch.cuda.synchronize()
                    out[name]["step_s"].append(start.elapsed_time(end) / 1e3)
    return out


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


def provenance(benchmark: str, device: str, commit: str | None) -> dict:
    """The fields every results JSON starts with: what ran, where, when, at which commit."""
    import datetime

    return {"benchmark": benchmark, "device": device, "torch": torch.__version__, "date": datetime.date.today().isoformat(), "commit": commit}


def report(result: dict, out: str | None, quiet: bool = False) -> None:
    """Print the result (without the per-system detail, unless `quiet`) and write it all to `out`."""
    if not quiet:
        print(json.dumps({k: v for k, v in result.items() if k != "systems"}, indent=2))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
