"""remat: activation memory saved and step time paid, GPT-1.3B (untied head) on one GPU.

Systems, each in its own fresh process (so each peak is its own), same init, data, batch:
  sharded                  mixed_precision("bf16")(step): bf16 compute params, fp32 masters, fused adamw
  sharded_remat_full       remat("full") over it
  sharded_remat_selective  remat("selective") over it
  torch                    plain GPT, fp32 params, bf16 autocast, AdamW(fused=True)
  torch_checkpoint         the same, each block's call under torch.utils.checkpoint (use_reentrant=False)
Per system: step times after --warmup (min/median/max over the timed steps of all
--repeats rounds, whose order alternates A..E, E..A, plus each round's median), tokens/s
from the median; state memory = allocated before the timed steps (params, optimizer
state); peak over the timed steps; activation memory = peak - state (it also holds the
grads and sharded's bf16 param copies, neither in the state); forward activations =
allocated once the loss is computed, before backward, - state. Ratios, remat vs none:
activations without / with, step-time overhead; for sharded_remat_full the acceptance
booleans (activations >= 3x lower, overhead <= 35%).

    python benchmarks/remat_gpt.py --out benchmarks/results/remat_1.3b_h200.json
CPU smoke run (no memory fields):
    python benchmarks/remat_gpt.py --device cpu --preset tiny --seq 64 --steps 2 --warmup 1 --repeats 1
"""
from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time

import torch
from torch.utils.checkpoint import checkpoint
from _harness import common_args, gc_paused, provenance, report, run_each

import sharded
from sharded.models import GPT, GPTConfig, loss_fn

SYSTEMS = ["sharded", "sharded_remat_full", "sharded_remat_selective", "torch", "torch_checkpoint"]
MEMORY = ["state_memory_gib", "peak_memory_gib", "activation_memory_gib", "forward_activation_gib"]


def _sharded(cfg, dev, policy, probe):
    model = sharded.trace(GPT(cfg).to(dev))

    def loss(params, batch):  # no autocast here: mixed_precision runs the forward under it
        value = loss_fn(model.apply(params, batch[0]), batch[1])
        probe()
        return value

    def train_step(state, batch):
        value, grads = sharded.value_and_grad(loss)(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    step = sharded.mixed_precision("bf16")(train_step)
    if policy:
        step = sharded.remat(policy=policy)(step)
    box = [step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-4, weight_decay=0.1)))]

    def run(x, y):
        box[0], metrics = step(box[0], (x, y))
        return metrics["loss"]

    return run


def _torch(cfg, dev, remat, probe):
    module = GPT(cfg).to(dev)
    if remat:  # the block's own forward, under checkpoint; gpt.py untouched
        for block in module.blocks:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def run(x, y):
        with torch.autocast(dev.type, torch.bfloat16):
            loss = loss_fn(module(x), y)
        probe()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return run


BUILD = {
    "sharded": functools.partial(_sharded, policy=None),
    "sharded_remat_full": functools.partial(_sharded, policy="full"),
    "sharded_remat_selective": functools.partial(_sharded, policy="selective"),
    "torch": functools.partial(_torch, remat=False),
    "torch_checkpoint": functools.partial(_torch, remat=True),
}


def measure(name: str, args) -> dict:
    dev = sharded.distributed.device()
    cuda = dev.type == "cuda"
    cfg = GPTConfig.preset(args.preset, seq_len=args.seq, tied=args.tied)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(dev)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(dev)
    after_forward = [0]

    def probe():  # allocated bytes once the forward (loss included) is done, before backward
        if cuda:
            after_forward[0] = max(after_forward[0], torch.cuda.memory_allocated(dev))

    torch.manual_seed(0)
    step = BUILD[name](cfg, dev, probe=probe)
    first_loss = step(x, y).item()  # warm-up, its first step's loss a check that all systems agree
    for _ in range(args.warmup - 1):
        step(x, y)
    if cuda:
        torch.cuda.synchronize()
        state = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        after_forward[0] = 0
    times = []
    with gc_paused():
        for _ in range(args.steps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            step(x, y)
            if cuda:
                end.record()
                torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3 if cuda else time.perf_counter() - t0)
    memory = dict.fromkeys(MEMORY)
    if cuda:
        peak = torch.cuda.max_memory_allocated(dev)
        memory = dict(zip(MEMORY, (b / 2**30 for b in (state, peak, peak - state, after_forward[0] - state))))
    return {"step_s": times, "median_step_s": statistics.median(times), **memory, "loss_first_step": first_loss}


