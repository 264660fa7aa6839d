"""shard_zero vs FSDP2 (`torch.distributed.fsdp.fully_shard`) on the same GPT, data,
bf16 autocast and fused AdamW, in one run on N local GPUs.

    python benchmarks/zero_vs_fsdp2.py --nproc 2 --preset 1.3b --out benchmarks/results/zero_vs_fsdp2.json

Pairs: sharded stage 3 vs FSDP2 (reshard_after_forward=True); sharded stage 2 vs FSDP2
with reshard_after_forward=False. Each system runs in its own fresh ranks (one launch
each) so its peak memory is its own; reports tokens/s and peak memory per rank.
--precision autocast (default): fp32 params and communication for both, bf16 compute
through autocast. --precision bf16: sharded's mixed_precision("bf16") against FSDP2's
MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): bf16 gathers, fp32
reductions, fp32 masters on both sides.
"""
from __future__ import annotations

import argparse
import statistics

import torch
from _harness import gc_paused, common_args, gpt_train_step, provenance, report, run_each
from _profile import profile_steps

import sharded
from sharded.models import GPT, GPTConfig, loss_fn

PAIRS = [("sharded_zero3", "fsdp2"), ("sharded_zero2", "fsdp2_no_reshard")]


def _fsdp2(cfg, reshard: bool, precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
    module = GPT(cfg).to(sharded.distributed.device())
    for block in module.blocks:
        fully_shard(block, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(module, reshard_after_forward=reshard, mp_policy=policy)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    rank, world = sharded.distributed.rank(), sharded.distributed.world_size()

    def step(x, y):
        rows = x.shape[0] // world
        with torch.autocast("cuda", torch.bfloat16):
            loss = loss_fn(module(x[rank * rows : (rank + 1) * rows]), y[rank * rows : (rank + 1) * rows])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _sharded(cfg, stage: int, precision: str):
    model = sharded.trace(GPT(cfg).to(sharded.distributed.device()))

    train_step = gpt_train_step(model)

    inner = sharded.mixed_precision("bf16")(train_step) if precision == "bf16" else train_step
    zero = sharded.shard_zero(stage=stage)(inner)
    box = [zero.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-4, weight_decay=0.1)))]

    def step(x, y):
        box[0], _ = zero(box[0], (x, y))

    return step


BUILD = {
    "fsdp2": lambda cfg, p: _fsdp2(cfg, reshard=True, precision=p),
    "fsdp2_no_reshard": lambda cfg, p: _fsdp2(cfg, reshard=False, precision=p),
    "sharded_zero3": lambda cfg, p: _sharded(cfg, stage=3, precision=p),
    "sharded_zero2": lambda cfg, p: _sharded(cfg, stage=2, precision=p),
}


def measure(name: str, args) -> dict:
    dev = sharded.distributed.device()
    cfg = GPTConfig.preset(args.preset, seq_len=args.seq)
    world = sharded.distributed.world_size()
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch * world, args.seq), generator=g).to(dev)
    y = torch.randint(0, cfg.vocab_size, (args.batch * world, args.seq), generator=g).to(dev)
    torch.manual_seed(0)
    step = BUILD[name](cfg, args.precision)
    for _ in range(args.warmup):
        step(x, y)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(dev)
    times = []
    with gc_paused():
        for _ in range(args.steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(x, y)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    peak = torch.tensor([torch.cuda.max_memory_allocated(dev)], dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    med = statistics.median(times)
    result = {
        "median_step_s": med,
        "step_s": times,
        "tokens_per_s": args.batch * world * args.seq / med,
        "peak_memory_gib_max_rank": peak.item() / 2**30,
    }
    if args.profile:
        result["gpu_time"] = profile_steps(lambda: step(x, y), steps=3)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(ap, nproc=2, batch=4, batch_help="sequences per rank")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--precision", default="autocast", choices=["autocast", "bf16"])
    ap.add_argument("--profile", action="store_true", help="also profile 3 steps: how much NCCL time is hidden under compute")
    args = ap.parse_args()
    systems = run_each([n for pair in PAIRS for n in pair], measure, args)
    result = {
        **provenance("zero_vs_fsdp2", f"{args.nproc}x {torch.cuda.get_device_name(0)}", args.commit),
        "preset": args.preset,
        "seq": args.seq,
        "batch_per_rank": args.batch,
        "precision": {"autocast": "fp32 params and communication, bf16 autocast compute", "bf16": "bf16 params gathered, fp32 reductions and masters"}[args.precision] + "; fused AdamW",
        "systems": systems,
        "ratios": {
            f"{ours}/{base}": {
                "tokens_per_s": systems[ours]["tokens_per_s"] / systems[base]["tokens_per_s"],
                "peak_memory": systems[ours]["peak_memory_gib_max_rank"] / systems[base]["peak_memory_gib_max_rank"],
            }
            for ours, base in PAIRS
            if "error" not in systems[ours] and "error" not in systems[base]
        },
    }
    report(result, args.out)


if __name__ == "__main__":
    main()
