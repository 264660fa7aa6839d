"""sharded `pipeline` vs `torch.distributed.pipelining` on the same GPT, data, bf16
autocast and fused AdamW, in one run on N local GPUs.

    python benchmarks/pipeline_vs_torch.py --nproc 4 --preset 1.3b --out benchmarks/results/pipeline_vs_torch.json

Both systems cut the GPT's blocks at the same places: sharded's partition="compute"
(block matmul work balanced, the head's counted on the last stage).

Systems (each in its own fresh ranks):
  torch_1f1b          PipelineStage + Schedule1F1B, pp = nproc
  sharded_1f1b        pipeline(stages=nproc, schedule="1f1b")
  sharded_interleaved pipeline(stages=nproc, schedule="interleaved", virtual=2)
  sharded_pp2_zero3   shard_zero(stage=3)(pipeline(stages=2)) on pp=2 × dp=nproc/2
Reports tokens/s, peak memory, and for sharded the bubble measured from each rank's
forward/backward times (one extra step with `record_timeline`, which synchronizes after
every action) next to the 1F1B formula (p-1)/(m+p-1). `--device cpu` runs a smoke test
on gloo (timings meaningless there).
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
from _harness import gc_paused, common_args, gpt_train_step, report, run_each
from _profile import profile_steps
from torch import nn

import sharded
from sharded.models import GPT, GPTConfig, loss_fn
from sharded.transforms._stages import plan_chunks


def _autocast(dev: torch.device):
    return torch.autocast(dev.type, torch.bfloat16)


class _TorchStage(nn.Module):
    """One pipeline stage of a GPT for torch.distributed.pipelining: the embedding on
    the first, a contiguous run of blocks, the final norm and head on the last."""

    def __init__(self, gpt: GPT, blocks: range, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self.wte, self.wpe = (gpt.wte, gpt.wpe) if first else (None, None)
        self.blocks = nn.ModuleList(gpt.blocks[i] for i in blocks)
        self.ln_f, self.head = (gpt.ln_f, gpt.head) if last else (None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _autocast(x.device):
            if self.first:
                x = self.wte(x) + self.wpe(torch.arange(x.shape[1], device=x.device))
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_f(x)) if self.last else x


PARTITION = "compute"  # both systems cut the blocks where sharded's "compute" partition does


def _stage_blocks(cfg: GPTConfig, p: int, rank: int) -> range:
    """The blocks of pp rank `rank`, as `pipeline(partition=PARTITION)` cuts them."""
    with torch.device("meta"):
        first = plan_chunks(sharded.trace(GPT(cfg)), p, PARTITION, "benchmark").first_block
    return range(first[rank], first[rank + 1] if rank + 1 < p else cfg.n_layers)


def _torch_1f1b(cfg: GPTConfig, m: int, dev: torch.device):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    rank, p = sharded.distributed.rank(), sharded.distributed.world_size()
    gpt = GPT(cfg)
    stage_module = _TorchStage(gpt, _stage_blocks(cfg, p, rank), rank == 0, rank == p - 1).to(dev)
    del gpt
    stage = PipelineStage(stage_module, rank, p, dev)
    schedule = Schedule1F1B(stage, n_microbatches=m, loss_fn=loss_fn)
    fused = dev.type == "cuda"
    opt = torch.optim.AdamW(stage_module.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    # The tied embedding/head lives on the first and the last stage; torch leaves summing
    # its two grads to the user, and without it the two copies drift apart (sharded does it).
    ends = torch.distributed.new_group([0, p - 1]) if cfg.tied and p > 1 else None
    tied = {0: stage_module.wte, p - 1: stage_module.head}.get(rank) if ends is not None else None

    def step(x, y):
        if rank == 0:
            schedule.step(x)
        elif rank == p - 1:
            schedule.step(target=y)
        else:
            schedule.step()
        if tied is not None:
            torch.distributed.all_reduce(tied.weight.grad, group=ends)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, None


def _sharded(cfg: GPTConfig, m: int, dev: torch.device, pp: int, schedule: str, zero3: bool):
    sharded.Mesh.set_current(sharded.Mesh(pp=pp))
    model = sharded.trace(GPT(cfg).to(dev))

    train_step = gpt_train_step(model)

    step = sharded.pipeline(stages=pp, microbatches=m, schedule=schedule, partition=PARTITION)(train_step)
    if zero3:
        step = sharded.shard_zero(stage=3)(step)
    box = [step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-4, weight_decay=0.1)))]

    def run(x, y):
        box[0], _ = step(box[0], (x, y))

    pipe = next(t for t in step.transforms if t.name == "pipeline")
    return run, pipe


BUILD = {
    "torch_1f1b": lambda cfg, m, dev, p: _torch_1f1b(cfg, m, dev),
    "sharded_1f1b": lambda cfg, m, dev, p: _sharded(cfg, m, dev, p, "1f1b", False),
    "sharded_interleaved": lambda cfg, m, dev, p: _sharded(cfg, m, dev, p, "interleaved", False),
    "sharded_pp2_zero3": lambda cfg, m, dev, p: _sharded(cfg, m, dev, 2, "1f1b", True),
}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _measured_bubble(pipe, step, x, y, dev) -> dict:
    """One step with every action timed; the bubble over all pp ranks' timelines."""
    pipe.record_timeline = True
    step(x, y)
    pipe.record_timeline = False
    spans = sharded.comm.all_gather_object([(a, s, e) for a, s, e in pipe.timeline])
    start = min(s for rank in spans for _, s, _ in rank)
    end = max(e for rank in spans for _, _, e in rank)
    busy = sum(e - s for rank in spans for _, s, e in rank)
    ranks = len(spans)
    return {"bubble": 1 - busy / (ranks * (end - start)), "formula_1f1b": (pipe.stages - 1) / (pipe.microbatches + pipe.stages - 1)}


