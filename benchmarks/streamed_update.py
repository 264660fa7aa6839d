"""Where an offloaded AdamW update is fastest: on the host (the grads cross to it, torch's
fused CPU AdamW runs there, as offload runs it), or on the GPU with the state streamed
through it (params and moments cross to the GPU part by part, torch's fused CUDA AdamW
runs there, and they cross back), every rank of the host at once. Also the raw PCIe
rates, each way and both ways at once, the same ranks at once.

    python benchmarks/streamed_update.py --ranks 2 --params 0.71e9 --parts 28 --out benchmarks/results/streamed_update.json
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics

import torch
import _host_ranks as host_ranks
from _harness import provenance, report

LR, WD = 1e-4, 0.1
MODES = ("pcie_h2d", "pcie_d2h", "pcie_both", "host", "streamed", "streamed_moments_only")


def _adamw(p, g, m, v, count) -> None:
    torch._fused_adamw_(p, g, m, v, [], [count] * len(p), lr=LR, beta1=0.9, beta2=0.999, weight_decay=WD, eps=1e-8, amsgrad=False, maximize=False)


class Rank:
    """One rank's state: per part a pinned host param and moments, a device grad; device
    buffers for three parts in flight."""

    def __init__(self, rank: int, params: int, parts: int, ranks: int):
        self.dev = torch.device("cuda", rank)
        torch.cuda.set_device(self.dev)
        n = params // parts
        self.state = [[torch.empty(n, pin_memory=True).normal_() for _ in range(3)] for _ in range(parts)]  # p, m, v
        for _, m, v in self.state:
            m.zero_(), v.abs_()
        self.host_grads = [torch.empty(n, pin_memory=True) for _ in range(parts)]
        self.grads = [torch.randn(n, device=self.dev) for _ in range(parts)]
        self.ring = [[torch.empty(n, device=self.dev) for _ in range(3)] for _ in range(3)]
        self.big_host = torch.empty(params, pin_memory=True)
        self.big_dev = torch.empty(params, device=self.dev)
        self.big_host2 = torch.empty(params, pin_memory=True)
        self.big_dev2 = torch.empty(params, device=self.dev)
        self.up, self.down = torch.cuda.Stream(), torch.cuda.Stream()
        self.count = torch.tensor(1.0)
        self.dev_count = torch.tensor(1.0, device=self.dev)
        self.threads = max(1, len(os.sched_getaffinity(0)) // ranks - 1)
        self.worker = concurrent.futures.ThreadPoolExecutor(1)

    def run(self, mode: str) -> None:
        getattr(self, mode)()
        torch.cuda.synchronize()

    def pcie_h2d(self) -> None:
        self.big_dev.copy_(self.big_host, non_blocking=True)

    def pcie_d2h(self) -> None:
        self.big_host.copy_(self.big_dev, non_blocking=True)

    def pcie_both(self) -> None:
        with torch.cuda.stream(self.up):
            self.big_dev2.copy_(self.big_host2, non_blocking=True)
        with torch.cuda.stream(self.down):
            self.big_host.copy_(self.big_dev, non_blocking=True)
        torch.cuda.current_stream().wait_stream(self.up)
        torch.cuda.current_stream().wait_stream(self.down)

    def host(self) -> None:
        """Grads down part by part on one stream; the worker updates each part on the
        host as its copy lands (offload's update in parts)."""
        futures = []
        for g, hg, (p, m, v) in zip(self.grads, self.host_grads, self.state):
            with torch.cuda.stream(self.down):
                hg.copy_(g, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self.down)
            futures.append(self.worker.submit(self._host_part, ready, p, hg, m, v))
        for f in futures:
            f.result()

    def _host_part(self, ready, p, g, m, v) -> None:
        ready.synchronize()
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            _adamw([p], [g], [m], [v], self.count)
        finally:
            torch.set_num_threads(before)

    def streamed(self, moments_only: bool = False) -> None:
        """Each part's param and moments up, the fused CUDA AdamW, and back down, three
        parts in flight (up, update, down on their own streams)."""
        compute = torch.cuda.current_stream()
        freed = [None] * len(self.ring)
        for k, (g, host) in enumerate(zip(self.grads, self.state)):
            buf = self.ring[k % len(self.ring)]
            with torch.cuda.stream(self.up):
                if freed[k % len(self.ring)] is not None:
                    self.up.wait_event(freed[k % len(self.ring)])
                for d, h in zip(buf[1:] if moments_only else buf, host[1:] if moments_only else host):
                    d.copy_(h, non_blocking=True)
            compute.wait_stream(self.up)
            _adamw([buf[0]], [g], [buf[1]], [buf[2]], self.dev_count)
            self.down.wait_stream(compute)
            with torch.cuda.stream(self.down):
                for h, d in zip(host, buf):
                    h.copy_(d, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.down)
            freed[k % len(self.ring)] = done
        compute.wait_stream(self.down)

    def streamed_moments_only(self) -> None:
        """As `streamed`, the param already on the GPU (ZeRO-3 fetched it for backward)."""
        self.streamed(moments_only=True)


def _rank(rank: int, args, barrier, results) -> None:
    r = Rank(rank, int(args.params), args.parts, args.ranks)
    times = host_ranks.in_turns(r.run, MODES, args.repeats, barrier)
    r.worker.shutdown()
    results[rank] = {"threads": r.threads, **times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    host_ranks.add_args(ap, params=0.71e9, parts=28)
    args = ap.parse_args()
    results = host_ranks.spawn(_rank, args)
    slowest = {m: [max(results[r][m][i] for r in range(args.ranks)) for i in range(args.repeats)] for m in MODES}
    bytes_moved = {"pcie_h2d": 4, "pcie_d2h": 4, "pcie_both": 8}
    result = {
        **provenance("streamed_update", f"host of {len(os.sched_getaffinity(0))} cores, {args.ranks} GPU(s)", args.commit),
        "ranks": args.ranks, "params_per_rank": int(args.params), "parts": args.parts, "host_threads_per_rank": results[0]["threads"],
        "seconds_slowest_rank": {m: {"min": min(t), "median": statistics.median(t), "max": max(t)} for m, t in slowest.items()},
        "gb_per_s_per_rank": {m: args.params * b / statistics.median(slowest[m]) / 1e9 for m, b in bytes_moved.items()},
        "gparams_per_s_per_rank": {m: args.params / statistics.median(slowest[m]) / 1e9 for m in MODES if m.startswith(("host", "streamed"))},
    }
    report(result, args.out)


if __name__ == "__main__":
    main()
