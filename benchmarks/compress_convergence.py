"""1-bit Adam against plain AdamW: `sharded train` on the tiny GPT and the embedded
corpus, 2 ranks, the same seeds, data and schedule; 1-bit Adam compresses after a
warmup of 15% of the steps. Reports each run's final val loss, the mean over seeds and
the relative gap, and plots both sets of train-loss curves.

    python benchmarks/compress_convergence.py --steps 600 --seeds 0 1 2 \\
        --out benchmarks/results/compress_convergence_tiny_cpu.json

Acceptance (issue 15): the mean final val loss of 1-bit Adam within 2% of AdamW's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

from _harness import provenance

from sharded.train import TrainConfig, main as train


def run(compress: str, seed: int, args: argparse.Namespace, root: Path) -> dict:
    out = root / f"{compress}_{seed}"
    cfg = TrainConfig(
        preset="tiny", nproc=args.nproc, device=args.device, steps=args.steps, seed=seed, compress=compress,
        compress_warmup=args.warmup, log_every=args.log_every, out=str(out),
    )
    summary = train(cfg)
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"val_loss": summary["val_loss"], "steps": [r["step"] for r in curve], "loss": [r["loss"] for r in curve]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--warmup", type=float, default=0.15, help="fraction of the steps before compressing")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default=os.environ.get("SHARDED_COMMIT"))
    args = ap.parse_args()
    runs: dict[str, dict[int, dict]] = {"adamw": {}, "onebit": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:  # alternating systems, seed by seed
            for system in runs:
                runs[system][seed] = run("none" if system == "adamw" else "onebit", seed, args, Path(tmp))
    mean = {s: statistics.mean(r["val_loss"] for r in runs[s].values()) for s in runs}
    gap = mean["onebit"] / mean["adamw"] - 1
    result = {
        **provenance("compress_convergence", f"{args.nproc} {args.device} ranks ({platform.machine()})", args.commit),
        "model": "tiny GPT, embedded corpus, sharded train defaults (lr 3e-3 warmup-cosine, clip 1.0, wd 0.1)",
        "steps": args.steps,
        "compress_warmup_steps": max(1, round(args.warmup * args.steps)),
        "seeds": args.seeds,
        "val_loss": {s: {seed: r["val_loss"] for seed, r in runs[s].items()} for s in runs},
        "mean_val_loss": mean,
        "relative_gap": gap,
        "within_2pct": abs(gap) <= 0.02,
        "curves": runs,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "curves"}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        plot(result, Path(args.out).with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for system, color in (("adamw", "C0"), ("onebit", "C3")):
        for i, (seed, r) in enumerate(result["curves"][system].items()):
            ax.plot(r["steps"], r["loss"], color=color, alpha=0.7, lw=1, label=f"{system} (val {result['mean_val_loss'][system]:.3f}, mean)" if i == 0 else None)
    ax.axvline(result["compress_warmup_steps"], ls="--", c="gray", label="1-bit Adam starts compressing")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/char)")
    ax.set_title(f"1-bit Adam vs AdamW, tiny GPT, 2 ranks, seeds {result['seeds']}: gap {100 * result['relative_gap']:+.2f}%")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
