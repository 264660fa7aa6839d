"""offload(tier="nvme"): this rank's optimizer moments in a swap file on local disk, and
the update run through two bounded sets of host buffers.

[Note: the disk tier] At init the moments (every optimizer-state tensor that mirrors
the params) are written to a `SwapStore` file under `path` (O_DIRECT where the
filesystem allows), and the state holds them as tensors mapped from that file
(`SwapStore.mapped`): checkpoints, `gather` and a user's reads see their values, and
host memory does not hold them. The counts stay in host memory.

Each moment is stored as pieces (one slot each, adjacent in the file, so one mapping
covers the leaf) of at most an eighth of a buffer set, cut at the same elements for
every moment. The update runs over units, a whole leaf or one piece of it with its
grads and params cut alike (`InParts`' spans), and cuts them into groups that fit half
of `host_buffer_gb`, so a leaf larger than the buffers (a 50k x 4096 embedding's four
tensors take 3.1 GiB) still goes through them. It runs the groups through two buffer
sets, so the disk and the CPU work at once:

  set A   read group k's moments from disk | copy its grads and params from the device
          update group k on the host (`optim.InParts` on these copies)
          write its moments back | copy its params back to the device
  set B   meanwhile: group k+1's reads and copies

Under params=True the param chunks are in the file too, cut like the moments: a unit's
param piece is read from disk and written back like its moments, not copied from and to
the device.

A set is reused only after its writes and copies back are done. The optimizer runs in
parts (`optim.InParts`), so it must be leafwise, after a head that reads every leaf (a
global-norm clip), which runs first on the device's grads (`optim.leafwise_tail`), as
DeepSpeed clips before its CPUAdam; init refuses any other.
"""
from __future__ import annotations

