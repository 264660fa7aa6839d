"""Segment tables: one kernel launch over many tensors, for one or several operands.

[Note: segment table] A launch over k tensors of each of its operands (an optimizer
step's params, grads and states: the i-th tensors of the operands alike in numel; each
operand of one dtype, its tensors anywhere in memory) takes each operand's first
tensor as that operand's base pointer and a (2 + operands, k) int64 table, one column
per tensor:

    row 0       first: the column's first program; the programs count BLOCK-sized
                       blocks of the first tensors, then of the second, and so on
    row 1       numel: the column's number of elements
    row 2 + j   delta: operand j's tensor address minus its first tensor's, in
                       elements (base_j + delta is the tensor)

An operand can also be given as element offsets from a base the kernel gets (copy_in /
copy_out: slots of a flat buffer), or be absent (a row of zeros, never read: see
[Note: optional operands] in _launch.py). Empty tensors get no column.

The table also yields `align`: the largest power of two, up to 16, dividing every
numel, delta and offset. The kernels pass it on as a constexpr hint (`tl.multiple_of`)
on the values they read from the table; without it the compiler must assume any
element offset and any tail, and issues one 4-byte access per element where it could
issue 16-byte ones.

Program `pid` bisects row 0 for its column (ceil(log2 k) loads of a table that stays
in cache), then handles one block of that column's tensors. The table is built on the
host from data pointers and copied to the device without a sync (pinned memory,
non_blocking); the last 1024 tables are kept (a step uses one per launch: a few
hundred for a GPT), keyed by the addresses, sizes and offsets they encode (and the
stream, so that each table is only ever read in the order of the stream it was
copied on): a training step that reuses its buffers does no host work beyond
reading the key.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence, Union

import torch

from sharded.kernels._launch import jit, tl

__all__ = ["Operand", "SegmentTable", "segment_table", "locate", "offsets_in"]

# k tensors (deltas from their addresses), k element offsets (given), or None (absent)
Operand = Union[Sequence[torch.Tensor], Sequence[int], None]


@dataclasses.dataclass(frozen=True)
class SegmentTable:
    bases: tuple  # per operand: its first tensor (the pointer its deltas count from), None if not given as tensors
    table: torch.Tensor  # (2 + operands, count) int64 on the tensors' device
    count: int  # columns: the non-empty tensors
    programs: int  # the launch grid; 0 when every tensor is empty (launch nothing)
    search_steps: int  # ceil(log2(count)): bisection steps to find a program's column
    align: int  # 1..16: a power of two dividing every numel, delta and offset (a hint)


def segment_table(operands: Sequence[Operand], block: int) -> SegmentTable:
    """The table over `operands` (the first given as tensors, all on one device; numels
    from it). See [Note: segment table]."""
    numels = tuple(x.numel() for x in operands[0])
    if 0 in numels:  # no column for an empty tensor: it may have no address at all
        keep = [i for i, n in enumerate(numels) if n]
        operands = [None if op is None else [op[i] for i in keep] for op in operands]
        numels = tuple(numels[i] for i in keep)
    if not numels:
        return SegmentTable((None,) * len(operands), torch.empty(0), 0, 0, 0, 1)
    bases = tuple(op[0] if op is not None and isinstance(op[0], torch.Tensor) else None for op in operands)
    rows = tuple(
        None if op is None else (None, tuple(op)) if base is None else (base.element_size(), tuple(x.data_ptr() for x in op))
        for op, base in zip(operands, bases)
    )
    device = operands[0][0].device
    # per stream: a table is copied in, read and (once evicted) freed in that stream's order
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    table, programs, align = _table(device, stream, block, numels, rows)
    return SegmentTable(bases, table, len(numels), programs, (len(numels) - 1).bit_length(), align)


@functools.lru_cache(maxsize=1024)
def _table(device: torch.device, stream, block: int, numels: tuple, rows: tuple) -> tuple[torch.Tensor, int, int]:
    """The device table for these sizes and (element size, addresses) or (None, offsets)
    rows. It depends on nothing else, so a cached table is right whenever its key matches:
    steps that reuse their buffers (or get the same addresses back from the caching
    allocator) pay no host work and no copy."""
    firsts, programs = [], 0
    for numel in numels:
        firsts.append(programs)
        programs += -(-numel // block)
    table = [firsts, list(numels)]
    for row in rows:
        if row is None:
            table.append([0] * len(numels))
            continue
        size, values = row
        if size is None:
            table.append(list(values))
            continue
        deltas = [divmod(pointer - values[0], size) for pointer in values]
        misaligned = next((rest for _, rest in deltas if rest), 0)
        if misaligned:  # a view reinterpreting bytes at an odd offset; never a normal tensor
            raise ValueError(f"segment_table: a tensor starts {misaligned} bytes off its {size}-byte element grid; pass x.clone()")
        table.append([delta for delta, _ in deltas])
    align = functools.reduce(math.gcd, (v for row in table[1:] for v in row), 16)
    table = torch.tensor(table, dtype=torch.int64)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    return table, programs, align


@jit
def locate(table_ptr, count, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """This program's column, its element offsets in the column's tensors, and their mask.
    SEARCH_STEPS is a compile-time constant (one variant per ceil(log2(count))): some
    Triton interpreters cannot take a runtime scalar as a loop bound."""
    pid = tl.program_id(0)
    lo = pid * 0  # invariant: first[lo] <= pid < first[hi] (first[count] = the grid size)
    hi = lo + count
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        right = tl.load(table_ptr + mid) <= pid
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    offs = (pid - tl.load(table_ptr + lo)) * BLOCK + tl.arange(0, BLOCK)  # int64: tensors may pass 2**31 elements
    return lo, offs, offs < tl.multiple_of(tl.load(table_ptr + count + lo), ALIGN)


@jit
def offsets_in(table_ptr, count, column, offs, OPERAND: tl.constexpr, ALIGN: tl.constexpr):
    """`offs` (from `locate`) as offsets from operand OPERAND's base pointer."""
    return tl.multiple_of(tl.load(table_ptr + (2 + OPERAND) * count + column), ALIGN) + offs
