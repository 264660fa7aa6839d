"""sharded's data parallelism, ZeRO and compile path against DDP, FSDP2 and torchtitan's
per-block compile, on the same GPT, data and optimizer, in one run on N local GPUs.

    python benchmarks/speed_vs_torch.py --nproc 2 --preset 1.3b --out benchmarks/results/speed_vs_torch_1.3b.json

The recipe (default --precision bf16, what users run): bf16 params for compute, fp32
grad reductions, fp32 masters, fused AdamW, an untied head. sharded as
`shard_zero(stage=s)(mixed_precision("bf16", autocast=False)(train_step))` (or
data_parallel): every param cast to bf16 and no autocast, as FSDP2's policy does; FSDP2 as
`fully_shard` per block and root with MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32) (torchtitan's recipe); DDP with fp32 params under bf16 autocast.
--precision autocast: fp32 params and communication everywhere, bf16 autocast compute.
"_compile" systems: sharded.compile() (each block's forward, inductor) and, for FSDP2,
torch.compile of each block module before fully_shard (torchtitan's per-block compile).

Each system runs in its own fresh ranks (its peak memory is its own); the systems take
turns, `--repeats` times over, so drift on the machine falls on all of them. Reported
per system: min/median/max step time over every timed step, tokens/s and MFU at the
median, peak memory (the largest rank's), each repeat's median, and the median host time
(until a step's call returns, before the GPU is waited on). `--device cpu` runs
the same code on gloo (a smoke test of the harness: no peak memory, no MFU).

Acceptance (issue 13): sharded_zero3 >= 1.0x fsdp2 (memory <= fsdp2 + 2%);
sharded_zero1 and sharded_dp >= 1.0x ddp; sharded_zero2 >= 1.0x fsdp2_no_reshard;
sharded_zero3_no_reshard is FSDP2-without-resharding's own configuration (params
sharded between steps, gathered once per step and kept through backward), where
sharded_zero2 keeps whole fp32 params (DeepSpeed's ZeRO-2);
sharded_zero3_compile >= 1.10x fsdp2 and >= 1.0x fsdp2_compile.
Issue 14: sharded_zero3_offload (`offload("cpu", params=True)` over ZeRO-3) against fsdp2_offload
(CPUOffloadPolicy(pin_memory=True)) and deepspeed_zero3_offload (offload_optimizer and
offload_param to pinned CPU memory, CPUAdam); sharded_zero3_offload_no_reshard keeps each
gathered block through backward, so each block's chunks cross PCIe once per step, not twice;
sharded_zero3_offload_half moves the optimizer state of the first half of the blocks only
(`where=`), its update on the host while the rest updates on the device;
sharded_zero3_offload_device is sharded_zero3_offload with `update="device"`: the same
state on the host, each block's update run on the GPU with its params and moments
streamed up and back during backward (decision 54).
Issue 16: sharded_tp (`tensor_parallel(sequence_parallel=False)` over every rank, bf16
mixed precision) against torch_tp (`parallelize_module`, Colwise/RowwiseParallel, the
same model), and beside sharded_zero3 on the same GPUs; sharded_tp_sp (sequence
parallelism) against torch_tp_sp (torchtitan's recipe: SequenceParallel norms too). The
tp systems run the whole global batch on every rank (tp splits the model, not the
rows), so tokens per step are the same as the dp systems'.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from _harness import common_args, gc_paused, provenance, report, run_each
from _profile import profile_steps

import sharded
from sharded.models import GPT, GPTConfig, loss_fn
from sharded.models.gpt import flops_per_token
from sharded.train import peak_flops

SYSTEMS = [
    "sharded_zero3", "fsdp2", "sharded_zero2", "sharded_zero3_no_reshard", "fsdp2_no_reshard", "sharded_zero1", "sharded_dp", "ddp",
    "sharded_zero3_compile", "fsdp2_compile", "sharded_zero3_offload", "sharded_zero3_offload_no_reshard", "sharded_zero3_offload_half", "sharded_zero3_offload_device",
    "fsdp2_offload", "deepspeed_zero3_offload", "sharded_tp", "sharded_tp_sp", "torch_tp", "torch_tp_sp",
]
PAIRS = [
    ("sharded_zero3", "fsdp2"), ("sharded_zero2", "fsdp2_no_reshard"), ("sharded_zero3_no_reshard", "fsdp2_no_reshard"),
    ("sharded_zero1", "ddp"), ("sharded_dp", "ddp"),
    ("sharded_zero3_compile", "fsdp2"), ("sharded_zero3_compile", "fsdp2_compile"),
    ("sharded_zero3_offload", "fsdp2_offload"), ("sharded_zero3_offload", "deepspeed_zero3_offload"),
    ("sharded_zero3_offload_no_reshard", "fsdp2_offload"), ("sharded_zero3_offload_half", "fsdp2_offload"),
    ("sharded_zero3_offload_device", "fsdp2_offload"), ("sharded_zero3_offload_device", "deepspeed_zero3_offload"),
    ("sharded_tp", "torch_tp"), ("sharded_tp_sp", "torch_tp_sp"), ("sharded_tp", "sharded_zero3"),
]
LR, WD = 1e-4, 0.1


def _gpt(cfg: GPTConfig) -> GPT:
    """The model, initialised on this rank's device: a 13B model's CPU init would take minutes."""
    with torch.device(sharded.distributed.device()):
        return GPT(cfg)


def _rows(x: torch.Tensor) -> slice:
    """This rank's rows of the global batch (the torch baselines slice it themselves)."""
    rank, world = sharded.distributed.rank(), sharded.distributed.world_size()
    n = x.shape[0] // world
    return slice(rank * n, (rank + 1) * n)


