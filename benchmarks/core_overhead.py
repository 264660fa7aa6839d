"""Does the pure core cost nothing? GPT step through sharded vs plain eager PyTorch.

Same model weights, batch, bf16 autocast and AdamW math on one GPU:
  plain:   module(x) -> loss.backward() -> torch.optim.AdamW(fused=True).step()
  sharded: sharded.value_and_grad(loss)(state.params, batch) -> state.apply_gradients
Both run interleaved in rounds (A, B, A, B, ...) so clock or thermal drift hits both;
reports the median step time of each and their ratio, as JSON.

    python benchmarks/core_overhead.py --preset 125m --out benchmarks/results/core_overhead.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import os

import torch
from _harness import gpt_train_step

import sharded
from sharded.models import GPT, GPTConfig, flops_per_token, loss_fn


def time_steps(run, steps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="125m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default=os.environ.get("SHARDED_COMMIT"), help="the git commit measured")
    args = ap.parse_args()
    dev = torch.device("cuda")
    cfg = GPTConfig.preset(args.preset, seq_len=args.seq)
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=dev)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=dev)

    # Plain eager PyTorch.
    torch.manual_seed(0)
    module = GPT(cfg).to(dev)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def plain():
        with torch.autocast("cuda", torch.bfloat16):
            loss = loss_fn(module(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # The same step through sharded.
    torch.manual_seed(0)
    model = sharded.trace(GPT(cfg).to(dev))

    train_step = gpt_train_step(model)

    step = sharded.Step(train_step)
    box = [step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-4, weight_decay=0.1)))]

    def ours():
        box[0], _ = step(box[0], (x, y))

    for run in (plain, ours):  # warm-up: allocator, cuBLAS handles, kernels
        time_steps(run, 3)
    times = {"plain_eager_fused_adamw": [], "sharded": []}
    for _ in range(args.rounds):
        times["plain_eager_fused_adamw"].append(time_steps(plain, args.steps))
        times["sharded"].append(time_steps(ours, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * args.seq
    result = {
        "benchmark": "core_overhead",
        "device": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "commit": args.commit,
        "preset": args.preset,
        "params": model.num_params(),
        "batch": args.batch,
        "seq": args.seq,
        "precision": "fp32 params, bf16 autocast",
        "median_step_s": med,
        "step_s_per_round": times,
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "mfu": {k: tokens / v * flops_per_token(cfg) / 989e12 for k, v in med.items()},
        "ratio_sharded_over_plain": med["sharded"] / med["plain_eager_fused_adamw"],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
