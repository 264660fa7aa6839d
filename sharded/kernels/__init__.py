"""Triton kernels for the runtime's memory-bound passes, each beside a torch reference.

    fused_adamw_ / fused_sgd_ / fused_lion_   one pass over fp32 params: update each p
                                              and its state in place, optionally write
                                              a bf16/fp16 copy of p, skip on found_inf;
                                              one tensor each (a flat shard) or lists of
                                              many (a pytree's leaves), one launch
    unscale_and_check_                        grads *= 1/scale and an inf/nan flag, one pass
    copy_in / copy_out                        tensors <-> slots of a flat buffer, cast fused
    pack_signs_ / unpack_signs_               1-bit compression: signs 32 to an int32, the
                                              scale and the error update fused

Each public function checks its inputs (ValueError naming the fix), then runs the
Triton kernel where it can (`uses_triton`): CUDA tensors when triton imports, or CPU
tensors when this package was imported under TRITON_INTERPRET=1 (Triton's interpreter,
how tests/test_kernels.py runs the kernels without a GPU). Everywhere else it runs the
`reference_*` function in torch, which computes the same thing. Nothing here reads a
device value on the host.
"""
from __future__ import annotations

import contextlib
from numbers import Real
from typing import Sequence, Union

import torch

from sharded.kernels import adamw, flat_copy, lion, onebit, sgd, unscale
from sharded.kernels._launch import (
    FLOAT_DTYPES,
    HAVE_TRITON,
    INTERPRETED,
    check_flat,
    check_scalar,
    optimizer_operands,
    uses_triton,
)

__all__ = [
    "fused_adamw_",
    "fused_sgd_",
    "fused_lion_",
    "unscale_and_check_",
    "copy_in",
    "copy_out",
    "pack_signs_",
    "unpack_signs_",
    "triton_available",
    "uses_triton",
]


def triton_available() -> bool:
    """Whether the Triton kernels can run in this process: triton imports and there is a
    CUDA device, or the kernels were built for Triton's interpreter (TRITON_INTERPRET=1
    when this package was first imported)."""
    return HAVE_TRITON and (INTERPRETED or torch.cuda.is_available())


# float64 (property tests compare transforms in it) takes the torch references everywhere.
_ANY_FLOAT = (*FLOAT_DTYPES, torch.float64)


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it `device`."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _dispatch(kernel, reference, anchor: torch.Tensor, *args, operands: Sequence[torch.Tensor] = (), **kwargs):
    """`kernel` where Triton runs for anchor's device (on that device) and no operand is
    float64, else `reference`."""
    if not uses_triton(anchor) or any(x.dtype == torch.float64 for x in operands):
        return reference(*args, **kwargs)
    with _on(anchor.device):
        return kernel(*args, **kwargs)


def _step(kernel, reference, operands: dict[str, list | None], **hyper) -> None:
    """An optimizer step: `kernel` once over the lists of tensors where Triton runs for
    their device, else `reference` tensor by tensor (flat views: shapes may differ)."""
    params = operands["param"]
    if params and uses_triton(params[0]):
        with _on(params[0].device):
            kernel(**operands, **hyper)
        return
    for i in range(len(params)):
        reference(**{name: None if xs is None else xs[i].view(-1) for name, xs in operands.items()}, **hyper)


def _check_numbers(fn: str, **values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, Real):
            raise ValueError(f"{fn}: {name} must be a Python number, got {type(value).__name__}; pass float({name})")


def _check_beta(fn: str, name: str, beta: float) -> None:
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"{fn}: {name}={beta} must be in [0, 1)")


Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]


def fused_adamw_(
    param: Tensors,
    grad: Tensors,
    exp_avg: Tensors,
    exp_avg_sq: Tensors,
    *,
    step: int | torch.Tensor,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    out_lowp: Tensors | None = None,
    freeze_variance_after: int | None = None,
) -> None:
    """One torch.optim.AdamW step, in place (math in kernels/adamw.py), over one tensor
    of each operand (a flat shard) or over sequences of them (many tensors, one launch,
    as torch._fused_adamw_ takes lists).

    param, exp_avg, exp_avg_sq: fp32; grad: fp32, bf16 or fp16 (one dtype for all);
    out_lowp: bf16 or fp16 (one dtype for all), receives the updated param. Contiguous,
    any shape; the i-th tensors alike in numel; all on one device; empty ones are
    skipped. step: this update's number counting from 1, an int or a 0-dim tensor on
    that device; grad_scale: 0-dim fp32, grads are divided by it; found_inf: 0-dim fp32,
    nonzero skips the update (everything, out_lowp included, stays bitwise as it was);
    freeze_variance_after: an int k >= 1, after whose k-th update exp_avg_sq stays as it
    is (1-bit Adam's optimizer half)."""
    fn = "fused_adamw_"
    operands = optimizer_operands(fn, param, grad, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, grad_scale, found_inf, out_lowp)
    _check_numbers(fn, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    _check_beta(fn, "beta1", beta1)
    _check_beta(fn, "beta2", beta2)
    device = operands["param"][0].device if operands["param"] else None
    if isinstance(step, torch.Tensor):
        if step.dim() != 0 or step.device != (device or step.device) or step.is_complex() or step.dtype == torch.bool:
            got = f"shape {tuple(step.shape)}, {step.dtype} on {step.device}"
            raise ValueError(f"{fn}: a tensor step must be a real 0-dim tensor on {device}, got {got}")
    elif isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"{fn}: step must be an int >= 1 (this update's number) or a 0-dim tensor, got {step!r}")
    if freeze_variance_after is not None and (isinstance(freeze_variance_after, bool) or not isinstance(freeze_variance_after, int) or freeze_variance_after < 1):
        raise ValueError(f"{fn}: freeze_variance_after must be an int >= 1 (the updates that move the variance) or None, got {freeze_variance_after!r}")
    _step(adamw.adamw_, adamw.reference_adamw_, operands, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
          weight_decay=weight_decay, grad_scale=grad_scale, found_inf=found_inf, freeze_variance_after=freeze_variance_after)


