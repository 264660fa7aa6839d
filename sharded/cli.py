"""The `sharded` command line: `sharded train ...` (also `python -m sharded train`)."""
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
    p.add_argument("--nproc", type=_positive, default=d.nproc, help="local ranks to spawn (ignored under torchrun)")
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", type=_positive, default=d.steps)
    p.add_argument("--batch-size", type=_positive, default=d.batch_size, help="global batch, in sequences")
    p.add_argument("--seq-len", type=_positive, default=d.seq_len, help="default: the preset's")
    p.add_argument("--accumulate", type=_positive, default=d.accumulate, help="micro-batches per update (1: off)")
    p.add_argument("--no-data-parallel", dest="data_parallel", action="store_false", help="drop data_parallel")
    p.add_argument("--zero", type=int, default=d.zero, choices=[0, 1, 2, 3], help="shard_zero stage instead of data_parallel (0: off)")
    p.add_argument("--pp", type=_positive, default=d.pp, help="pipeline stages (1F1B over --accumulate micro-batches; dp = nproc / pp)")
    p.add_argument("--precision", default=d.precision, choices=["fp32", "bf16", "fp16"], help="mixed_precision compute dtype")
    p.add_argument("--remat", default=d.remat, choices=["none", "full", "selective"], help="activation checkpointing per block")
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
    p.add_argument("--optimizer", default="adamw", choices=["sgd", "sgd_momentum", "lion", "adamw"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="param dtype")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per rank per micro-batch (adds activations)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    p.set_defaults(run=_run_estimate)


def _run_estimate(args: argparse.Namespace) -> None:
    import torch

    import sharded
    from sharded.models import GPT, GPTConfig

    cfg = GPTConfig.preset(args.preset)
    with torch.device("meta"):
        model = sharded.trace(GPT(cfg))
    est = sharded.estimate_memory(
        model, stage=args.zero, world_size=args.world_size, optimizer=args.optimizer,
        param_dtype=getattr(torch, args.dtype), batch_size=args.batch_size, seq_len=args.seq_len or cfg.seq_len,
    )
    print(f"GPT-{args.preset} ({model.num_params() / 1e9:.2f}B params), shard_zero(stage={args.zero}) on {args.world_size} ranks, per rank:")
    print(est)


def build_parser() -> argparse.ArgumentParser:
    """`sharded`'s parser: its subcommands, each with its flags and what it runs."""
    parser = argparse.ArgumentParser(prog="sharded", description="Composable large-model training for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _train_parser(sub)
    _estimate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv or ["train"])  # no arguments: the main job's defaults
    args.run(args)