import dataclasses
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
        self.slots: dict[int, tuple[SwapStore, list[str], int]] = {}  # a mapped tensor's data_ptr -> its store, its pieces' slots, their numel
        self.stores: list[SwapStore] = []
        self.arenas: list[torch.Tensor] = []  # the two buffer sets, made at the first update
        self.last: dict[str, float] = {}  # the last update's swap traffic (offload's metrics)

    def place(self, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write `leaves` ({state path: tensor}) to a new swap file, each as pieces; the
        tensors mapped from it, by the same paths."""
        directory = tempfile.mkdtemp(prefix=f"sharded-offload-rank{self.rank}-", dir=self.path)
        piece = self._piece_numel(list(leaves.values()))
        pieces = {p: [(f"{p}@{a}", a, min(a + piece, x.numel())) for a in range(0, max(x.numel(), 1), piece)] for p, x in leaves.items()}
        store = SwapStore(directory, {name: (b - a, x.dtype) for p, x in leaves.items() for name, a, b in pieces[p]}, rank=self.rank, owns_directory=True)
        for p, x in leaves.items():  # one at a time: host memory holds one leaf's copy, not the state's
            flat = x.detach().to("cpu").contiguous().view(-1)
            for t in [store.write(name, flat[a:b]) for name, a, b in pieces[p]]:
                t.wait()
        self.stores.append(store)
        mapped = {p: store.mapped(*[name for name, _, _ in pieces[p]]).view(x.shape) for p, x in leaves.items()}
        for p, x in mapped.items():
            self.slots[x.data_ptr()] = (store, [name for name, _, _ in pieces[p]], piece)
        return mapped

    def _piece_numel(self, leaves: list[torch.Tensor]) -> int:
        """Elements per stored piece: an eighth of a buffer set for the widest moment,
        and a whole number of ALIGN bytes for the narrowest (O_DIRECT offsets)."""
        widest = max((x.element_size() for x in leaves), default=1)
        step = ALIGN // min((x.element_size() for x in leaves), default=1)
        return max(step, (self.host_bytes // 2 // 8 // widest) // step * step)

    def update(self, tx: Any, grads: Any, opt_state: Any, params: Any, threads: Callable, params_stored: bool = False) -> tuple[Any, Any]:
        """The update through the buffers; `params_stored`: the params are in the swap
        file too (offload(params=True)), else on the device."""
        began, before = time.perf_counter(), [store.stats() for store in self.stores]
        head, tail, tail_state, join = leafwise_tail(tx, opt_state)
        grads = head(grads, params)  # a global-norm clip, on the device's grads, before any part
        parts = InParts(tail, tail_state, params)
        moments = parts.mirrored()
        gs, ps = T.leaves(grads), T.leaves(params)
        units = self._units(moments, ps, params_stored)
        groups = self._groups(units, moments, gs, ps)
        writes: list[list[Transfer]] = [[], []]
        stage = lambda k: self._stage(groups[k], k % 2, moments, gs, ps, writes)  # noqa: E731
        staged = stage(0) if groups else None
        for k, group in enumerate(groups):
            following = stage(k + 1) if k + 1 < len(groups) else None
            reads, mine, grads_here, params_here = staged
            for t in reads:
                t.wait()
            _synchronize()  # the grads' and params' copies to the host are done
            with threads():
                new = parts.run([u.leaf for u in group], grads_here, moments=mine, params=params_here, spans=[(u.start, u.stop) for u in group])
            writes[k % 2] = [store.write(name, x) for j, m in enumerate(new) for u, x in zip(group, m) for store, name in [u.slots[j]]]
            writes[k % 2] += [u.param[0].write(u.param[1], x) for u, x in zip(group, params_here) if u.param is not None]
            back = [(_flat(ps[u.leaf], u), x) for u, x in zip(group, params_here) if u.param is None]
            if back:
                torch._foreach_copy_([d for d, _ in back], [x for _, x in back], non_blocking=True)
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

    def _units(self, moments: list[list[torch.Tensor]], ps: list[torch.Tensor], params_stored: bool) -> list[_Unit]:
        """Each leaf's pieces as stored (the whole leaf where nothing of it is), with
        every moment's slot for each, and the param's where the params are stored too."""
        units = []
        for i, p in enumerate(ps):
            found = [self._slot(m[i]) for m in moments]
            stored = self._slot(p) if params_stored and p.is_floating_point() and p.numel() and p.dim() else None
            if not found and stored is None:
                units.append(_Unit(i, 0, p.numel(), [], None))
                continue
            store, names, piece = (found or [stored])[0]
            if any(len(f[1]) != len(names) or f[2] != piece for f in found + ([stored] if stored else [])):
                raise ValueError("offload(tier='nvme'): a leaf's moments and param are stored in pieces that do not match; pass the state this step's init made")
            for k in range(len(names)):
                param = (stored[0], stored[1][k]) if stored else None
                units.append(_Unit(i, k * piece, min((k + 1) * piece, p.numel()), [(f[0], f[1][k]) for f in found], param))
        return units

    def _slot(self, x: torch.Tensor) -> tuple[SwapStore, list[str], int]:
        found = self.slots.get(x.data_ptr())
        if found is None:
            raise ValueError(
                "offload(tier='nvme'): this state's optimizer moments (and param chunks, with params=True) are not in any of its swap files; "
                "pass the state this step's init (or checkpoint.load into it) made"
            )
        return found

    def _groups(self, units: list[_Unit], moments: list, gs: list, ps: list) -> list[list[_Unit]]:
        """Units in order, cut into groups whose buffers fit one set (half the budget)."""
        budget, groups, used = self.host_bytes // 2, [], 0
        for u in units:
            need = sum(_aligned((u.stop - u.start) * x[u.leaf].element_size()) for x in [*moments, gs, ps])
            if need > budget:
                raise ValueError(
                    f"offload(tier='nvme'): one piece's moments, grad and param need {need / 2**20:.2f} MiB of host buffer, "
                    f"more than half of host_buffer_gb ({budget / 2**20:.2f} MiB); raise host_buffer_gb to at least {2 * need / 2**30:.6f}"
                )
            if not groups or used + need > budget:
                groups.append([])
                used = 0
            groups[-1].append(u)
            used += need
        return groups

    def _stage(self, group: list[_Unit], s: int, moments: list, gs: list, ps: list, writes: list) -> tuple:
        """Set s's buffers for `group`, once its last writes are done: the moments' reads
        started, the grads' and params' copies from the device queued."""
        for t in writes[s]:
            t.wait()
        writes[s] = []
        _synchronize()  # its params' copies back to the device are done
        carve = self._carver(s)
        mine = [[carve(u.stop - u.start, m[u.leaf].dtype) for u in group] for m in moments]
        reads = [store.read(name, buf) for j, bufs in enumerate(mine) for u, buf in zip(group, bufs) for store, name in [u.slots[j]]]
        grads_here = [carve(u.stop - u.start, gs[u.leaf].dtype) for u in group]
        params_here = [carve(u.stop - u.start, ps[u.leaf].dtype) for u in group]
        reads += [u.param[0].read(u.param[1], x) for u, x in zip(group, params_here) if u.param is not None]
        copies = [(x, gs[u.leaf].reshape(-1)[u.start : u.stop]) for u, x in zip(group, grads_here)]
        copies += [(x, _flat(ps[u.leaf], u)) for u, x in zip(group, params_here) if u.param is None]
        torch._foreach_copy_([x for x, _ in copies], [y for _, y in copies], non_blocking=True)
        return reads, mine, grads_here, params_here

    def _carver(self, s: int) -> Callable:
        """Hands out ALIGN-aligned flat views of set s's arena, of a numel and dtype."""
        if not self.arenas:
            self.arenas = [aligned_empty(self.host_bytes // 2) for _ in range(2)]
        arena, at = self.arenas[s], [0]

        def carve(numel: int, dtype: torch.dtype) -> torch.Tensor:
            nbytes = numel * dtype.itemsize
            view = arena[at[0] : at[0] + nbytes].view(dtype)
            at[0] += _aligned(nbytes)
            return view

        return carve


@dataclasses.dataclass(frozen=True)
class _Unit:
    """What one part of the update takes: leaf `leaf`'s flat elements [start, stop),
    each moment's (store, slot) holding them, and the param's where it is stored too."""

    leaf: int
    start: int
    stop: int
    slots: list[tuple[SwapStore, str]]
    param: tuple[SwapStore, str] | None


def _flat(x: torch.Tensor, u: _Unit) -> torch.Tensor:
    """Unit u's elements of param x, a flat view (the update's copy goes back through it)."""
    return x.view(-1)[u.start : u.stop]


def _aligned(nbytes: int) -> int:
    """`nbytes` rounded up to a whole number of ALIGN (what O_DIRECT transfers need)."""
    return -(-nbytes // ALIGN) * ALIGN


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()