def aggregate(runs: list[dict], tokens: int) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"]}
    times = [t for r in ok for t in r["step_s"]]
    med = statistics.median(times)
    out = {
        "step_s": {"min": min(times), "median": med, "max": max(times)},
        "per_round_median_step_s": [r.get("median_step_s", r.get("error")) for r in runs],
        "tokens_per_s": tokens / med,
        **{k: (None if ok[0][k] is None else statistics.median(r[k] for r in ok)) for k in MEMORY},
        "per_round_peak_memory_gib": [r.get("peak_memory_gib", r.get("error")) for r in runs],
        "loss_first_step": ok[0]["loss_first_step"],
    }
    if len(ok) < len(runs):
        out["errors"] = [r["error"] for r in runs if "error" in r]
    return out


def compare(with_: dict, without: dict, criteria: bool = False) -> dict:
    """Memory ratios are `without` / `with_`, the overhead `with_` / `without` - 1."""
    if "error" in with_ or "error" in without:
        return {"error": "a system failed; see results"}
    div = lambda a, b: None if a is None or b is None else a / b  # noqa: E731
    out = {
        "activation_memory_ratio": div(without["activation_memory_gib"], with_["activation_memory_gib"]),
        "forward_activation_ratio": div(without["forward_activation_gib"], with_["forward_activation_gib"]),
        "peak_memory_ratio": div(without["peak_memory_gib"], with_["peak_memory_gib"]),
        "step_time_overhead": with_["step_s"]["median"] / without["step_s"]["median"] - 1,
    }
    if criteria:
        # Activations are what the forward keeps for backward: the memory held once the
        # loss is computed, less the state (the peak also holds the grads being formed).
        ratio = out["forward_activation_ratio"]
        out["activations_3x_lower"] = None if ratio is None else ratio >= 3
        out["overhead_at_most_35pct"] = out["step_time_overhead"] <= 0.35
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(ap, nproc=1, batch=4, batch_help="sequences per step")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2, help="rounds over every system, order alternating")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tied", action="store_true", help="tie the head to the embedding (default: untied)")
    args = ap.parse_args()
    rounds = []
    for r in range(args.repeats):
        order = SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]
        print(f"round {r}: {' '.join(order)}", flush=True)
        rounds.append(run_each(order, measure, args, device=args.device))
    results = {n: aggregate([rd[n] for rd in rounds], args.batch * args.seq) for n in SYSTEMS}
    cfg = GPTConfig.preset(args.preset, seq_len=args.seq, tied=args.tied)
    cuda = args.device == "cuda"
    with torch.device("meta"):
        params = sum(p.numel() for p in GPT(cfg).parameters())
    result = {
        **provenance("remat_gpt", f"{args.nproc}x {torch.cuda.get_device_name(0)}" if cuda else f"cpu ({platform.machine()})", args.commit),
        "preset": args.preset,
        "params": params,
        "tied": args.tied,
        "seq": args.seq,
        "batch": args.batch,
        **{k: getattr(args, k) for k in ("steps", "warmup", "repeats")},
        "precision": "sharded: bf16 compute params, fp32 masters; torch: fp32 params, bf16 autocast; fused AdamW both",
        "results": results,
        "ratios": {
            "sharded_remat_full/sharded": compare(results["sharded_remat_full"], results["sharded"], criteria=True),
            "sharded_remat_selective/sharded": compare(results["sharded_remat_selective"], results["sharded"]),
            "torch_checkpoint/torch": compare(results["torch_checkpoint"], results["torch"]),
            "sharded_remat_full/torch_checkpoint": compare(results["sharded_remat_full"], results["torch_checkpoint"]),
        },
        "systems": [{n: rd[n] for n in SYSTEMS} for rd in rounds],  # every round's raw result, written to --out only
    }
    report(result, args.out)


if __name__ == "__main__":
    main()