def _torch_step(module: torch.nn.Module, params, autocast: bool):
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, fused=torch.cuda.is_available())
    device = sharded.distributed.device().type

    def step(x, y):
        rows = _rows(x)
        with torch.autocast(device, torch.bfloat16, enabled=autocast):
            loss = loss_fn(module(x[rows]), y[rows])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _fsdp2(cfg: GPTConfig, precision: str, reshard: bool = True, compiled: str | None = None, offload: bool = False):
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    bf16 = precision == "bf16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    where = CPUOffloadPolicy(pin_memory=True) if offload else OffloadPolicy()
    module = _gpt(cfg)
    for i, block in enumerate(module.blocks):
        if compiled:  # torchtitan: compile each block, then shard it
            block = module.blocks[i] = torch.compile(block, backend=compiled, fullgraph=True)
        fully_shard(block, reshard_after_forward=reshard, mp_policy=policy, offload_policy=where)
    fully_shard(module, reshard_after_forward=reshard, mp_policy=policy, offload_policy=where)
    return _torch_step(module, module.parameters(), autocast=not bf16)


def _torch_tp(cfg: GPTConfig, precision: str, sequence: bool):
    """torch's own tensor parallelism, torchtitan's recipe: `parallelize_module` with the
    embedding rowwise and the head colwise over the vocabulary (logits replicated), each
    block's qkv and fc colwise, its projections rowwise; with `sequence`, the norms are
    `SequenceParallel`, the residual stream holds 1/tp of the tokens, attention and MLP
    gather their input (`PrepareModuleInput`) and the projections reduce-scatter. fp32
    params under bf16 autocast (torchtitan's mixed precision without FSDP), fused AdamW
    over the DTensor params. The fused qkv's rows are first interleaved so that
    ColwiseParallel's contiguous chunks are each rank's heads of q, k and v, as
    tensor_parallel's blocks are: the same model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel, parallelize_module

    if cfg.tied:
        raise ValueError("torch_tp: parallelize_module would distribute a tied weight twice; run it with an untied head")
    world, dev = sharded.distributed.world_size(), sharded.distributed.device()
    module = _gpt(cfg)
    with torch.no_grad():
        for block in module.blocks:
            for p in (block.attn.qkv.weight, block.attn.qkv.bias):
                if p is not None:
                    p.copy_(p.view(3, world, -1, *p.shape[1:]).transpose(0, 1).reshape(p.shape))
    tokens = Shard(1) if sequence else Replicate()
    gathered = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True)
    plan = {"wte": RowwiseParallel(input_layouts=Replicate()), "head": ColwiseParallel(input_layouts=tokens, output_layouts=Replicate())}
    if sequence:  # the residual stream enters the first block whole and is cut there (a local slice)
        plan.update({"blocks.0": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True),
                     "ln_f": SequenceParallel()})
    for i in range(cfg.n_layers):
        plan.update({f"blocks.{i}.attn.qkv": ColwiseParallel(), f"blocks.{i}.attn.proj": RowwiseParallel(output_layouts=tokens),
                     f"blocks.{i}.mlp.fc": ColwiseParallel(), f"blocks.{i}.mlp.proj": RowwiseParallel(output_layouts=tokens)})
        if sequence:
            plan.update({f"blocks.{i}.ln_1": SequenceParallel(), f"blocks.{i}.ln_2": SequenceParallel(),
                         f"blocks.{i}.attn": gathered, f"blocks.{i}.mlp": gathered})
    parallelize_module(module, init_device_mesh(dev.type, (world,)), plan)
    # fused AdamW refuses DTensors beside plain tensors in one call: one optimizer for the
    # params the plan distributed, one for those it left whole (each rank's identical copy)
    kinds = ([p for p in module.parameters() if isinstance(p, DTensor) == distributed] for distributed in (True, False))
    opts = [torch.optim.AdamW(group, lr=LR, weight_decay=WD, fused=True) for group in kinds if group]

    def step(x, y):  # every tp rank runs the whole global batch
        with torch.autocast(dev.type, torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(module(x), y)
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def _ddp(cfg: GPTConfig, precision: str):
    from torch.nn.parallel import DistributedDataParallel

    module = _gpt(cfg)
    dev = sharded.distributed.device()
    wrapped = DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None)
    return _torch_step(wrapped, module.parameters(), autocast=True)  # fp32 params: bf16 compute is autocast's in both recipes


def _deepspeed_offload(cfg: GPTConfig, precision: str, batch: int):
    """DeepSpeed ZeRO-3 with its optimizer (CPUAdam) and params offloaded to pinned host memory."""
    import deepspeed

    host = {"device": "cpu", "pin_memory": True}
    config = {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": {"stage": 3, "offload_optimizer": host, "offload_param": host, "overlap_comm": True, "contiguous_gradients": True},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD}},
    }
    module = _gpt(cfg)  # initialize partitions it and moves each rank's part to the host
    engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=config)

    def run(x, y):
        rows = _rows(x)
        engine.backward(loss_fn(engine(x[rows]), y[rows]))
        engine.step()

    return run


def _first_half(cfg: GPTConfig):
    """offload(where=...) for the half-offloaded system: the first half of the blocks."""
    return lambda name, x: name.startswith("blocks.") and int(name.split(".")[1]) < cfg.n_layers // 2


def _sharded(cfg: GPTConfig, precision: str, stage: int, compiled: str | None = None, offload: Any = False, tp: bool | None = None, **zero: Any):
    """stage 0: data_parallel; `tp` (its value: sequence_parallel): tensor_parallel over every rank instead;
    `zero`: shard_zero's options beside the stage."""
    if tp is not None:
        sharded.Mesh.set_current(sharded.Mesh(tp=sharded.distributed.world_size()))
    model = sharded.trace(_gpt(cfg))
    device = sharded.distributed.device().type

    def loss(params, batch):
        with torch.autocast(device, torch.bfloat16, enabled=precision == "autocast"):
            return loss_fn(model.apply(params, batch[0]), batch[1])

    def train_step(state, batch):
        value, grads = sharded.value_and_grad(loss)(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    step = sharded.compile(backend=compiled)(train_step) if compiled else train_step
    step = sharded.mixed_precision("bf16", autocast=False)(step) if precision == "bf16" else step
    if tp is not None:
        step = sharded.tensor_parallel(sequence_parallel=tp)(step)
    else:
        step = sharded.shard_zero(stage=stage, **zero)(step) if stage else sharded.data_parallel(step)
    step = sharded.offload("cpu", **(offload if isinstance(offload, dict) else {"params": True}))(step) if offload else step
    on_host = offload and not (isinstance(offload, dict) and "where" in offload)  # where= keeps the rest's state on the device
    box = [step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(LR, weight_decay=WD), opt_device="cpu" if on_host else None))]

    def run(x, y):
        box[0], _ = step(box[0], (x, y))

    return run


