"""Where an offloaded step's time goes: `offload("cpu", params=True)` over ZeRO-3 on
GPT, timed with its update started during backward ([Note: the host update in parts])
and without, beside the host's AdamW alone on this rank's state (every rank at once,
with the threads offload gives it) and the same step with nothing offloaded.

    python benchmarks/offload_breakdown.py --nproc 2 --preset 1.3b --out benchmarks/results/offload_breakdown_1.3b.json
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch
from _harness import common_args, gc_paused, provenance, report, run_each

import sharded
from sharded.models import GPT, GPTConfig, loss_fn

LR, WD = 1e-4, 0.1


def _step(cfg: GPTConfig, offload: bool):
    model = sharded.trace(GPT(cfg).to(sharded.distributed.device()))

    def loss(params, batch):
        return loss_fn(model.apply(params, batch[0]), batch[1])

    def train_step(state, batch):
        value, grads = sharded.value_and_grad(loss)(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    step = sharded.shard_zero(stage=3)(sharded.mixed_precision("bf16", autocast=False)(train_step))
    step = sharded.offload("cpu", params=True)(step) if offload else step
    return step, step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(LR, weight_decay=WD), opt_device="cpu" if offload else None))


def _timed(fn, steps: int) -> list[float]:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    with gc_paused():
        for _ in range(steps):
            torch.distributed.barrier()
            sync()
            began = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - began)
    return times


def _parts_timed(cls) -> list[float]:
    """The seconds each part of the host update in parts takes on its worker (after its
    grads arrived), in the real step: recorded from here on."""
    seconds: list[float] = []
    run = cls._run

    def timed(self, ready, indices, grads):
        if ready is not None:
            ready.synchronize()
        began = time.perf_counter()
        run(self, None, indices, grads)
        seconds.append(time.perf_counter() - began)

    cls._run = timed
    return seconds


def measure(name: str, args) -> dict:
    offload_module = importlib.import_module("sharded.transforms.offload")

    dev = sharded.distributed.device()
    cfg = GPTConfig.preset(args.preset, seq_len=args.seq)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch * 2, args.seq), generator=g).to(dev)
    y = torch.randint(0, cfg.vocab_size, (args.batch * 2, args.seq), generator=g).to(dev)
    out = {}
    step, state = _step(cfg, offload=name == "offload")
    box = [state]

    def one():
        box[0], _ = step(box[0], (x, y))  # the global batch: ZeRO takes this rank's rows

    for _ in range(args.warmup):
        one()
    if name == "offload":
        (t,) = [t for t in step.transforms if t.name == "offload"]
        parts = _parts_timed(importlib.import_module("sharded.transforms._host_update").HostUpdate)
        out["streamed_step_s"] = _timed(one, args.steps)
        out["part_update_s"] = {"count": len(parts), "median": statistics.median(parts), "sum_per_step": sum(parts) / args.steps}
        t._streams = False  # the whole update after backward, as before the update in parts
        one()
        out["whole_update_step_s"] = _timed(one, args.steps)
        params = [p for p in sharded.tree.leaves(box[0].params)]
        grads = [torch.zeros_like(p) for p in params]
        ms, vs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        count = torch.tensor(1.0)

        def adam():
            with offload_module._threads(offload_module._host_threads()):
                torch._fused_adamw_(params, grads, ms, vs, [], [count] * len(params), lr=LR, beta1=0.9, beta2=0.999, weight_decay=WD, eps=1e-8, amsgrad=False, maximize=False)

        adam()
        out["host_adamw_s"] = _timed(adam, args.steps)
        out["host_params_per_rank"] = sum(p.numel() for p in params)
        out["host_threads"] = offload_module._host_threads()
    else:
        out["device_step_s"] = _timed(one, args.steps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(ap, nproc=2, batch=4, batch_help="sequences per rank")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: gloo, a smoke test of this script")
    args = ap.parse_args()
    runs = run_each(["offload", "device"], measure, args, device=args.device)
    median = {n: {k: statistics.median(v) if isinstance(v, list) else v for k, v in r.items()} for n, r in runs.items()}
    result = {
        **provenance("offload_breakdown", f"{args.nproc}x {torch.cuda.get_device_name(0)}" if args.device == "cuda" else "CPU (gloo)", args.commit),
        "model": f"GPT-{args.preset}, untied head, seq {args.seq}, {args.batch} sequences per rank; shard_zero(3), mixed_precision('bf16', autocast=False), AdamW",
        "medians": median,
        "runs": runs,
    }
    report(result, args.out)


if __name__ == "__main__":
    main()