def measure(name: str, args) -> dict:
    dev = sharded.distributed.device()
    cfg = GPTConfig.preset(args.preset, seq_len=args.seq)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(dev)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(dev)
    torch.manual_seed(0)
    step, pipe = BUILD[name](cfg, args.microbatches, dev, args.nproc)
    for _ in range(args.warmup):
        step(x, y)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    with gc_paused():
        for _ in range(args.steps):
            _sync(dev)
            t0 = time.perf_counter()
            step(x, y)
            _sync(dev)
            times.append(time.perf_counter() - t0)
    peak = torch.tensor([torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0], dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    med = statistics.median(times)
    result = {
        "median_step_s": med,
        "step_s": times,
        "tokens_per_s": args.batch * args.seq / med,  # the global batch, whatever the pp × dp split
        "peak_memory_gib_max_rank": peak.item() / 2**30,
    }
    if pipe is not None:
        result["timeline"] = _measured_bubble(pipe, step, x, y, dev)
    if args.profile and dev.type == "cuda":
        result["gpu_time"] = profile_steps(lambda: step(x, y), steps=2)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(ap, nproc=4, batch=16, batch_help="sequences per step (the global batch: every pp rank sees it)")
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--systems", default=",".join(BUILD))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--profile", action="store_true", help="also profile 2 steps on CUDA: GPU compute, idle and communication time, top kernels")
    args = ap.parse_args()
    systems = run_each(args.systems.split(","), measure, args, device=args.device)
    base = systems.get("torch_1f1b", {})
    result = {
        "benchmark": "pipeline_vs_torch",
        "device": f"{args.nproc}x {torch.cuda.get_device_name(0)}" if args.device == "cuda" else f"{args.nproc}x cpu (smoke)",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "commit": args.commit,
        "preset": args.preset,
        "seq": args.seq,
        "batch": args.batch,
        "microbatches": args.microbatches,
        "precision": "fp32 params, bf16 autocast compute, fused AdamW",
        "systems": systems,
        "ratios_vs_torch_1f1b": {
            name: s["tokens_per_s"] / base["tokens_per_s"]
            for name, s in systems.items()
            if name != "torch_1f1b" and "error" not in s and "tokens_per_s" in base
        },
    }
    report(result, args.out)


if __name__ == "__main__":
    main()