BUILD = {  # (config, precision, the arguments) -> a step of (x, y)
    "sharded_zero3": lambda cfg, p, a: _sharded(cfg, p, 3),
    "sharded_zero2": lambda cfg, p, a: _sharded(cfg, p, 2),
    "sharded_zero3_no_reshard": lambda cfg, p, a: _sharded(cfg, p, 3, reshard_after_forward=False),
    "sharded_zero1": lambda cfg, p, a: _sharded(cfg, p, 1),
    "sharded_dp": lambda cfg, p, a: _sharded(cfg, p, 0),
    "sharded_zero3_compile": lambda cfg, p, a: _sharded(cfg, p, 3, compiled=a.compile_backend),
    "fsdp2": lambda cfg, p, a: _fsdp2(cfg, p),
    "fsdp2_no_reshard": lambda cfg, p, a: _fsdp2(cfg, p, reshard=False),
    "fsdp2_compile": lambda cfg, p, a: _fsdp2(cfg, p, compiled=a.compile_backend),
    "ddp": lambda cfg, p, a: _ddp(cfg, p),
    "sharded_zero3_offload": lambda cfg, p, a: _sharded(cfg, p, 3, offload=True),
    "sharded_zero3_offload_no_reshard": lambda cfg, p, a: _sharded(cfg, p, 3, offload=True, reshard_after_forward=False),
    "sharded_zero3_offload_half": lambda cfg, p, a: _sharded(cfg, p, 3, offload={"where": _first_half(cfg)}),
    "sharded_zero3_offload_device": lambda cfg, p, a: _sharded(cfg, p, 3, offload={"params": True, "update": "device"}),
    "fsdp2_offload": lambda cfg, p, a: _fsdp2(cfg, p, offload=True),
    "deepspeed_zero3_offload": lambda cfg, p, a: _deepspeed_offload(cfg, p, a.batch),
    "sharded_tp": lambda cfg, p, a: _sharded(cfg, p, 0, tp=False),
    "sharded_tp_sp": lambda cfg, p, a: _sharded(cfg, p, 0, tp=True),
    "torch_tp": lambda cfg, p, a: _torch_tp(cfg, p, sequence=False),
    "torch_tp_sp": lambda cfg, p, a: _torch_tp(cfg, p, sequence=True),
}


