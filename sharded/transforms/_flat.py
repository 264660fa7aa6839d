"""The padded flat buffers that move groups of chunked leaves in one collective.

Chunks follow [Note: chunk layout] in sharded/sharding.py. Collectives move a *group*
of leaves at once through a padded buffer of N rows of `S = Σ c_i` elements: row r
holds rank r's chunk of every leaf, each padded with zeros to its c_i. An all-gather
of the rows rebuilds every leaf (copy-out); a full leaf written row-wise (copy-in)
reduce-scatters to each rank's chunks.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import torch

from sharded import comm, kernels, primitives
from sharded.sharding import bounds, chunk_size

__all__ = ["FlatGroup", "plan_group", "gather_leaf"]


@dataclasses.dataclass(frozen=True)
class FlatGroup:
    """Leaves that move together: their indices, sizes and slots in a row of S elements."""

    name: str
    leaves: tuple[int, ...]
    numels: tuple[int, ...]
    chunks: tuple[int, ...]
    offsets: tuple[int, ...]
    size: int  # S, one rank's row
    ranks: int
    dtype: torch.dtype
    device: torch.device

    def rows(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.view(self.ranks, self.size)

    @functools.cached_property
    def pieces(self) -> tuple[tuple[tuple[int, int, int], ...], ...]:
        """Per leaf, each rank's piece of it: (position in the N*S buffer, start in the
        flattened leaf, length). Padding lies outside every piece."""
        return tuple(
            tuple((r * self.size + off, r * c, min(c, n - r * c)) for r in range(self.ranks) if r * c < n)
            for n, c, off in zip(self.numels, self.chunks, self.offsets)
        )

    @functools.cached_property
    def padded(self) -> bool:
        """Whether the N*S buffer has padding (which collectives must see as zeros)."""
        return any(c * self.ranks != n for n, c in zip(self.numels, self.chunks))

    def empty(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """An N*S buffer for copy-ins: zeros where it has padding, else uninitialized."""
        make = torch.zeros if self.padded else torch.empty
        return make(self.ranks * self.size, dtype=dtype or self.dtype, device=self.device)

    def _slots(self, wholes: Sequence[torch.Tensor | None]) -> tuple[list[torch.Tensor], list[int]]:
        """Each given leaf's pieces (of its flat `wholes[k]`; None: skip leaf k) and their
        positions in the N*S buffer."""
        views, positions = [], []
        for k, whole in enumerate(wholes):
            if whole is None:
                continue
            for pos, a, n in self.pieces[k]:
                views.append(whole[a : a + n])
                positions.append(pos)
        return views, positions

    def write_all(self, flat: torch.Tensor, srcs: Sequence[torch.Tensor | None], scale: float = 1.0) -> None:
        """Copy-in: each leaf's full value (one per leaf, in order; None leaves that leaf's
        slots as they are) into `flat` (N*S), cast to flat's dtype and times `scale`, in one
        kernel per source dtype."""
        kernels.copy_in(flat, *self._slots([None if x is None else x.reshape(-1) for x in srcs]), scale=scale)

    def read_all(self, flat: torch.Tensor, dsts: Sequence[torch.Tensor]) -> None:
        """Copy-out: every leaf's full value from the gathered `flat` (N*S) into `dsts`
        (one per leaf, in order), cast to their dtype, in one kernel per dtype."""
        kernels.copy_out(flat, *self._slots([x.view(-1) for x in dsts]))

    def write_chunks(self, row: torch.Tensor, chunks: Sequence[torch.Tensor]) -> None:
        """Copy-in: this rank's chunks into its row (S,), zero-padded."""
        if any(x.numel() != c for x, c in zip(chunks, self.chunks)):
            row.zero_()
        kernels.copy_in(row, [x.reshape(-1) for x in chunks], self.offsets)

    def chunk_views(self, row: torch.Tensor, rank: int) -> list[torch.Tensor]:
        """This rank's chunk of every leaf, as views of its row (S,)."""
        out = []
        for k, off in enumerate(self.offsets):
            start, end = bounds(self.numels[k], self.ranks, rank)
            out.append(row[off : off + end - start])
        return out

    def gather(self, chunks: Sequence[torch.Tensor], group: Any, async_op: bool) -> tuple[torch.Tensor, comm.Pending]:
        """Start the all-gather of this rank's chunks; returns (rows buffer, pending).
        Chunks on another tier (offload's host memory) are fetched first, off the
        compute stream: see [Note: gathering from the host]."""
        if all(c.device == self.device for c in chunks) or self.device.type != "cuda":
            out = torch.empty(self.ranks * self.size, dtype=self.dtype, device=self.device)
            # one rank's row is the whole buffer: the gather (a cast or a fetch) copies nothing more
            row = out if self.ranks == 1 else torch.empty(self.size, dtype=self.dtype, device=self.device)
            self.write_chunks(row, chunks)
            return out, comm.all_gather_into_tensor(out, row, group=group, async_op=async_op)
        compute, fetch = torch.cuda.current_stream(self.device), _fetch_stream(self.device)
        fetch.wait_stream(compute)  # buffers the compute stream freed are free on this one too
        with torch.cuda.stream(fetch):
            out, pending = self.gather(primitives.bind("fetch", list(chunks), self.device), group, async_op)
        out.record_stream(compute)  # read there after `pending.wait()`
        return out, pending


# [Note: gathering from the host]
# Under offload(params=True) a group's chunks live in pinned host memory. Their copies
# to the device, the copy-in and the all-gather are queued on one side stream per
# device, after the work the compute stream has queued so far: a prefetch of block u+1
# then moves over PCIe while block u computes, as the all-gather alone would. The
# compute stream meets that work at `pending.wait()`, and the rows buffer is recorded
# on it, so the caching allocator does not hand it to the next fetch while it is read.
@functools.cache
def _fetch_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _fetch(chunks: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The "fetch" primitive: chunks on another tier copied to `device`, on the current stream."""
    return [c.to(device, non_blocking=True) for c in chunks]


primitives.register("fetch", _fetch)


def plan_group(name: str, indices: Sequence[int], leaves: Sequence[torch.Tensor], ranks: int) -> FlatGroup:
    """A FlatGroup over `leaves[i] for i in indices` (one dtype and device)."""
    numels = tuple(leaves[i].numel() for i in indices)
    chunks = tuple(chunk_size(n, ranks) for n in numels)
    offsets, total = [], 0
    for c in chunks:
        offsets.append(total)
        total += c
    first = leaves[indices[0]]
    return FlatGroup(name, tuple(indices), numels, chunks, tuple(offsets), total, ranks, first.dtype, first.device)


def gather_leaf(chunk: torch.Tensor, shape: torch.Size, group: Any, ranks: int) -> torch.Tensor:
    """The full leaf of `shape` from every rank's chunk (one padded all-gather)."""
    numel = torch.Size(shape).numel()
    g = FlatGroup("leaf", (0,), (numel,), (chunk_size(numel, ranks),), (0,), chunk_size(numel, ranks), ranks, chunk.dtype, chunk.device)
    rows, _ = g.gather([chunk], group, async_op=False)
    full = torch.empty(shape, dtype=chunk.dtype, device=chunk.device)
    g.read_all(rows, [full])
    return full
