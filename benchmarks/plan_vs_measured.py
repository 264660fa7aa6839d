"""`sharded plan`'s predictions against measurements, in one run on the GPUs here:
calibrate for the model's width, rank the configurations, then run three of them (the
predicted best, and two others of different kinds) as `sharded train` builds them, each
in its own fresh ranks, and compare tokens/s and peak memory per rank.

    python benchmarks/plan_vs_measured.py --preset 1.3b --nproc 2 --out benchmarks/results/plan_vs_measured.json

Acceptance (issue 17): measured tokens/s within 25% of predicted and peak memory within
10%, for each of the three; the best pick at least as fast as the others measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from _harness import common_args, gc_paused, provenance, report

import sharded
from sharded import plan
from sharded.models import GPT, GPTConfig
from sharded.train import TrainConfig, make_step


def measure(cfg: GPTConfig, c: plan.Configuration, global_batch: int, warmup: int, steps: int) -> dict:
    """The configuration as `sharded train` builds it (its transforms, AdamW with its
    schedule and clipping), on random tokens; rank 0's times, the max peak over ranks."""
    if c.pp > 1:
        sharded.Mesh.set_current(sharded.Mesh(pp=c.pp))
    dev = sharded.distributed.device()
    torch.manual_seed(0)
    model = sharded.trace(GPT(cfg).to(dev))
    train = TrainConfig(precision="bf16", remat=c.remat, pp=c.pp, accumulate=c.accumulate, zero=c.zero, batch_size=global_batch)
    step = make_step(model, train)
    schedule = sharded.optim.schedules.warmup_cosine(1e-4, 10, 1000)
    tx = sharded.optim.chain(sharded.optim.clip_by_global_norm(1.0), sharded.optim.adamw(schedule, weight_decay=0.1))
    state = step.init(sharded.TrainState.create(model.params, tx))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (global_batch, cfg.seq_len), generator=g).to(dev)
    for _ in range(warmup):
        state, _ = step(state, (x, x))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    with gc_paused():
        for _ in range(steps):
            start = time.perf_counter()
            state, _ = step(state, (x, x))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = torch.tensor([float(torch.cuda.max_memory_allocated())], device=dev)
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    med = statistics.median(times)
    return {"step_s": {"min": min(times), "median": med, "max": max(times)}, "tokens_per_s": global_batch * cfg.seq_len / med, "peak_memory_bytes": peak.item()}


def _pick_three(ranked: list[plan.Configuration]) -> list[plan.Configuration]:
    """The predicted best, then the fastest of other kinds (another ZeRO stage or pipeline
    layout, another remat policy), so the three differ in what the model predicts."""
    best = ranked[0]
    layout = next(c for c in ranked if (c.pp, c.zero) != (best.pp, best.zero))
    remat = next(c for c in ranked if c.remat != best.remat and c.remat != layout.remat and c not in (best, layout))
    return [best, layout, remat]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(ap, nproc=2, batch=16, batch_help="sequences per update (the global batch)")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    cfg = dataclasses.replace(GPTConfig.preset(args.preset, tied=False), seq_len=args.seq)
    start = time.perf_counter()
    shape = plan.ModelShape.gpt(cfg, args.preset)
    cal = plan.calibrate(shape, gpus=args.nproc)
    calibration_s = time.perf_counter() - start
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    ranked = plan.rank_configurations(shape, cal, args.nproc, gpu_bytes, args.batch)
    rows = []
    for c in _pick_three(ranked):
        try:
            got = sharded.launch(measure, cfg, c, args.batch, args.warmup, args.steps, nprocs=args.nproc, device="cuda", timeout=600)
        except sharded.RankError as e:
            got = {"error": str(e).splitlines()[-1][:300]}
        row = {"configuration": dataclasses.asdict(c), "command": c.command(shape, args.batch), "measured": got}
        if "error" not in got:
            row["tokens_per_s_measured_over_predicted"] = got["tokens_per_s"] / c.tokens_per_s
            row["memory_measured_over_predicted"] = got["peak_memory_bytes"] / c.memory_bytes
        rows.append(row)
        print(row, flush=True)
    ok = [r for r in rows if "error" not in r["measured"]]
    result = {
        **provenance("plan_vs_measured", f"{args.nproc}x {torch.cuda.get_device_name(0)}", args.commit),
        "model": f"GPT-{args.preset}, untied head, seq {args.seq}, global batch {args.batch}, bf16 mixed precision, AdamW",
        "calibration": dataclasses.asdict(cal),
        "calibration_s": calibration_s,
        "configurations_ranked": len(ranked),
        "three": rows,
        "within_25pct_tokens": all(abs(r["tokens_per_s_measured_over_predicted"] - 1) <= 0.25 for r in ok) and len(ok) == 3,
        "within_10pct_memory": all(abs(r["memory_measured_over_predicted"] - 1) <= 0.10 for r in ok) and len(ok) == 3,
        "best_is_fastest_measured": len(ok) == 3 and ok[0] is rows[0] and all(rows[0]["measured"]["tokens_per_s"] >= r["measured"]["tokens_per_s"] for r in ok),
    }
    report(result, args.out)


if __name__ == "__main__":
    main()
