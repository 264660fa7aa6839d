"""The optimizers users ask for by name, chained from `transforms.py`.

`adamw` and `onebit_adam` also carry a fused path that updates params and moments in
place, one launch per (device, dtype) group: sharded.kernels' Triton AdamW on GPU (fp32
params, constant lr), else `torch._fused_adamw_`, the kernel behind
`torch.optim.AdamW(fused=True)` (1-bit Adam's frozen variance only the Triton kernel
has: elsewhere it takes the pure update). It computes what the chain's pure update
computes (tests/test_optim.py checks both against torch.optim.AdamW, and onebit_adam's
kernel against its chain; tests/test_gpu.py the Triton path on CUDA).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from sharded import kernels
from sharded import tree as T
from sharded.optim.base import GradientTransformation, chain
from sharded.optim.schedules import Schedule
from sharded.optim.transforms import (
    add_decayed_weights,
    clip_by_global_norm,
    learning_rate_at,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    trace,
)

__all__ = ["sgd", "adamw", "lion", "onebit_adam"]

_FUSED_DEVICES = ("cuda", "cpu")


def _triton_applies(first_param: torch.Tensor, lr: Any) -> bool:
    """Whether sharded.kernels' one-launch AdamW runs this group: fp32 params where the
    kernels run (CUDA), and a constant lr (a scheduled lr is a device tensor, which torch's
    fused kernel takes and ours would have to read on the host)."""
    return first_param.dtype == torch.float32 and kernels.uses_triton(first_param) and isinstance(lr, float)


def sgd(lr: float | Schedule, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0) -> GradientTransformation:
    """torch.optim.SGD: coupled weight decay, then momentum, then `-lr`."""
    if nesterov and momentum <= 0:
        raise ValueError("sgd(nesterov=True) needs momentum > 0")
    parts = [add_decayed_weights(weight_decay)]
    if momentum:
        parts.append(trace(momentum, nesterov))
    return chain(*parts, scale_by_learning_rate(lr))


def lion(lr: float | Schedule, b1: float = 0.9, b2: float = 0.99, weight_decay: float = 0.0) -> GradientTransformation:
    """Lion (Chen et al. 2023): sign of interpolated momentum, decoupled weight decay."""
    return chain(scale_by_lion(b1, b2), add_decayed_weights(weight_decay), scale_by_learning_rate(lr))


def adamw(
    lr: float | Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2
) -> GradientTransformation:
    """torch.optim.AdamW: Adam with decoupled weight decay, fused when it can be."""
    pure = chain(scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay), scale_by_learning_rate(lr))
    return GradientTransformation(pure.init, pure.update, _fused_adam(pure, lr, b1, b2, eps, weight_decay), pure.leafwise)


def _fused_adam(
    pure: GradientTransformation, lr: Any, b1: float, b2: float, eps: float, weight_decay: float,
    freeze: int | None = None, clip: GradientTransformation | None = None,
) -> Any:
    """The fused path of a chain (clip?, adam, decayed weights, lr): each (device, dtype)
    group in one launch. A variance that freezes (`freeze`) only the Triton kernel does;
    where it does not run, such a chain takes its pure update."""

    @torch.no_grad()
    def fused(grads: Any, state: tuple, params: Any) -> tuple[Any, tuple]:
        ps = T.leaves(params)
        groups = defaultdict(list)
        for i, p in enumerate(ps):
            groups[(p.device, p.dtype)].append(i)
        triton = {key: _triton_applies(ps[idx[0]], lr) for key, idx in groups.items()}
        runnable = all(p.device.type in _FUSED_DEVICES and p.is_floating_point() for p in ps)
        if not runnable or (freeze is not None and not all(triton.values())):
            updates, state = pure.update(grads, state, params)
            torch._foreach_add_(ps, T.leaves(updates))
            return params, state
        *clipped, adam, decay, schedule = state
        if clip is not None:  # first in the chain, as the pure update runs it
            grads, clip_state = clip.update(grads, clipped[0], params)
            clipped = [clip_state]
        step_size = learning_rate_at(lr, getattr(schedule, "count", None))
        adam.count.add_(1)
        if callable(lr):
            schedule.count.add_(1)
        gs, ms, vs = T.leaves(grads), T.leaves(adam.mu), T.leaves(adam.nu)
        for key, idx in groups.items():
            p_, g_, m_, v_ = [ps[i] for i in idx], [gs[i].to(ps[i].dtype) for i in idx], [ms[i] for i in idx], [vs[i] for i in idx]
            if triton[key]:
                kernels.fused_adamw_(p_, g_, m_, v_, step=adam.count, lr=step_size, beta1=b1, beta2=b2, eps=eps, weight_decay=weight_decay, freeze_variance_after=freeze)
                continue
            torch._fused_adamw_(
                p_, g_, m_, v_, [], [adam.count] * len(p_),
                lr=step_size, beta1=b1, beta2=b2, weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
            )
        return params, (*clipped, adam, decay, schedule)

    return fused


def onebit_adam(
    lr: float | Schedule,
    warmup_steps: int,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
) -> GradientTransformation:
    """AdamW whose variance freezes after `warmup_steps` updates: the optimizer half of
    1-bit Adam (`sharded.compress_grads(method="onebit")` is the communication half).
    During warmup it is `adamw`, update for update (clipped to `max_grad_norm`). After
    it, the grads it is handed make its momentum the exchanged one, so they are not
    clipped: clipping them would pull the momentum away from the workers' (DeepSpeed
    clips each worker's grads before the exchange, which an exchange that starts before
    backward ends cannot); do not chain a clip in front of it either."""
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 1:
        raise ValueError(f"onebit_adam(warmup_steps=...) must be an int >= 1 (Adam's variance needs warmup); got {warmup_steps!r}")
    clip = clip_by_global_norm(max_grad_norm, steps=warmup_steps) if max_grad_norm is not None else None
    adam = [scale_by_adam(b1, b2, eps, freeze_variance_after=warmup_steps), add_decayed_weights(weight_decay), scale_by_learning_rate(lr)]
    pure = chain(*([clip] if clip else []), *adam)
    return GradientTransformation(pure.init, pure.update, _fused_adam(pure, lr, b1, b2, eps, weight_decay, freeze=warmup_steps, clip=clip), pure.leafwise)
