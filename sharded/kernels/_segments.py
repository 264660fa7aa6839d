"""Segment tables: one kernel launch over many tensors of one dtype.

[Note: segment table] A launch over tensors x_0 .. x_{k-1} (one dtype, anywhere in
memory) takes x_0 as its base pointer and a (4, k) int64 table, one column per tensor:

    row 0  delta: x_i's address minus x_0's, in elements (base + delta is x_i)
    row 1  slot:  x_i's element offset in the flat buffer (copy_in / copy_out)
    row 2  numel: x_i's number of elements
    row 3  first: x_i's first program; the programs count BLOCK-sized blocks of x_0,
                  then of x_1, and so on

Program `pid` bisects row 3 for its tensor (ceil(log2 k) loads of a table that stays
in cache), then handles one block of it. The table is built on the host from data
pointers and copied to the device without a sync (pinned memory, non_blocking); the
last 64 tables are kept, keyed by the addresses, sizes and slots they encode (and the
stream, so that each table is only ever read in the order of the stream it was copied on).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import torch

from sharded.kernels._launch import jit, tl

__all__ = ["SegmentTable", "segment_table", "locate"]


@dataclasses.dataclass(frozen=True)
class SegmentTable:
    base: torch.Tensor  # x_0: the pointer the deltas count from
    table: torch.Tensor  # (4, count) int64 on base's device
    count: int
    programs: int  # the launch grid
    search_steps: int  # ceil(log2(count)): bisection steps to find a program's tensor


def segment_table(tensors: Sequence[torch.Tensor], slots: Sequence[int], block: int) -> SegmentTable:
    """The table for `tensors` (one dtype and device, none empty) at `slots` of a flat buffer."""
    base = tensors[0]
    size = base.element_size()
    pointers = tuple(x.data_ptr() for x in tensors)
    # per stream: a table is copied in, read and (once evicted) freed in that stream's order
    stream = torch.cuda.current_stream(base.device).cuda_stream if base.device.type == "cuda" else None
    table, programs = _table(base.device, stream, size, block, pointers, tuple(x.numel() for x in tensors), tuple(slots))
    return SegmentTable(base, table, len(tensors), programs, (len(tensors) - 1).bit_length())


@functools.lru_cache(maxsize=64)
def _table(device: torch.device, stream, size: int, block: int, pointers: tuple, numels: tuple, slots: tuple) -> tuple[torch.Tensor, int]:
    """The device table for these addresses and sizes. It depends on nothing else, so a
    cached table is right whenever its key matches: steps that reuse their buffers (or get
    the same addresses back from the caching allocator) pay no host work and no copy."""
    rows: list[list[int]] = [[], [], [], []]
    programs = 0
    for pointer, numel, slot in zip(pointers, numels, slots):
        delta, misaligned = divmod(pointer - pointers[0], size)
        if misaligned:  # a view reinterpreting bytes at an odd offset; never a normal tensor
            raise ValueError(f"segment_table: a tensor starts {misaligned} bytes off its {size}-byte element grid; pass x.clone()")
        for row, value in zip(rows, (delta, slot, numel, programs)):
            row.append(value)
        programs += -(-numel // block)
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    return table, programs


@jit
def locate(table_ptr, count, search_steps, BLOCK: tl.constexpr):
    """This program's tensor (delta, slot) and its element offsets in it, with their mask."""
    pid = tl.program_id(0)
    first_ptr = table_ptr + 3 * count
    lo = pid * 0  # invariant: first[lo] <= pid < first[hi] (first[count] = the grid size)
    hi = lo + count
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        right = tl.load(first_ptr + mid) <= pid
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    delta = tl.load(table_ptr + lo)
    slot = tl.load(table_ptr + count + lo)
    numel = tl.load(table_ptr + 2 * count + lo)
    offs = (pid - tl.load(first_ptr + lo)) * BLOCK + tl.arange(0, BLOCK)
    return delta, slot, offs, offs < numel
