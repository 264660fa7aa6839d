"""Fused SGD over many fp32 tensors in one launch (one flat shard is the one-tensor
case): grad, weight decay, momentum and the update in one pass (and, optionally, a
bf16/fp16 copy of the updated param). The launch walks a segment table ([Note: segment
table] in _segments.py) with a row per operand.

Per element, in float32, torch.optim.SGD's math (dampening 0):

    g = grad / grad_scale                    (grad_scale optional)
    g = g + weight_decay * p                 (coupled weight decay)
    b = momentum * b + g                     (when momentum != 0)
    g = g + momentum * b if nesterov else b
    p = p - lr * g
    out_lowp = p.to(out_lowp.dtype)          (optional)

and nothing at all is written when found_inf != 0. The momentum buffer starts at zeros:
then the first step's `b = g` is torch's `clone(grad)`.
"""
from __future__ import annotations

from sharded.kernels._launch import BLOCK, jit, load_grad, reference_commit_, reference_grad, skip_if_found_inf, store_lowp, tl
from sharded.kernels._segments import locate, offsets_in, segment_table

__all__ = ["sgd_kernel", "sgd_", "reference_sgd_"]


@jit
def sgd_kernel(
    param_ptr, grad_ptr, momentum_buffer_ptr, lowp_ptr, grad_scale_ptr, found_inf_ptr,
    table_ptr, count, lr, momentum, weight_decay,
    HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, HAS_LOWP: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
):
    column, offs, mask = locate(table_ptr, count, SEARCH_STEPS, BLOCK, ALIGN)
    mask = skip_if_found_inf(mask, found_inf_ptr, HAS_FOUND_INF)
    g = load_grad(grad_ptr, offsets_in(table_ptr, count, column, offs, 1, ALIGN), mask, grad_scale_ptr, HAS_GRAD_SCALE)
    p_offs = offsets_in(table_ptr, count, column, offs, 0, ALIGN)
    p = tl.load(param_ptr + p_offs, mask=mask)
    g = g + weight_decay * p
    if HAS_MOMENTUM:
        b_offs = offsets_in(table_ptr, count, column, offs, 2, ALIGN)
        b = momentum * tl.load(momentum_buffer_ptr + b_offs, mask=mask) + g
        tl.store(momentum_buffer_ptr + b_offs, b, mask=mask)
        if NESTEROV:
            g = g + momentum * b
        else:
            g = b
    p = p - lr * g
    tl.store(param_ptr + p_offs, p, mask=mask)
    store_lowp(lowp_ptr, offsets_in(table_ptr, count, column, offs, 3, ALIGN), p, mask, HAS_LOWP)


def sgd_(param, grad, momentum_buffer=None, *, lr, momentum, nesterov, weight_decay, grad_scale=None, found_inf=None, out_lowp=None):
    """Launch `sgd_kernel` once over lists of tensors (inputs checked by sharded.kernels.fused_sgd_)."""
    seg = segment_table([param, grad, momentum_buffer, out_lowp], BLOCK)
    if not seg.programs:
        return
    p = seg.bases[0]
    sgd_kernel[(seg.programs,)](
        p, seg.bases[1],
        p if momentum_buffer is None else seg.bases[2],  # placeholders: [Note: optional operands]
        p if out_lowp is None else seg.bases[3],
        p if grad_scale is None else grad_scale,
        p if found_inf is None else found_inf,
        seg.table, seg.count, lr, momentum, weight_decay,
        HAS_MOMENTUM=momentum != 0, NESTEROV=nesterov, HAS_LOWP=out_lowp is not None,
        HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None, SEARCH_STEPS=seg.search_steps, BLOCK=BLOCK, ALIGN=seg.align,
    )


def reference_sgd_(param, grad, momentum_buffer=None, *, lr, momentum, nesterov, weight_decay, grad_scale=None, found_inf=None, out_lowp=None):
    """The same update in torch ops over one tensor of each operand."""
    g = reference_grad(grad, grad_scale)
    g = g + weight_decay * param
    updates = []
    if momentum != 0:
        b = momentum * momentum_buffer + g
        updates.append((momentum_buffer, b))
        g = g + momentum * b if nesterov else b
    reference_commit_(found_inf, [(param, param - lr * g), *updates], out_lowp)
