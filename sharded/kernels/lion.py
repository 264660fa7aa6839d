"""Fused Lion over many fp32 tensors in one launch (one flat shard is the one-tensor
case): the signed update and the momentum in one pass (and, optionally, a bf16/fp16
copy of the updated param). The launch walks a segment table ([Note: segment table] in
_segments.py) with a row per operand.

Per element, in float32, Lion as in Chen et al. 2023 ("Symbolic Discovery of
Optimization Algorithms"):

    g = grad / grad_scale                    (grad_scale optional)
    u = sign(beta1 * m + (1 - beta1) * g)
    p = p * (1 - lr * weight_decay) - lr * u
    m = beta2 * m + (1 - beta2) * g
    out_lowp = p.to(out_lowp.dtype)          (optional)

and nothing at all is written when found_inf != 0.
"""
from __future__ import annotations

from sharded.kernels._launch import BLOCK, jit, load_grad, reference_commit_, reference_grad, skip_if_found_inf, store_lowp, tl
from sharded.kernels._segments import locate, offsets_in, segment_table

__all__ = ["lion_kernel", "lion_", "reference_lion_"]


@jit
def lion_kernel(
    param_ptr, grad_ptr, exp_avg_ptr, lowp_ptr, grad_scale_ptr, found_inf_ptr,
    table_ptr, count, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay,
    HAS_LOWP: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
):
    column, offs, mask = locate(table_ptr, count, SEARCH_STEPS, BLOCK, ALIGN)
    mask = skip_if_found_inf(mask, found_inf_ptr, HAS_FOUND_INF)
    g = load_grad(grad_ptr, offsets_in(table_ptr, count, column, offs, 1, ALIGN), mask, grad_scale_ptr, HAS_GRAD_SCALE)
    p_offs = offsets_in(table_ptr, count, column, offs, 0, ALIGN)
    m_offs = offsets_in(table_ptr, count, column, offs, 2, ALIGN)
    p = tl.load(param_ptr + p_offs, mask=mask)
    m = tl.load(exp_avg_ptr + m_offs, mask=mask)
    c = beta1 * m + one_minus_beta1 * g
    u = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, c * 0.0))  # torch.sign: 0 stays 0, nan stays nan
    p = p * decay - lr * u
    m = beta2 * m + one_minus_beta2 * g
    tl.store(param_ptr + p_offs, p, mask=mask)
    tl.store(exp_avg_ptr + m_offs, m, mask=mask)
    store_lowp(lowp_ptr, offsets_in(table_ptr, count, column, offs, 3, ALIGN), p, mask, HAS_LOWP)


def lion_(param, grad, exp_avg, *, lr, beta1, beta2, weight_decay, grad_scale=None, found_inf=None, out_lowp=None):
    """Launch `lion_kernel` once over lists of tensors (inputs checked by sharded.kernels.fused_lion_)."""
    seg = segment_table([param, grad, exp_avg, out_lowp], BLOCK)
    if not seg.programs:
        return
    p = seg.bases[0]
    lion_kernel[(seg.programs,)](
        *seg.bases[:3],
        p if out_lowp is None else seg.bases[3],  # placeholders: [Note: optional operands]
        p if grad_scale is None else grad_scale,
        p if found_inf is None else found_inf,
        seg.table, seg.count, lr, beta1, 1 - beta1, beta2, 1 - beta2, 1 - lr * weight_decay,
        HAS_LOWP=out_lowp is not None, HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
        SEARCH_STEPS=seg.search_steps, BLOCK=BLOCK, ALIGN=seg.align,
    )


def reference_lion_(param, grad, exp_avg, *, lr, beta1, beta2, weight_decay, grad_scale=None, found_inf=None, out_lowp=None):
    """The same update in torch ops over one tensor of each operand."""
    g = reference_grad(grad, grad_scale)
    u = (beta1 * exp_avg + (1 - beta1) * g).sign()
    p = param * (1 - lr * weight_decay) - lr * u
    m = beta2 * exp_avg + (1 - beta2) * g
    reference_commit_(found_inf, [(param, p), (exp_avg, m)], out_lowp)
