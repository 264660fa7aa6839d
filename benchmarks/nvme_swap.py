"""offload(tier="nvme") on one GPU: the disk's own O_DIRECT bandwidth first, then a GPT
trained a few steps with its optimizer moments in swap files, staged through
`--host-buffer-gb` of host memory; per step: time, bytes read and written, and the
swap's bandwidth against the disk's.

    python benchmarks/nvme_swap.py --path /local_nvme --preset 1.3b --steps 3 --out benchmarks/results/nvme_swap_1.3b.json
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import time

import torch
from _harness import provenance, report

import sharded
from sharded.models import GPT, GPTConfig, loss_fn
from sharded.swap import disk_bandwidth


def dd_bandwidth(path: str, gb: float) -> dict:
    """The disk's O_DIRECT write and read rates as `dd` reports them (GB/s), the
    reference the swap's rates are held to."""
    target = os.path.join(path, "dd-probe")
    count = max(1, int(gb * 16))  # 64 MiB blocks
    try:
        rates = {}
        for kind, cmd in (("write_gbps", ["dd", "if=/dev/zero", f"of={target}", "bs=64M", f"count={count}", "oflag=direct"]),
                          ("read_gbps", ["dd", f"if={target}", "of=/dev/null", "bs=64M", "iflag=direct"])):
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
            seconds, nbytes = float(re.search(r"copied, ([\d.]+) s", out).group(1)), int(out.split(" bytes")[0].split()[-1])
            rates[kind] = nbytes / seconds / 1e9
        return rates
    finally:
        if os.path.exists(target):
            os.remove(target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", required=True, help="a directory on the disk to measure and swap to")
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--host-buffer-gb", type=float, default=2.0)
    ap.add_argument("--probe-gb", type=float, default=4.0, help="bytes the bandwidth probe writes and reads")
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default=None)
    args = ap.parse_args()
    dd = dd_bandwidth(args.path, args.probe_gb)
    disk = disk_bandwidth(args.path, nbytes=int(args.probe_gb * 2**30))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = GPTConfig.preset(args.preset, seq_len=args.seq)
    model = sharded.trace(GPT(cfg).to(dev))

    def train_step(state, batch):
        value, grads = sharded.value_and_grad(lambda p, b: loss_fn(model.apply(p, b[0]), b[1]))(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    step = sharded.offload("nvme", path=args.path, host_buffer_gb=args.host_buffer_gb)(sharded.mixed_precision("bf16", autocast=False)(train_step))
    began = time.perf_counter()
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-4, weight_decay=0.1), opt_device="cpu"))
    init_s = time.perf_counter() - began
    (offload,) = [t for t in step.transforms if t.name == "offload"]
    (store,) = offload._disk.stores
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(dev)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(dev)
    steps = []
    for _ in range(args.steps):
        before, began = store.stats(), time.perf_counter()
        state, metrics = step(state, (x, y))
        loss = float(metrics["loss"])
        seconds, moved = time.perf_counter() - began, store.stats() - before
        steps.append({"step_s": seconds, "loss": loss, "read_gb": moved.read.bytes / 1e9, "write_gb": moved.write.bytes / 1e9,
                      "read_gbps_while_reading": moved.read.gbps, "write_gbps_while_writing": moved.write.gbps,
                      "swap_gbps_over_step": (moved.read.bytes + moved.write.bytes) / 1e9 / seconds,
                      "read_vs_dd": moved.read.gbps / dd["read_gbps"], "write_vs_dd": moved.write.gbps / dd["write_gbps"]})
        print(steps[-1])
    result = {
        **provenance("nvme_swap", torch.cuda.get_device_name(0) if dev.type == "cuda" else "CPU", args.commit),
        "model": f"GPT-{args.preset} ({model.num_params() / 1e9:.2f}B params), seq {args.seq}, {args.batch} sequences, bf16 (autocast=False), AdamW",
        "disk": {"path": args.path, "mode": disk.mode.value, "write_gbps": disk.write_gbps, "read_gbps": disk.read_gbps, "dd": dd},
        "store": {"file_gb": store.size / 1e9, "mode": store.mode.value, "host_buffer_gb": args.host_buffer_gb},
        "init_s": init_s,
        "steps": steps,
    }
    report(result, args.out)


if __name__ == "__main__":
    main()
