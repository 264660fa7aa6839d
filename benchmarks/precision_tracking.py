"""Does mixed precision train like fp32? The main job (`sharded train`) on one device,
once per precision, same data, seed and steps; reports each run's validation loss and
its gap to fp32's (issue 4: within 2% after 200 steps), and plots the loss curves.

    python benchmarks/precision_tracking.py --device cuda --out benchmarks/results/precision_tracking_tiny_h200.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
from pathlib import Path

import torch
from _harness import report

from sharded.train import TrainConfig, main as train


def _curve(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def _plot(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, curve in curves.items():
        ax.plot(*zip(*curve), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats / token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--precisions", default="fp32,bf16,fp16")
    ap.add_argument("--out", default=None, help="results JSON; the loss plot goes beside it as .png")
    ap.add_argument("--commit", default=os.environ.get("SHARDED_COMMIT"))
    args = ap.parse_args()
    runs, curves = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions.split(","):
            out = Path(tmp) / precision
            cfg = TrainConfig(preset=args.preset, nproc=1, device=args.device, steps=args.steps, precision=precision, out=str(out))
            summary = train(cfg)
            runs[precision] = {k: summary[k] for k in ("val_loss", "final_train_loss", "tokens_per_s")}
            curves[precision] = _curve(out)
    base = runs["fp32"]["val_loss"]
    for run in runs.values():
        run["val_loss_gap_vs_fp32"] = abs(run["val_loss"] - base) / base
    result = {
        "benchmark": "precision_tracking",
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "commit": args.commit,
        "preset": args.preset,
        "steps": args.steps,
        "criterion": "val loss within 2% of fp32 after the steps",
        "runs": runs,
        "within_2_percent": all(r["val_loss_gap_vs_fp32"] <= 0.02 for r in runs.values()),
    }
    report(result, args.out)
    if args.out:
        _plot(curves, str(Path(args.out).with_suffix(".png")))


if __name__ == "__main__":
    main()