def _config(args) -> GPTConfig:
    return GPTConfig.preset(args.preset, seq_len=args.seq, tied=args.tied)


def measure(name: str, args) -> dict:
    """One system in these ranks: warm up (compiling, if it does), then time --steps steps."""
    dev = sharded.distributed.device()
    cuda = dev.type == "cuda"
    cfg = _config(args)
    world = sharded.distributed.world_size()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch * world, args.seq), generator=g).to(dev)
    y = torch.randint(0, cfg.vocab_size, (args.batch * world, args.seq), generator=g).to(dev)
    torch.manual_seed(0)
    step = BUILD[name](cfg, args.precision, args)
    for _ in range(args.warmup):
        step(x, y)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
    times, hosts = [], []
    with gc_paused():
        for _ in range(args.steps):
            began = time.perf_counter()
            step(x, y)
            hosts.append(time.perf_counter() - began)  # until the step's launches return (and any wait it does itself)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
    peak = torch.tensor([torch.cuda.max_memory_allocated(dev) if cuda else 0.0], dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    result = {"step_s": times, "host_s": hosts, "median_step_s": statistics.median(times), "peak_memory_gib": peak.item() / 2**30 if cuda else None}
    if args.profile and cuda:
        trace = f"{args.trace_dir}/{name}_rank{sharded.distributed.rank()}.json.gz" if args.trace_dir else None
        result["gpu_time"] = profile_steps(lambda: step(x, y), steps=3, trace=trace, top=40)
    return result


def summarize(runs: list[dict], tokens: int, flops: float, peak: float | None) -> dict:
    """One system over its repeats: every timed step pooled, and each repeat's median."""
    if any("error" in r for r in runs):
        return {"error": next(r["error"] for r in runs if "error" in r)}
    times = [t for r in runs for t in r["step_s"]]
    median = statistics.median(times)
    peaks = [r["peak_memory_gib"] for r in runs if r["peak_memory_gib"] is not None]
    return {
        "step_s": {"min": min(times), "median": median, "max": max(times)},
        "repeat_medians_s": [statistics.median(r["step_s"]) for r in runs],
        # near the step time, the host bounds the step (a step that waits on the GPU itself, as offload's does, counts that wait)
        "host_s_median": statistics.median(t for r in runs for t in r["host_s"]),
        "tokens_per_s": tokens / median,
        "mfu": tokens / median * flops / peak if peak else None,
        "peak_memory_gib_max_rank": max(peaks) if peaks else None,
        **({"gpu_time": runs[0]["gpu_time"]} if "gpu_time" in runs[0] else {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(ap, nproc=2, batch=4, batch_help="sequences per rank")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per system per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="turns each system takes, alternating with the others")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "autocast"])
    ap.add_argument("--tied", action="store_true", help="tie the head to the embedding (default: untied, the standard recipe)")
    ap.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    ap.add_argument("--profile", action="store_true", help="also profile 3 steps of each system's first turn: communication hidden, idle, top kernels")
    ap.add_argument("--trace-dir", default=None, help="with --profile: write each rank's trace (host ops and kernels) there")
    ap.add_argument("--compile-backend", default="inductor", help="the _compile systems' torch.compile backend (aot_eager for a CPU smoke test)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: gloo, a smoke test of this harness")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {n: [] for n in args.systems}
    for turn in range(args.repeats):
        for name, result in run_each(args.systems, measure, args, device=args.device).items():
            runs[name].append(result)
        # written after every turn: a run cut short by the device's time limit keeps the turns it finished
        report(result_of(runs, args, turn + 1), args.out, quiet=turn + 1 < args.repeats)


def result_of(runs: dict[str, list[dict]], args: argparse.Namespace, repeats: int) -> dict:
    """The results JSON of the turns run so far: each system's summary and each pair's ratios."""
    cfg = _config(args)
    tokens = args.batch * args.nproc * args.seq
    peak = peak_flops(torch.device("cuda", 0)) * args.nproc if args.device == "cuda" else None
    systems = {n: summarize(r, tokens, flops_per_token(cfg), peak) for n, r in runs.items()}
    ok = lambda n: n in systems and "error" not in systems[n]  # noqa: E731
    device = f"{args.nproc}x {torch.cuda.get_device_name(0)}" if args.device == "cuda" else f"{args.nproc} CPU ranks (gloo)"
    return {
        **provenance("speed_vs_torch", device, args.commit),
        "model": f"GPT-{args.preset}, {'tied' if args.tied else 'untied'} head, seq {args.seq}, {args.batch} sequences per rank",
        "precision": {"bf16": "bf16 params for compute, no autocast (sharded: mixed_precision('bf16', autocast=False)), fp32 reductions and masters (DDP: fp32 params under bf16 autocast)",
                      "autocast": "fp32 params and communication, bf16 autocast compute"}[args.precision] + "; fused AdamW",
        "repeats": repeats,
        "systems": systems,
        "ratios": {
            f"{a}/{b}": {
                "tokens_per_s": systems[a]["tokens_per_s"] / systems[b]["tokens_per_s"],
                "slowest_over_fastest": systems[b]["step_s"]["min"] / systems[a]["step_s"]["max"],
                **({"peak_memory": systems[a]["peak_memory_gib_max_rank"] / systems[b]["peak_memory_gib_max_rank"]} if systems[a]["peak_memory_gib_max_rank"] else {}),
            }
            for a, b in PAIRS
            if ok(a) and ok(b)
        },
    }


if __name__ == "__main__":
    main()
