"""Fused unscale + inf/nan check over many gradient tensors: each element is read once,
checked, multiplied by 1/scale and written back, and one device flag records whether
any was inf or nan. Replaces an isfinite().all() pass and a mul_ pass per tensor, and
never syncs with the host (the step is skipped on the device: see found_inf in the
fused optimizers).

    for g in grads:                     (fp32, bf16 or fp16; any shape, contiguous)
        if not isfinite(g).all(): found_inf = 1.0
        g *= 1 / scale                  (in float32, rounded back to g's dtype)

found_inf is only ever set, never cleared (as torch's GradScaler): zero it once per
step and it can collect the verdict over several calls. The check reads the grads as
they come in, before the unscale. One launch per grad dtype over a segment table
([Note: segment table] in _segments.py).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from sharded.kernels._launch import BLOCK, jit, tl
from sharded.kernels._segments import locate, offsets_in, segment_table

__all__ = ["unscale_kernel", "unscale_and_check_", "reference_unscale_and_check_"]


@jit
def unscale_kernel(base_ptr, table_ptr, count, scale_ptr, found_inf_ptr, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    column, offs, mask = locate(table_ptr, count, SEARCH_STEPS, BLOCK, ALIGN)
    ptrs = base_ptr + offsets_in(table_ptr, count, column, offs, 0, ALIGN)
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    bad = (x != x) | (tl.abs(x) == float("inf"))
    tl.store(found_inf_ptr, 1.0, mask=tl.max(bad.to(tl.int32), axis=0) > 0)
    inv_scale = tl.div_rn(1.0, tl.load(scale_ptr))
    tl.store(ptrs, (x * inv_scale).to(base_ptr.dtype.element_ty), mask=mask)


def unscale_and_check_(grads: Sequence[torch.Tensor], scale: torch.Tensor, found_inf: torch.Tensor | None = None) -> torch.Tensor:
    """Launch `unscale_kernel` once per grad dtype; returns found_inf (allocated, zeroed,
    when not given). Inputs checked by sharded.kernels.unscale_and_check_."""
    if found_inf is None:
        found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
    by_dtype = defaultdict(list)
    for g in grads:
        if g.numel():
            by_dtype[g.dtype].append(g)
    for group in by_dtype.values():
        seg = segment_table([group], BLOCK)
        unscale_kernel[(seg.programs,)](seg.bases[0], seg.table, seg.count, scale, found_inf, SEARCH_STEPS=seg.search_steps, BLOCK=BLOCK, ALIGN=seg.align)
    return found_inf


def reference_unscale_and_check_(grads: Sequence[torch.Tensor], scale: torch.Tensor, found_inf: torch.Tensor | None = None) -> torch.Tensor:
    """The same in torch ops, the flag kept on the device."""
    if found_inf is None:
        found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
    inv_scale = torch.reciprocal(scale)
    for g in grads:
        found_inf.masked_fill_(~torch.isfinite(g).all(), 1.0)
        g.copy_(g.to(torch.promote_types(g.dtype, torch.float32)) * inv_scale)
    return found_inf
