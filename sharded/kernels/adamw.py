"""Fused AdamW over many fp32 tensors in one launch: a single pass reads p, g, m, v and
writes p, m, v (and, optionally, a bf16/fp16 copy of p for the next forward), where an
unfused AdamW walks the memory about ten times, and a launch per tensor would cost a
GPT's hundreds of leaves more host time than the pass itself. One flat shard is the
one-tensor case. The launch walks a segment table ([Note: segment table] in
_segments.py) with a row per operand.

Per element, in float32, torch.optim.AdamW's math (written as its fused CUDA kernel
writes it; the foreach path's lerp for m differs from it only in rounding):

    g = grad / grad_scale                    (grad_scale optional: unscale fp16 grads)
    p = p * (1 - lr * weight_decay)          (decoupled weight decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p - lr / (1 - beta1**t) * (m / (sqrt(v) / sqrt(1 - beta2**t) + eps))
    out_lowp = p.to(out_lowp.dtype)          (optional)

With `freeze_variance_after=k` (1-bit Adam's optimizer half), updates after the k-th
leave v as it is, and its bias correction stays at k's: t in the v lines reads min(t, k).

and nothing at all is written when found_inf != 0. `t` (step) counts updates from 1;
it is an int or a 0-dim tensor read on the device (no host sync, CUDA-graph safe). The
bias corrections are computed in float64 in the kernel: 1 - 0.999**t in float32 loses
four digits to cancellation.
"""
from __future__ import annotations

import math

import torch

from sharded.kernels._launch import BLOCK, jit, load_grad, reference_commit_, reference_grad, skip_if_found_inf, store_lowp, tl
from sharded.kernels._segments import locate, offsets_in, segment_table

__all__ = ["adamw_kernel", "adamw_", "reference_adamw_"]


@jit(do_not_specialize=["step", "freeze_after"])
def adamw_kernel(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, lowp_ptr, grad_scale_ptr, found_inf_ptr, step_ptr,
    table_ptr, count, step, lr, beta1, one_minus_beta1, log2_beta1, beta2, one_minus_beta2, log2_beta2, eps, decay,
    freeze_after, STEP_ON_DEVICE: tl.constexpr, HAS_LOWP: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    FREEZES: tl.constexpr,
    SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
):
    column, offs, mask = locate(table_ptr, count, SEARCH_STEPS, BLOCK, ALIGN)
    mask = skip_if_found_inf(mask, found_inf_ptr, HAS_FOUND_INF)
    if STEP_ON_DEVICE:
        t = tl.load(step_ptr).to(tl.float64)
    else:
        t = step.to(tl.float64)
    bias_correction1 = 1.0 - tl.exp2(t * log2_beta1)  # float64: the float32 scalars promote to t's type
    t_variance = tl.minimum(t, freeze_after.to(tl.float64)) if FREEZES else t
    bias_correction2 = 1.0 - tl.exp2(t_variance * log2_beta2)
    step_size = (lr / bias_correction1).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)

    g = load_grad(grad_ptr, offsets_in(table_ptr, count, column, offs, 1, ALIGN), mask, grad_scale_ptr, HAS_GRAD_SCALE)
    p_offs = offsets_in(table_ptr, count, column, offs, 0, ALIGN)
    m_offs = offsets_in(table_ptr, count, column, offs, 2, ALIGN)
    v_offs = offsets_in(table_ptr, count, column, offs, 3, ALIGN)
    p = tl.load(param_ptr + p_offs, mask=mask)
    m = tl.load(exp_avg_ptr + m_offs, mask=mask)
    v = tl.load(exp_avg_sq_ptr + v_offs, mask=mask)
    p = p * decay
    m = beta1 * m + one_minus_beta1 * g
    if FREEZES:
        v = tl.where(t > t_variance, v, beta2 * v + one_minus_beta2 * g * g)
    else:
        v = beta2 * v + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    tl.store(param_ptr + p_offs, p, mask=mask)
    tl.store(exp_avg_ptr + m_offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + v_offs, v, mask=mask)
    store_lowp(lowp_ptr, offsets_in(table_ptr, count, column, offs, 4, ALIGN), p, mask, HAS_LOWP)


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0 else -math.inf  # beta = 0: beta**t = 0


def adamw_(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay, grad_scale=None, found_inf=None, out_lowp=None,
           freeze_variance_after=None):
    """Launch `adamw_kernel` once over lists of tensors (inputs checked by sharded.kernels.fused_adamw_)."""
    seg = segment_table([param, grad, exp_avg, exp_avg_sq, out_lowp], BLOCK)
    if not seg.programs:
        return
    p, on_device = seg.bases[0], isinstance(step, torch.Tensor)
    adamw_kernel[(seg.programs,)](
        *seg.bases[:4],
        p if out_lowp is None else seg.bases[4],  # placeholders: [Note: optional operands]
        p if grad_scale is None else grad_scale,
        p if found_inf is None else found_inf,
        step if on_device else p,
        seg.table, seg.count, 1 if on_device else int(step), lr,
        beta1, 1 - beta1, _log2(beta1), beta2, 1 - beta2, _log2(beta2), eps, 1 - lr * weight_decay, freeze_variance_after or 0,
        STEP_ON_DEVICE=on_device, HAS_LOWP=out_lowp is not None, HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None, FREEZES=freeze_variance_after is not None, SEARCH_STEPS=seg.search_steps, BLOCK=BLOCK, ALIGN=seg.align,
    )


def reference_adamw_(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay, grad_scale=None, found_inf=None, out_lowp=None,
                     freeze_variance_after=None):
    """The same update in torch ops over one tensor of each operand, with the bias
    corrections in float64."""
    t = step.double() if isinstance(step, torch.Tensor) else float(step)
    t_variance = t if freeze_variance_after is None else (t.clamp(max=freeze_variance_after) if isinstance(t, torch.Tensor) else min(t, freeze_variance_after))
    bias_correction1, bias_correction2 = 1 - beta1**t, 1 - beta2**t_variance
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    if isinstance(step, torch.Tensor):
        step_size, bias_correction2_sqrt = step_size.float(), bias_correction2_sqrt.float()
    g = reference_grad(grad, grad_scale)
    p = param * (1 - lr * weight_decay)
    m = beta1 * exp_avg + (1 - beta1) * g
    v = beta2 * exp_avg_sq + (1 - beta2) * g * g
    if freeze_variance_after is not None:
        v = torch.where(torch.as_tensor(t > t_variance), exp_avg_sq, v)
    p = p - step_size * (m / (v.sqrt() / bias_correction2_sqrt + eps))
    reference_commit_(found_inf, [(param, p), (exp_avg, m), (exp_avg_sq, v)], out_lowp)
