"""Copy-in / copy-out between tensors and slots of one flat buffer, with the dtype cast
(and, for copy-in, a scale such as 1/world for a gradient mean) fused into the copy:
one launch per source (or destination) dtype instead of a cast, a mul and a copy per
tensor.

    copy_in(flat, srcs, offsets, scale):   flat[o_i : o_i + n_i] = (srcs[i].view(-1) * scale).to(flat.dtype)
    copy_out(flat, dsts, offsets):         dsts[i].view(-1)[:] = flat[o_i : o_i + n_i].to(dsts[i].dtype)

with n_i = numel of the i-th tensor, values passing through float32 (fp32, bf16 and
fp16 only). Elements of `flat` outside every slot (padding) are left as they are.
Each launch walks a segment table ([Note: segment table] in _segments.py).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from sharded.kernels._launch import BLOCK, jit, tl
from sharded.kernels._segments import locate, offsets_in, segment_table

__all__ = ["copy_in_kernel", "copy_out_kernel", "copy_in", "copy_out", "reference_copy_in", "reference_copy_out"]


@jit
def copy_in_kernel(base_ptr, flat_ptr, table_ptr, count, scale, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    column, offs, mask = locate(table_ptr, count, SEARCH_STEPS, BLOCK, ALIGN)
    x = tl.load(base_ptr + offsets_in(table_ptr, count, column, offs, 0, ALIGN), mask=mask).to(tl.float32)
    tl.store(flat_ptr + offsets_in(table_ptr, count, column, offs, 1, ALIGN), (x * scale).to(flat_ptr.dtype.element_ty), mask=mask)


@jit
def copy_out_kernel(flat_ptr, base_ptr, table_ptr, count, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    column, offs, mask = locate(table_ptr, count, SEARCH_STEPS, BLOCK, ALIGN)
    x = tl.load(flat_ptr + offsets_in(table_ptr, count, column, offs, 1, ALIGN), mask=mask)
    tl.store(base_ptr + offsets_in(table_ptr, count, column, offs, 0, ALIGN), x.to(base_ptr.dtype.element_ty), mask=mask)


def _by_dtype(tensors: Sequence[torch.Tensor], offsets: Sequence[int]) -> dict:
    groups = defaultdict(lambda: ([], []))
    for x, offset in zip(tensors, offsets):
        if x.numel():
            groups[x.dtype][0].append(x)
            groups[x.dtype][1].append(offset)
    return groups


def copy_in(flat: torch.Tensor, srcs: Sequence[torch.Tensor], offsets: Sequence[int], scale: float = 1.0) -> None:
    """Launch `copy_in_kernel` once per source dtype (inputs checked by sharded.kernels.copy_in)."""
    for tensors, slots in _by_dtype(srcs, offsets).values():
        seg = segment_table([tensors, slots], BLOCK)  # the slots: offsets from flat
        copy_in_kernel[(seg.programs,)](seg.bases[0], flat, seg.table, seg.count, scale, SEARCH_STEPS=seg.search_steps, BLOCK=BLOCK, ALIGN=seg.align)


def copy_out(flat: torch.Tensor, dsts: Sequence[torch.Tensor], offsets: Sequence[int]) -> None:
    """Launch `copy_out_kernel` once per destination dtype (inputs checked by sharded.kernels.copy_out)."""
    for tensors, slots in _by_dtype(dsts, offsets).values():
        seg = segment_table([tensors, slots], BLOCK)
        copy_out_kernel[(seg.programs,)](flat, seg.bases[0], seg.table, seg.count, SEARCH_STEPS=seg.search_steps, BLOCK=BLOCK, ALIGN=seg.align)


def reference_copy_in(flat: torch.Tensor, srcs: Sequence[torch.Tensor], offsets: Sequence[int], scale: float = 1.0) -> None:
    """The same in torch ops, the math in the widest of float32 and the two dtypes (float64 stays float64)."""
    for x, offset in zip(srcs, offsets):
        wide = torch.promote_types(torch.promote_types(x.dtype, flat.dtype), torch.float32)
        flat[offset : offset + x.numel()].copy_(x.reshape(-1).to(wide) * scale)


def reference_copy_out(flat: torch.Tensor, dsts: Sequence[torch.Tensor], offsets: Sequence[int]) -> None:
    """The same in torch ops."""
    for x, offset in zip(dsts, offsets):
        x.view(-1).copy_(flat[offset : offset + x.numel()])
