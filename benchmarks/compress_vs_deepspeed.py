"""1-bit Adam where communication dominates: sharded's compress_grads("onebit") against
its own uncompressed AdamW (data_parallel and shard_zero(2)) and DeepSpeed 0.19.6's
OneBitAdam, on the same GPT, data, link and precision, in one run.

    NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_SOCKET_IFNAME=lo \\
        python benchmarks/compress_vs_deepspeed.py --preset 350m --out benchmarks/results/compress_vs_deepspeed.json

The NCCL variables force its socket transport between the GPUs (a slow link, about a
40 Gb/s network); the run measures that link's all-reduce bus bandwidth first. fp16
with dynamic loss scaling everywhere (DeepSpeed's 1-bit optimizers require it):
sharded's mixed_precision("fp16") (fp32 masters, fp32 grad reduction), DeepSpeed's
"fp16" engine. Every system is built once in the same ranks, run past its warmup (1-bit
Adam compresses from step `--freeze` on), then timed in rounds that alternate systems.
Acceptance (issue 15): onebit >= 2x its uncompressed AdamW under data_parallel and
under shard_zero(2), and >= 1.0x DeepSpeed's OneBitAdam. Every sharded system uses
--bucket-mb (400: a compressed bucket costs two dependent round trips on the link);
sharded_dp_adamw_25mb is data_parallel's default bucket, for reference.

[Note: a new batch every step] Each step takes the next of a sequence of random batches,
the same sequence for every system. On one batch repeated, the model memorises it and
its grads grow past what Adam's variance saw in warmup; a variance frozen after 20 steps
then makes updates of 10-20x lr and fp16 overflows on most steps, uncompressed frozen
Adam included (docs/perf-notes.md, session 16): the compressed steps timed were then
skipped steps, not training. Random batches keep the grads' statistics steady, as a
corpus does after warmup, which 1-bit Adam assumes.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics

import torch
from _harness import alternate, built_and_warm, common_args, provenance, report
from _profile import profile_steps

import sharded
from sharded.models import GPT, GPTConfig, loss_fn
from sharded.plan import bus_bandwidth

SYSTEMS = ["sharded_dp_adamw_25mb", "sharded_dp_adamw", "sharded_dp_onebit", "sharded_zero2_adamw", "sharded_zero2_onebit", "deepspeed_onebit"]
PAIRS = [
    ("sharded_dp_onebit", "sharded_dp_adamw"),
    ("sharded_zero2_onebit", "sharded_zero2_adamw"),
    ("sharded_dp_onebit", "deepspeed_onebit"),
    ("sharded_zero2_onebit", "deepspeed_onebit"),
]
LR, WD = 1e-4, 0.1
STATES: dict = {}  # each sharded system's state box, to read its update count after timing
ENGINES: dict = {}  # DeepSpeed's engine, to read its skipped steps after timing


def _sharded(cfg: GPTConfig, name: str, freeze: int, bucket_mb: float):
    model = sharded.trace(GPT(cfg).to(sharded.distributed.device()))

    def train_step(state, batch):
        value, grads = sharded.value_and_grad(lambda p, b: loss_fn(model.apply(p, b[0]), b[1]))(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    step = sharded.mixed_precision("fp16")(train_step)
    bucket_mb = 25.0 if name.endswith("25mb") else bucket_mb  # data_parallel's default, for reference
    step = sharded.shard_zero(stage=2, bucket_mb=bucket_mb)(step) if "zero2" in name else sharded.data_parallel(bucket_mb=bucket_mb)(step)
    if name.endswith("onebit"):
        step, tx = sharded.compress_grads(method="onebit")(step), sharded.optim.onebit_adam(LR, warmup_steps=freeze, weight_decay=WD)
    else:
        tx = sharded.optim.adamw(LR, weight_decay=WD)
    box = STATES[name] = [step.init(sharded.TrainState.create(model.params, tx))]
    rank, world = sharded.distributed.rank(), sharded.distributed.world_size()
    turn = itertools.count()  # which batch its next step takes

    def run(x, y):
        x, y = _rows(x, y, next(turn), rank, world)
        box[0], metrics = step(box[0], (x, y))
        return metrics["loss"]

    return run


def _rows(x: torch.Tensor, y: torch.Tensor, turn: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of batch `turn` (cycling): every system sees the same sequence of
    batches, a new one each step ([Note: a new batch every step])."""
    k = turn % x.shape[0]
    rows = x.shape[1] // world
    return x[k, rank * rows : (rank + 1) * rows], y[k, rank * rows : (rank + 1) * rows]


def _deepspeed(cfg: GPTConfig, batch: int, freeze: int):
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16},
        "optimizer": {"type": "OneBitAdam", "params": {"lr": LR, "weight_decay": WD, "freeze_step": freeze, "cuda_aware": False, "comm_backend_name": "nccl"}},
    }
    module = GPT(cfg)
    engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=config)
    ENGINES["deepspeed_onebit"] = engine
    rank, world = sharded.distributed.rank(), sharded.distributed.world_size()
    turn = itertools.count()  # which batch its next step takes

    def run(x, y):
        x, y = _rows(x, y, next(turn), rank, world)
        loss = loss_fn(engine(x), y)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return run


