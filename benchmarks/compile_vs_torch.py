"""sharded.compile against torch.compile of the plain module, on one GPU, in one run.

    python benchmarks/compile_vs_torch.py --preset 350m --out benchmarks/results/compile_vs_torch.json

Systems, each built once in this process, compiled in its warmup, then timed in rounds
that alternate them (min/median/max step time):
  torch_eager      the GPT module, fp32 params under bf16 autocast, fused AdamW
  torch_compile    the same, the whole module through torch.compile (inductor)
  torch_compile_loss  the module and the loss after it through torch.compile, as
                   sharded.compile's loss=True compiles them
  sharded_eager    mixed_precision("bf16", autocast=False)(train_step): bf16 params for
                   compute, fp32 masters, AdamW (the recipe the 2-GPU benchmarks run)
  sharded_compile  the same with sharded.compile(): alone with the cast, the whole forward
                   compiled as one graph (decision 51)
Acceptance (issue 13): sharded_compile >= 1.0x torch_compile. The systems share the GPU's
memory, so peaks are not reported here. Host time per step (until the step's launches
return) is: a median near the step time means the host bounds the step.
"""
from __future__ import annotations

import argparse
import enum
import statistics

import torch
from _harness import alternate, built_and_warm, common_args, provenance, report

import sharded
from sharded.models import GPT, GPTConfig, loss_fn

SYSTEMS = ["torch_eager", "torch_compile", "torch_compile_loss", "sharded_eager", "sharded_compile"]
PAIRS = [("sharded_compile", "torch_compile"), ("sharded_compile", "torch_compile_loss"), ("sharded_eager", "torch_eager"), ("sharded_compile", "sharded_eager")]


class Compiled(enum.Enum):
    """What of the torch step goes through torch.compile."""

    NOTHING = "nothing"
    MODULE = "the module"
    MODULE_AND_LOSS = "the module and its loss"


def _torch(cfg: GPTConfig, compiled: Compiled):
    module = GPT(cfg).cuda()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    run = torch.compile(module) if compiled is Compiled.MODULE else module
    loss_of = lambda x, y: loss_fn(run(x), y)  # noqa: E731
    loss_of = torch.compile(loss_of) if compiled is Compiled.MODULE_AND_LOSS else loss_of

    def step(x, y):
        with torch.autocast("cuda", torch.bfloat16):
            loss = loss_of(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _sharded(cfg: GPTConfig, compiled: bool):
    model = sharded.trace(GPT(cfg).cuda())

    def train_step(state, batch):
        value, grads = sharded.value_and_grad(lambda p, b: loss_fn(model.apply(p, b[0]), b[1]))(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    inner = sharded.compile()(train_step) if compiled else train_step
    step = sharded.mixed_precision("bf16", autocast=False)(inner)
    box = [step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-4, weight_decay=0.1)))]

    def run(x, y):
        box[0], _ = step(box[0], (x, y))

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(ap, nproc=1, batch=8, batch_help="sequences per step")
    ap.set_defaults(preset="350m", seq=1024)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per system per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS, help="a subset to run")
    args = ap.parse_args()
    cfg = GPTConfig.preset(args.preset, seq_len=args.seq, tied=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).cuda()
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).cuda()
    build = {"torch_eager": lambda: _torch(cfg, Compiled.NOTHING), "torch_compile": lambda: _torch(cfg, Compiled.MODULE),
             "torch_compile_loss": lambda: _torch(cfg, Compiled.MODULE_AND_LOSS),
             "sharded_eager": lambda: _sharded(cfg, False), "sharded_compile": lambda: _sharded(cfg, True)}
    steps, errors = built_and_warm(args.systems, lambda name: build[name](), args.warmup, x, y)  # the compiled systems compile here
    runs = alternate(steps, args.rounds, args.steps, x, y)
    times = {name: r["step_s"] for name, r in runs.items()}
    tokens = args.batch * args.seq
    systems = {
        n: {"step_s": {"min": min(t), "median": statistics.median(t), "max": max(t)}, "host_s_median": statistics.median(runs[n]["host_s"]),
            "tokens_per_s": tokens / statistics.median(t), "all_step_s": t}
        for n, t in times.items()
    }
    systems.update({n: {"error": e} for n, e in errors.items()})
    result = {
        **provenance("compile_vs_torch", torch.cuda.get_device_name(0), args.commit),
        "model": f"GPT-{args.preset}, untied head, seq {args.seq}, {args.batch} sequences per step",
        "precision": "torch: fp32 params under bf16 autocast; sharded: mixed_precision('bf16', autocast=False) (bf16 params for compute, fp32 masters); fused AdamW both",
        "systems": systems,
        "ratios": {f"{a}/{b}": systems[a]["tokens_per_s"] / systems[b]["tokens_per_s"] for a, b in PAIRS if a in times and b in times},
    }
    report(result, args.out)


if __name__ == "__main__":
    main()
