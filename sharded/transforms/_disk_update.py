"""offload(tier="nvme"): this rank's optimizer moments in a swap file on local disk, and
the update run through two bounded sets of host buffers.

[Note: the disk tier] At init the moments (every optimizer-state tensor that mirrors
the params) are written to a `SwapStore` file under `path` (O_DIRECT where the
filesystem allows), and the state holds them as tensors mapped from that file
(`SwapStore.mapped`): checkpoints, `gather` and a user's reads see their values, and
host memory does not hold them. The counts stay in host memory.

The update cuts the leaves into groups whose moments, grads and params fit half of
`host_buffer_gb`, and runs them through two buffer sets, so the disk and the CPU
work at once:

  set A   read group k's moments from disk | copy its grads and params from the device
          update group k on the host (`optim.InParts` on these copies)
          write its moments back | copy its params back to the device
  set B   meanwhile: group k+1's reads and copies

A set is reused only after its writes and copies back are done. The optimizer runs in
parts (`optim.InParts`), so it must be leafwise, after a head that reads every leaf (a
global-norm clip), which runs first on the device's grads (`optim.leafwise_tail`), as
DeepSpeed clips before its CPUAdam; init refuses any other.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Any, Callable

import torch

from sharded import tree as T
from sharded.optim import InParts, leafwise_tail
from sharded.swap import ALIGN, SwapStore, Transfer, aligned_empty

__all__ = ["DiskTier"]


class DiskTier:
    """This rank's swap files (one per state laid out) and the update through them."""

    def __init__(self, path: str, host_bytes: int, rank: int):
        self.path, self.host_bytes, self.rank = path, host_bytes, rank
        self.slots: dict[int, tuple[SwapStore, str]] = {}  # a mapped tensor's data_ptr -> its store and slot
        self.stores: list[SwapStore] = []
        self.arenas: list[torch.Tensor] = []  # the two buffer sets, made at the first update
        self.last: dict[str, float] = {}  # the last update's swap traffic (offload's metrics)

    def place(self, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write `leaves` ({state path: tensor}) to a new swap file; the tensors mapped
        from it, by the same paths."""
        directory = tempfile.mkdtemp(prefix=f"sharded-offload-rank{self.rank}-", dir=self.path)
        store = SwapStore(directory, {p: (x.numel(), x.dtype) for p, x in leaves.items()}, rank=self.rank)
        for p, x in leaves.items():  # one at a time: host memory holds one leaf's copy, not the state's
            store.write(p, x.detach().to("cpu").contiguous()).wait()
        self.stores.append(store)
        mapped = {p: store.mapped(p).view(x.shape) for p, x in leaves.items()}
        for p, x in mapped.items():
            self.slots[x.data_ptr()] = (store, p)
        return mapped

    def update(self, tx: Any, grads: Any, opt_state: Any, params: Any, threads: Callable) -> tuple[Any, Any]:
        began, before = time.perf_counter(), [store.stats() for store in self.stores]
        head, tail, tail_state, join = leafwise_tail(tx, opt_state)
        grads = head(grads, params)  # a global-norm clip, on the device's grads, before any part
        parts = InParts(tail, tail_state, params)
        moments = parts.mirrored()
        slots = [[self._slot(x) for x in m] for m in moments]
        gs, ps = T.leaves(grads), T.leaves(params)
        groups = self._groups([[m[i] for m in moments] + [gs[i], ps[i]] for i in range(len(ps))])
        writes: list[list[Transfer]] = [[], []]
        stage = lambda k: self._stage(groups[k], k % 2, moments, slots, gs, ps, writes)  # noqa: E731
        staged = stage(0) if groups else None
        for k, group in enumerate(groups):
            following = stage(k + 1) if k + 1 < len(groups) else None
            reads, mine, grads_here, params_here = staged
            for t in reads:
                t.wait()
            _synchronize()  # the grads' and params' copies to the host are done
            with threads():
                new = parts.run(group, grads_here, moments=mine, params=params_here)
            writes[k % 2] = [slot[0].write(slot[1], x) for m, row in zip(new, slots) for x, slot in zip(m, [row[i] for i in group])]
            torch._foreach_copy_([ps[i] for i in group], params_here, non_blocking=True)
            staged = following
        for t in writes[0] + writes[1]:
            t.wait()
        _synchronize()
        moved = [store.stats() - b for store, b in zip(self.stores, before)]
        seconds = time.perf_counter() - began
        read, written = sum(m.read.bytes for m in moved), sum(m.write.bytes for m in moved)
        self.last = {"swap_read_gb": read / 1e9, "swap_write_gb": written / 1e9, "swap_gbps": (read + written) / 1e9 / seconds, "update_s": seconds}
        params, new_tail = parts.finish()
        return params, join(new_tail)

    def _slot(self, x: torch.Tensor) -> tuple[SwapStore, str]:
        found = self.slots.get(x.data_ptr())
        if found is None:
            raise ValueError(
                "offload(tier='nvme'): this state's optimizer moments are not in any of its swap files; "
                "pass the state this step's init (or checkpoint.load into it) made"
            )
        return found

    def _groups(self, per_leaf: list[list[torch.Tensor]]) -> list[list[int]]:
        """Leaves in order, cut into groups whose buffers fit one set (half the budget)."""
        budget, groups, used = self.host_bytes // 2, [], 0
        for i, tensors in enumerate(per_leaf):
            need = sum(_aligned(x) for x in tensors)
            if need > budget:
                raise ValueError(
                    f"offload(tier='nvme'): one leaf's moments, grad and param need {need / 2**20:.2f} MiB of host buffer, "
                    f"more than half of host_buffer_gb ({budget / 2**20:.2f} MiB); raise host_buffer_gb to at least {2 * need / 2**30:.6f}"
                )
            if not groups or used + need > budget:
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += need
        return groups

    def _stage(self, group: list[int], s: int, moments: list, slots: list, gs: list, ps: list, writes: list) -> tuple:
        """Set s's buffers for `group`, once its last writes are done: the moments' reads
        started, the grads' and params' copies from the device queued."""
        for t in writes[s]:
            t.wait()
        writes[s] = []
        _synchronize()  # its params' copies back to the device are done
        carve = self._carver(s)
        mine = [[carve(m[i]) for i in group] for m in moments]
        reads = [row[i][0].read(row[i][1], buf) for row, bufs in zip(slots, mine) for i, buf in zip(group, bufs)]
        grads_here = [carve(gs[i]) for i in group]
        params_here = [carve(ps[i]) for i in group]
        torch._foreach_copy_(grads_here + params_here, [gs[i] for i in group] + [ps[i] for i in group], non_blocking=True)
        return reads, mine, grads_here, params_here

    def _carver(self, s: int) -> Callable:
        """Hands out ALIGN-aligned views of set s's arena, like a given tensor or slot."""
        if not self.arenas:
            self.arenas = [aligned_empty(self.host_bytes // 2) for _ in range(2)]
        arena, at = self.arenas[s], [0]

        def carve(like: torch.Tensor) -> torch.Tensor:
            view = arena[at[0] : at[0] + like.numel() * like.element_size()].view(like.dtype).view(like.shape)
            at[0] += _aligned(like)
            return view

        return carve

    def close(self) -> None:
        for store in self.stores:
            store.close()
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(store.file))


def _aligned(x: torch.Tensor) -> int:
    n = x.numel() * x.element_size()
    return -(-n // ALIGN) * ALIGN


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()
