"""The `sharded` command line: `sharded train|estimate|plan ...` (also `python -m sharded ...`)."""
from __future__ import annotations

import argparse
import dataclasses
import sys

__all__ = ["main"]


def _int_at_least(low: int):
    """argparse type: an int >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        return value

    return parse


_positive, _non_negative = _int_at_least(1), _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{value} must be a fraction of the steps, between 0 and 1")
    return value


def _train_parser(sub: argparse._SubParsersAction) -> None:
    from sharded.models.gpt import PRESETS
    from sharded.train import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train a GPT on the embedded corpus",
        description="Train a GPT preset on the embedded corpus with data_parallel + accumulate; "
        "writes metrics.jsonl, summary.json and loss.png to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", default=d.preset, choices=list(PRESETS), help="GPT preset")
    p.add_argument("--untied", action="store_true", help="the preset with a head of its own (not tied to the embedding)")
    p.add_argument("--nproc", type=_positive, default=d.nproc, help="local ranks to spawn (ignored under torchrun)")
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", type=_positive, default=d.steps)
    p.add_argument("--batch-size", type=_positive, default=d.batch_size, help="global batch, in sequences")
    p.add_argument("--seq-len", type=_positive, default=d.seq_len, help="default: the preset's")
    p.add_argument("--accumulate", type=_positive, default=d.accumulate, help="micro-batches per update (1: off)")
    p.add_argument("--no-data-parallel", dest="data_parallel", action="store_false", help="drop data_parallel")
    p.add_argument("--zero", type=int, default=d.zero, choices=[0, 1, 2, 3], help="shard_zero stage instead of data_parallel (0: off)")
    p.add_argument("--pp", type=_positive, default=d.pp, help="pipeline stages (1F1B over --accumulate micro-batches; dp = nproc / (pp * tp))")
    p.add_argument("--tp", type=_positive, default=d.tp, help="tensor-parallel ranks: attention heads, MLP and vocabulary split over them (Megatron's layout)")
    p.add_argument("--loss-parallel", action="store_true", default=d.loss_parallel, help="with --tp: the loss over logits sharded by vocabulary (no rank holds all of them)")
    p.add_argument("--precision", default=d.precision, choices=["fp32", "bf16", "fp16"], help="mixed_precision compute dtype")
    p.add_argument("--offload", default=d.offload, choices=["none", "cpu", "nvme"], help="offload: the optimizer state in host memory (cpu) or in files on local disk (nvme), the update run on the host")
    p.add_argument("--offload-params", action="store_true", default=d.offload_params, help="with --offload cpu|nvme and --zero 3: the param chunks in host memory (cpu) or the swap file (nvme) too, fetched per block")
    p.add_argument("--offload-path", default=d.offload_path, help="with --offload nvme: the directory on local disk for the swap files")
    p.add_argument("--host-buffer-gb", type=float, default=d.host_buffer_gb, help="with --offload nvme: host memory (GB) the update stages the state through")
    p.add_argument("--offload-update", default=d.offload_update, choices=["host", "device"], help="with --offload cpu --offload-params: run the update on the host's cores (default) or on the GPU, each block's state streamed up and back during backward (faster where several GPUs share the host)")
    p.add_argument("--offload-only", default=d.offload_only, metavar="REGEX", help="with --offload cpu: move only the optimizer state of params whose names match (e.g. 'blocks\\.[0-9]\\.'); the rest updates on the device")
    p.add_argument("--remat", default=d.remat, choices=["none", "full", "selective"], help="activation checkpointing per block")
    p.add_argument("--compile", default=d.compile, choices=["none", "inductor", "aot_eager"], help="the forward through torch.compile with this backend (sharded.compile): one graph on one GPU, else block by block")
    p.add_argument("--data", default=d.data, help="your data: a text file, or a token file (.bin uint16 as nanoGPT writes it, .npy), memory-mapped; the last 10%% is validation")
    p.add_argument("--data-dtype", default=d.data_dtype, choices=["uint16", "uint32"], help="the token ids of a .bin --data file (nanoGPT writes uint16)")
    p.add_argument("--tokenizer", default=d.tokenizer, help="a local Hugging Face tokenizer directory for a text --data (default: bytes)")
    p.add_argument("--model", default=d.model, help="a Hugging Face causal LM's directory (config.json, and safetensors weights or a fresh init) instead of --preset; exported to OUT/hf")
    p.add_argument("--config", default=d.config, help="a DeepSpeed config (JSON): its batch sizes, fp16/bf16, ZeRO stage, optimizer and scheduler replace the flags for them")
    p.add_argument("--resume", default=d.resume, help="a checkpoint directory (a run's OUT/checkpoint): continue from its step up to --steps, under any --zero and --nproc")
    p.add_argument("--stop-at", type=_positive, default=d.stop_at, help="end this run after this step, checkpointed (the schedule still spans --steps); continue with --resume")
    p.add_argument("--compress", default=d.compress, choices=["none", "onebit"], help="1-bit Adam: grads exchanged as signs after a warmup")
    p.add_argument("--compress-warmup", type=_fraction, default=d.compress_warmup, help="fraction of --steps before compressing (default 0.15)")
    p.add_argument("--lr", type=_positive_float, default=d.lr)
    p.add_argument("--warmup", type=_non_negative, default=d.warmup, help="learning-rate warmup steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="clip the global grad norm at this (0: no clipping)")
    p.add_argument("--log-every", type=_positive, default=d.log_every, help="metrics every N steps (and, in a log file, a progress line)")
    p.add_argument("--eval-every", type=_positive, default=d.eval_every, help="also the val loss every N steps")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--init-seed", type=int, default=d.init_seed, help="seed of the model init alone (default: --seed)")
    p.add_argument("--out", default=d.out, help="output directory")
    p.set_defaults(run=_run_train, parser=p)


def _run_train(args: argparse.Namespace) -> None:
    from sharded.train import TrainConfig, check, main

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    try:
        check(cfg)  # a user's mistake is one line, here, before any rank starts
    except ValueError as e:
        args.parser.error(str(e))
    main(cfg)


def _estimate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "estimate",
        help="per-rank memory of a GPT preset under ZeRO",
        description="Per-rank bytes of params, grads and optimizer state under shard_zero(stage) "
        "(the ZeRO paper's formulas, padding included), plus an activation estimate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", default="1.3b")
    p.add_argument("--zero", type=int, default=3, choices=[0, 1, 2, 3], help="ZeRO stage (0: plain data parallel)")
    p.add_argument("--world-size", type=int, default=8, help="ranks on the dp axis")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (each holds 1/tp of the sliced weights)")
    p.add_argument("--optimizer", default="adamw", choices=["sgd", "sgd_momentum", "lion", "adamw"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="param dtype")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per rank per micro-batch (adds activations)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    p.add_argument("--offload", default="none", choices=["none", "cpu", "nvme"], help="offload: the optimizer state in host memory (reported as host bytes) or on disk (disk bytes)")
    p.add_argument("--offload-params", action="store_true", help="with --offload cpu|nvme and --zero 3: the param chunks in host memory or on disk too")
    p.add_argument("--host-buffer-gb", type=float, default=None, help="with --offload nvme: the host staging buffers (default: offload's)")
    p.add_argument("--offload-update", default="host", choices=["host", "device"], help="with --offload cpu --offload-params: the update streamed through the GPU (device) keeps the grads there")
    p.set_defaults(run=_run_estimate, parser=p)


def _run_estimate(args: argparse.Namespace) -> None:
    import torch

    import sharded
    from sharded.models import GPT, GPTConfig

    cfg = GPTConfig.preset(args.preset)
    with torch.device("meta"):
        model = sharded.trace(GPT(cfg))
    try:
        est = sharded.estimate_memory(
            model, stage=args.zero, world_size=args.world_size, optimizer=args.optimizer,
            param_dtype=getattr(torch, args.dtype), batch_size=args.batch_size, seq_len=args.seq_len or cfg.seq_len,
            offload=None if args.offload == "none" else args.offload, offload_params=args.offload_params, host_buffer_gb=args.host_buffer_gb, tp=args.tp,
            offload_update=args.offload_update,
        )
    except ValueError as e:  # a combination the estimate has no formula for: one line, as train's mistakes are
        args.parser.error(str(e))
    tp = f", tensor_parallel over {args.tp}" if args.tp > 1 else ""
    print(f"GPT-{args.preset} ({model.num_params() / 1e9:.2f}B params), shard_zero(stage={args.zero}) on {args.world_size} ranks{tp}, per rank:")
    print(est)


def _plan_parser(sub: argparse._SubParsersAction) -> None:
    from sharded.models import PRESETS

    p = sub.add_parser(
        "plan",
        help="rank the configurations that fit your GPUs by predicted tokens/s",
        description="The configurations of `sharded train` for a GPT preset on your GPUs (dp x pp, ZeRO stage, "
        "micro-batch, remat; bf16 mixed precision, AdamW), ranked by predicted tokens/s with the predicted memory "
        "per rank, and the command line of the best. Predictions stand on one measurement of the model's width on "
        "the machine: run once with --calibrate there (docs: sharded/plan.py).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", default="1.3b", choices=list(PRESETS))
    p.add_argument("--untied", action="store_true", help="the preset with a head of its own")
    p.add_argument("--model", default=None, help="a Hugging Face causal LM's directory (its config.json) instead of --preset")
    p.add_argument("--data", default=None, help="your token or text file (its vocab sizes the model, as in sharded train); default: the embedded corpus")
    p.add_argument("--data-dtype", default="uint16", choices=["uint16", "uint32"])
    p.add_argument("--seq-len", type=_positive, default=None, help="default: the preset's")
    p.add_argument("--gpus", type=_positive, default=None, help="GPUs on this machine (default: all that torch sees)")
    p.add_argument("--gpu-memory", type=_positive_float, default=None, help="GiB per GPU (default: the first GPU's)")
    p.add_argument("--global-batch", type=_positive, default=16, help="sequences per update")
    p.add_argument("--calibration", default="sharded-plan-calibration.json", help="where --calibrate writes what it measures, and plan reads it")
    p.add_argument("--calibrate", action="store_true", help="measure this machine for the model's width first (one GPU, then the bus between them)")
    p.add_argument("--top", type=_positive, default=10, help="configurations to list")
    p.set_defaults(run=_run_plan, parser=p)


def _run_plan(args: argparse.Namespace) -> None:
    import dataclasses
    import json
    from pathlib import Path

    import torch

    from sharded import plan
    from sharded.models import GPTConfig
    from sharded.train import TrainConfig, _data

    try:
        if args.model is not None:
            shape = plan.ModelShape.hugging_face(args.model, args.seq_len)
        else:
            data = _data(TrainConfig(data=args.data, data_dtype=args.data_dtype))
            cfg = GPTConfig.preset(args.preset, vocab_size=data.vocab_size, tied=not args.untied)
            shape = plan.ModelShape.gpt(dataclasses.replace(cfg, seq_len=args.seq_len or cfg.seq_len), args.preset)
    except ValueError as e:
        args.parser.error(str(e))
    gpus = args.gpus or torch.cuda.device_count()
    if gpus < 1:
        args.parser.error("no GPU here: give --gpus and --gpu-memory for the machine you plan for (and a --calibration made there)")
    if args.calibrate:
        if not torch.cuda.is_available():
            args.parser.error("--calibrate measures GPUs, and torch sees none here: run it on the GPU machine")
        cal = plan.calibrate(shape, gpus=gpus)
        cal.save(args.calibration)
        print(f"calibrated on {cal.device} (bus {cal.busbw / 1e9:.0f} GB/s): {args.calibration}")
    path = Path(args.calibration)
    if not path.exists():
        args.parser.error(f"no calibration at {path}: run `sharded plan --calibrate` on the GPU machine first")
    cal = plan.Calibration.load(path)
    if cal.model != json.loads(json.dumps(shape.width)):
        args.parser.error(f"{path} measured another model width; run --calibrate for this one")
    gpu_bytes = (args.gpu_memory * 2**30) if args.gpu_memory else torch.cuda.get_device_properties(0).total_memory
    ranked = plan.rank_configurations(shape, cal, gpus, gpu_bytes, args.global_batch)
    if not ranked:
        args.parser.error(f"nothing fits {gpu_bytes / 2**30:.0f} GiB per GPU with a global batch of {args.global_batch}; use more GPUs or a smaller preset")
    print(f"{args.model or 'GPT-' + args.preset} on {gpus} x {cal.device}, {gpu_bytes / 2**30:.0f} GiB each, global batch {args.global_batch} x {shape.seq_len} tokens:")
    for remat, why in cal.failed.items():
        print(f"note: remat {remat} is not planned: this model failed under it when calibrated ({why})")
    print(f"{'dp':>3} {'pp':>3} {'zero':>4} {'micro':>5} {'accum':>5} {'remat':>9} {'tokens/s':>10} {'GiB/rank':>9}")
    for c in ranked[: args.top]:
        print(f"{c.dp:>3} {c.pp:>3} {c.zero:>4} {c.micro_batch:>5} {c.accumulate:>5} {c.remat:>9} {c.tokens_per_s:>10,.0f} {c.memory_bytes / 2**30:>9.1f}")
    best = ranked[0].command(shape, args.global_batch)
    print("best:", best + (f" --data {args.data} --data-dtype {args.data_dtype}" if args.data else ""))


def build_parser() -> argparse.ArgumentParser:
    """`sharded`'s parser: its subcommands, each with its flags and what it runs."""
    parser = argparse.ArgumentParser(prog="sharded", description="Composable large-model training for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _train_parser(sub)
    _estimate_parser(sub)
    _plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv or ["train"])  # no arguments: the main job's defaults
    args.run(args)