def measure(args) -> dict:
    dev = sharded.distributed.device()
    cfg = GPTConfig.preset(args.preset, seq_len=args.seq, tied=False)
    world = sharded.distributed.world_size()
    g = torch.Generator(device="cpu").manual_seed(0)
    batches = args.freeze + args.warmup + args.rounds * args.steps  # every step its own ([Note: a new batch every step])
    x = torch.randint(0, cfg.vocab_size, (batches, args.batch * world, args.seq), generator=g).to(dev)
    y = torch.randint(0, cfg.vocab_size, (batches, args.batch * world, args.seq), generator=g).to(dev)
    busbw = bus_bandwidth() / 1e9
    make = lambda name: _deepspeed(cfg, args.batch, args.freeze) if name == "deepspeed_onebit" else _sharded(cfg, name, args.freeze, args.bucket_mb)  # noqa: E731
    steps, errors = built_and_warm(args.systems, make, args.freeze + args.warmup, x, y)  # each past its warmup: 1-bit Adam compressing
    timed = alternate(steps, args.rounds, args.steps, x, y)
    times = {name: r["step_s"] for name, r in timed.items()}
    host = {name: r["host_s"] for name, r in timed.items()}
    losses = {name: float(r["last"]) for name, r in timed.items()}
    profiles = {name: profile_steps(lambda: run(x, y), steps=2) for name, run in steps.items()} if args.profile else {}
    tokens = args.batch * world * args.seq
    systems = {
        n: {
            "step_s": {"min": min(t), "median": statistics.median(t), "max": max(t)},
            "tokens_per_s": tokens / statistics.median(t),
            "tokens_per_s_range": [tokens / max(t), tokens / min(t)],
            "host_s_median": statistics.median(host[n]),
            "last_loss": losses[n],
            "all_step_s": t,
            **({"gpu_time": profiles[n]} if n in profiles else {}),
        }
        for n, t in times.items()
    }
    for n, box in STATES.items():  # steps that fp16's loss scaler skipped are no updates (and delay 1-bit's start)
        if n in systems:
            updates = int(sharded.optim.states_of(box[0].opt_state, (sharded.optim.ScaleByAdamState, sharded.optim.ScaleByFrozenAdamState))[0].count)
            systems[n].update(steps=int(box[0].step), optimizer_updates=updates)
    for n, engine in ENGINES.items():
        if n in systems:
            systems[n].update(steps=int(engine.global_steps), optimizer_updates=int(engine.global_steps - engine.skipped_steps))
    systems.update({n: {"error": e} for n, e in errors.items()})
    return {"allreduce_busbw_GBps": busbw, "systems": systems}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(ap, nproc=2, batch=8, batch_help="sequences per rank")
    ap.set_defaults(preset="350m", seq=1024)
    ap.add_argument("--freeze", type=int, default=20, help="1-bit Adam's warmup steps (uncompressed): with 3, the first compressed updates moved params by 8-12x lr and fp16 overflowed on every step after (docs/perf-notes.md)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per system per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=400.0, help="sharded's grad buckets, every system (a compressed exchange is two dependent round trips per bucket)")
    ap.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS, help="a subset to run (in these ranks)")
    ap.add_argument("--profile", action="store_true", help="also profile 2 steps of each: communication, compute, idle time, top kernels")
    args = ap.parse_args()
    out = sharded.launch(measure, args, nprocs=args.nproc, device="cuda", timeout=900)
    systems = out["systems"]
    link = {k: os.environ.get(k) for k in ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "NCCL_SOCKET_IFNAME")}
    result = {
        **provenance("compress_vs_deepspeed", f"{args.nproc}x {torch.cuda.get_device_name(0)}", args.commit),
        "model": f"GPT-{args.preset}, untied head, seq {args.seq}, {args.batch} sequences per rank",
        "precision": "fp16 compute, dynamic loss scaling; sharded: fp32 masters and fp32 grad reduction",
        "link": link,
        "allreduce_busbw_GBps": out["allreduce_busbw_GBps"],
        "onebit_warmup_steps": args.freeze,
        "sharded_bucket_mb": args.bucket_mb,
        "systems": systems,
        "ratios": {
            f"{a}/{b}": {
                "tokens_per_s": systems[a]["tokens_per_s"] / systems[b]["tokens_per_s"],
                "worst_case": systems[a]["tokens_per_s_range"][0] / systems[b]["tokens_per_s_range"][1],
            }
            for a, b in PAIRS
            if a in systems and b in systems and "error" not in systems[a] and "error" not in systems[b]
        },
    }
    report(result, args.out)


if __name__ == "__main__":
    main()
