"""The padded flat buffers that move groups of chunked leaves in one collective.

Chunks follow [Note: chunk layout] in sharded/sharding.py. Collectives move a *group*
of leaves at once through a padded buffer of N rows of `S = Σ c_i` elements: row r
holds rank r's chunk of every leaf, each padded with zeros to its c_i. An all-gather
of the rows rebuilds every leaf (copy-out); a full leaf written row-wise (copy-in)
reduce-scatters to each rank's chunks.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from sharded import comm
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

    def write_full(self, k: int, rows: torch.Tensor, src: torch.Tensor, scale: float = 1.0) -> None:
        """Copy-in: leaf k's full value into its column block of `rows` (N, S), zero-padded,
        with `scale` fused into the copy."""
        n, c, off = self.numels[k], self.chunks[k], self.offsets[k]
        if c == 0:
            return
        dst, flat = rows[:, off : off + c], src.reshape(-1)
        whole = n // c
        if whole:
            torch.mul(flat[: whole * c].view(whole, c), scale, out=dst[:whole])
        if whole < self.ranks:
            rest = n - whole * c
            torch.mul(flat[whole * c :], scale, out=dst[whole, :rest])
            dst[whole, rest:].zero_()
            dst[whole + 1 :].zero_()

    def read_full(self, k: int, rows: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy-out: leaf k's full value from the gathered rows (N, S) into `dst`."""
        n, c, off = self.numels[k], self.chunks[k], self.offsets[k]
        if c == 0:
            return
        src, flat = rows[:, off : off + c], dst.view(-1)
        whole = n // c
        if whole:
            flat[: whole * c].view(whole, c).copy_(src[:whole])
        if whole < self.ranks:
            flat[whole * c :].copy_(src[whole, : n - whole * c])

    def write_chunks(self, row: torch.Tensor, chunks: Sequence[torch.Tensor]) -> None:
        """Copy-in: this rank's chunks into its row (S,), zero-padded."""
        for k, x in enumerate(chunks):
            off, c = self.offsets[k], self.chunks[k]
            row[off : off + x.numel()].copy_(x.reshape(-1))
            row[off + x.numel() : off + c].zero_()

    def chunk_views(self, row: torch.Tensor, rank: int) -> list[torch.Tensor]:
        """This rank's chunk of every leaf, as views of its row (S,)."""
        out = []
        for k, off in enumerate(self.offsets):
            start, end = bounds(self.numels[k], self.ranks, rank)
            out.append(row[off : off + end - start])
        return out

    def gather(self, chunks: Sequence[torch.Tensor], group: Any, async_op: bool) -> tuple[torch.Tensor, comm.Pending]:
        """Start the all-gather of this rank's chunks; returns (rows buffer, pending)."""
        row = torch.empty(self.size, dtype=self.dtype, device=self.device)
        self.write_chunks(row, chunks)
        out = torch.empty(self.ranks * self.size, dtype=self.dtype, device=self.device)
        return out, comm.all_gather_into_tensor(out, row, group=group, async_op=async_op)


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
    g.read_full(0, g.rows(rows), full)
    return full