def fused_sgd_(
    param: Tensors,
    grad: Tensors,
    momentum_buffer: Tensors | None = None,
    *,
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    out_lowp: Tensors | None = None,
) -> None:
    """One torch.optim.SGD step (dampening 0), in place (math in kernels/sgd.py).
    momentum_buffer: fp32 like param, zeros before the first step; needed when
    momentum != 0, untouched otherwise. Operands as in `fused_adamw_`: one tensor each
    or sequences of them."""
    fn = "fused_sgd_"
    if momentum != 0 and momentum_buffer is None:
        raise ValueError(f"{fn}: momentum={momentum} needs momentum_buffer: float32 tensors like param, zeros before the first step")
    states = {} if momentum == 0 else {"momentum_buffer": momentum_buffer}
    operands = optimizer_operands(fn, param, grad, states, grad_scale, found_inf, out_lowp)
    _check_numbers(fn, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if nesterov and momentum <= 0:
        raise ValueError(f"{fn}: nesterov=True needs momentum > 0, got momentum={momentum}")
    _step(sgd.sgd_, sgd.reference_sgd_, operands, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
          grad_scale=grad_scale, found_inf=found_inf)


def fused_lion_(
    param: Tensors,
    grad: Tensors,
    exp_avg: Tensors,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    weight_decay: float = 0.0,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    out_lowp: Tensors | None = None,
) -> None:
    """One Lion step, in place (math in kernels/lion.py); exp_avg is Lion's momentum,
    fp32. Operands as in `fused_adamw_`: one tensor each or sequences of them."""
    fn = "fused_lion_"
    operands = optimizer_operands(fn, param, grad, {"exp_avg": exp_avg}, grad_scale, found_inf, out_lowp)
    _check_numbers(fn, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
    _check_beta(fn, "beta1", beta1)
    _check_beta(fn, "beta2", beta2)
    _step(lion.lion_, lion.reference_lion_, operands, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
          grad_scale=grad_scale, found_inf=found_inf)


def _as_list(fn: str, name: str, tensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if not isinstance(tensors, Sequence):
        raise ValueError(f"{fn}: {name} must be a tensor or a sequence of tensors, got {type(tensors).__name__}")
    return list(tensors)


def unscale_and_check_(
    grads: torch.Tensor | Sequence[torch.Tensor], scale: torch.Tensor, found_inf: torch.Tensor | None = None
) -> torch.Tensor:
    """grads *= 1/scale in place, and found_inf = 1.0 if any grad held an inf or nan
    (math in kernels/unscale.py). grads: contiguous fp32/bf16/fp16 tensors (or one flat
    buffer; float64 runs the reference) on scale's device; scale, found_inf: 0-dim fp32. found_inf is only ever set,
    never cleared; when not given a zeroed one is made. Returns found_inf."""
    fn = "unscale_and_check_"
    grads = _as_list(fn, "grads", grads)
    check_scalar(fn, "scale", scale)
    if found_inf is not None:
        check_scalar(fn, "found_inf", found_inf, scale.device)
    for i, g in enumerate(grads):
        check_flat(fn, f"grads[{i}]", g, _ANY_FLOAT, flat=False)
        if g.device != scale.device:
            raise ValueError(f"{fn}: grads[{i}] is on {g.device} but scale is on {scale.device}; move scale with .to({str(g.device)!r})")
    return _dispatch(unscale.unscale_and_check_, unscale.reference_unscale_and_check_, scale, grads, scale, found_inf, operands=grads)


def _check_slots(fn: str, flat: torch.Tensor, name: str, tensors, offsets, disjoint: bool) -> tuple[list, list]:
    """The tensors and offsets as lists, after checking that each tensor fits its slot."""
    check_flat(fn, "flat", flat, _ANY_FLOAT)
    tensors, offsets = _as_list(fn, name, tensors), list(offsets)
    if len(offsets) != len(tensors):
        raise ValueError(f"{fn}: {len(tensors)} {name} but {len(offsets)} offsets; pass one offset per tensor")
    for i, (x, offset) in enumerate(zip(tensors, offsets)):
        check_flat(fn, f"{name}[{i}]", x, _ANY_FLOAT, flat=False)
        if x.device != flat.device:
            raise ValueError(f"{fn}: {name}[{i}] is on {x.device} but flat is on {flat.device}; move it with .to({str(flat.device)!r})")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset + x.numel() > flat.numel():
            raise ValueError(
                f"{fn}: {name}[{i}] ({x.numel()} elements) at offset {offset!r} does not fit in flat ({flat.numel()} elements); "
                "offsets must be ints with 0 <= offset and offset + numel <= flat.numel()"
            )
    if disjoint:
        slots = sorted((o, o + x.numel(), i) for i, (x, o) in enumerate(zip(tensors, offsets)) if x.numel())
        for (_, end, i), (start, _, j) in zip(slots, slots[1:]):
            if start < end:
                raise ValueError(f"{fn}: the slots of {name}[{i}] and {name}[{j}] overlap in flat; give each tensor its own range")
    return tensors, offsets


def copy_in(flat: torch.Tensor, srcs: Sequence[torch.Tensor], offsets: Sequence[int], *, scale: float = 1.0) -> None:
    """flat[o : o + n] = (src.view(-1) * scale).to(flat.dtype) for each src and its offset o
    (math in kernels/flat_copy.py). flat: 1-D contiguous; srcs: contiguous, any shape, on
    flat's device, slots disjoint; fp32/bf16/fp16 (float64 runs the reference). Padding
    between slots is untouched."""
    srcs, offsets = _check_slots("copy_in", flat, "srcs", srcs, offsets, disjoint=True)
    _check_numbers("copy_in", scale=scale)
    _dispatch(flat_copy.copy_in, flat_copy.reference_copy_in, flat, flat, srcs, offsets, float(scale), operands=[flat, *srcs])


def copy_out(flat: torch.Tensor, dsts: Sequence[torch.Tensor], offsets: Sequence[int]) -> None:
    """dst.view(-1)[:] = flat[o : o + n].to(dst.dtype) for each dst and its offset o (math in
    kernels/flat_copy.py). Same layout rules as `copy_in`; slots may overlap."""
    dsts, offsets = _check_slots("copy_out", flat, "dsts", dsts, offsets, disjoint=False)
    _dispatch(flat_copy.copy_out, flat_copy.reference_copy_out, flat, flat, dsts, offsets, operands=[flat, *dsts])


def _check_scales(name: str, scales: torch.Tensor, like: torch.Tensor, per: int) -> None:
    if not isinstance(per, int) or isinstance(per, bool) or per < 1:
        raise ValueError(f"{name}: per (elements per scale) must be an int >= 1; got {per!r}")
    blocks = -(-like.numel() // per)
    if scales.dim() != 1 or scales.numel() < blocks or scales.dtype != like.dtype or scales.device != like.device:
        raise ValueError(f"{name}: scales must be 1-D with >= {blocks} elements of {like.dtype} on {like.device}; got {tuple(scales.shape)}, {scales.dtype}, {scales.device}")


def pack_signs_(x: torch.Tensor, scales: torch.Tensor, error: torch.Tensor, per: int = 1) -> torch.Tensor:
    """The signs of x (1-D) as int32 words, 32 each (bit j of word w: x[32w + j] >= 0;
    padding bits 1), and error = x - s * sign(x) written in place, s = scales[i // per]
    for x[i] (math in kernels/onebit.py). error: x's shape, dtype and device."""
    if error.shape != x.shape or error.dtype != x.dtype or error.device != x.device:
        raise ValueError(f"pack_signs_: error must have x's shape, dtype and device ({tuple(x.shape)}, {x.dtype}, {x.device}); got {tuple(error.shape)}, {error.dtype}, {error.device}")
    check_flat("pack_signs_", "x", x, _ANY_FLOAT)
    _check_scales("pack_signs_", scales, x, per)
    return _dispatch(onebit.pack_signs_, onebit.reference_pack_signs_, x, x, scales, error, per, operands=[x])


def unpack_signs_(words: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, per: int = 1, accumulate: bool = False) -> torch.Tensor:
    """out = s * (±1 by each bit of words), or out += it with accumulate, s = scales[i // per]
    for out[i] (math in kernels/onebit.py). words: int32, at least ceil(out.numel() / 32)."""
    if words.dtype != torch.int32 or words.numel() < onebit.words_for(out.numel()):
        raise ValueError(f"unpack_signs_: words must be int32 with >= {onebit.words_for(out.numel())} elements; got {words.dtype}, {words.numel()}")
    check_flat("unpack_signs_", "out", out, _ANY_FLOAT)
    _check_scales("unpack_signs_", scales, out, per)
    return _dispatch(onebit.unpack_signs_, onebit.reference_unpack_signs_, out, words, scales, out, per, accumulate, operands=[out])
