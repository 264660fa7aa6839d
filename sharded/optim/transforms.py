"""The building blocks that optimizers are chained from, optax's names and maths.

Each returns a `GradientTransformation`; `aliases.py` chains them into sgd, adamw and
lion. States are NamedTuples whose tensor trees mirror the params; counts are 0-d
float32 tensors on the params' device.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from sharded import tree as T
from sharded.optim.base import EmptyState, GradientTransformation
from sharded.optim.schedules import Schedule

__all__ = [
    "ScaleByAdamState",
    "ScaleByFrozenAdamState",
    "ScaleByLionState",
    "TraceState",
    "ScheduleState",
    "scale_by_adam",
    "scale_by_lion",
    "trace",
    "add_decayed_weights",
    "scale_by_learning_rate",
    "clip_by_global_norm",
    "zero_count",
]


def zero_count(params: Any) -> torch.Tensor:
    """A 0-d float32 step count on the params' device."""
    leaves = T.leaves(params)
    return torch.zeros((), dtype=torch.float32, device=leaves[0].device if leaves else None)


def _zeros(params: Any) -> Any:
    return T.map(lambda p: torch.zeros_like(p, memory_format=torch.preserve_format), params)


class ScaleByAdamState(NamedTuple):
    count: torch.Tensor
    mu: Any
    nu: Any


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, freeze_variance_after: int | None = None) -> GradientTransformation:
    """Adam's direction `m̂ / (sqrt(v̂) + eps)` with bias-corrected moments.

    With `freeze_variance_after=k` the variance stops moving after k updates (its bias
    correction stays at k's), as 1-bit Adam needs once its grads travel compressed
    (`sharded.compress_grads`); the state is then a `ScaleByFrozenAdamState`."""

    def init(params: Any) -> ScaleByAdamState:
        if freeze_variance_after is None:
            return ScaleByAdamState(zero_count(params), _zeros(params), _zeros(params))
        return ScaleByFrozenAdamState(zero_count(params), _zeros(params), _zeros(params), torch.tensor(freeze_variance_after), torch.tensor(b1, dtype=torch.float64), torch.tensor(eps, dtype=torch.float64))

    def update(grads: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        count = state.count + 1
        mu = T.map(lambda m, g: torch.lerp(m, g.to(m.dtype), 1 - b1), state.mu, grads)
        nu = T.map(lambda v, g: v * b2 + (1 - b2) * g.to(v.dtype).square(), state.nu, grads)
        variance_count = count
        if freeze_variance_after is not None:
            frozen = count > freeze_variance_after
            nu = T.map(lambda new, old: torch.where(frozen, old, new), nu, state.nu)
            variance_count = count.clamp(max=freeze_variance_after)
        # in float64: 1 - b2**count loses 4 digits to cancellation in float32 (0-d
        # tensors do not promote the moments, which keep their dtype)
        bc1, bc2 = 1 - b1 ** count.double(), 1 - b2 ** variance_count.double()
        step_size, bc2_sqrt = 1 / bc1, bc2.sqrt()
        updates = T.map(lambda m, v: step_size * m / (v.sqrt() / bc2_sqrt + eps), mu, nu)
        if freeze_variance_after is None:
            return updates, ScaleByAdamState(count, mu, nu)
        return updates, ScaleByFrozenAdamState(count, mu, nu, state.freeze_after, state.b1, state.eps)

    return GradientTransformation(init, update, leafwise=True)


class ScaleByFrozenAdamState(NamedTuple):
    """Adam's state whose variance freezes after `freeze_after` updates. It keeps its
    momentum's decay `b1` and its `eps` too: 1-bit Adam's exchange (`sharded.compress_grads`)
    carries the momentum, divided by the frozen sqrt(v) + eps, so it reads them."""

    count: torch.Tensor
    mu: Any
    nu: Any
    freeze_after: torch.Tensor  # 0-d int64
    b1: torch.Tensor  # 0-d float64
    eps: torch.Tensor  # 0-d float64


class ScaleByLionState(NamedTuple):
    count: torch.Tensor
    mu: Any


def scale_by_lion(b1: float = 0.9, b2: float = 0.99) -> GradientTransformation:
    """Lion's direction `sign(b1·m + (1-b1)·g)`, with momentum `m ← b2·m + (1-b2)·g`."""

    def init(params: Any) -> ScaleByLionState:
        return ScaleByLionState(zero_count(params), _zeros(params))

    def update(grads: Any, state: ScaleByLionState, params: Any = None) -> tuple[Any, ScaleByLionState]:
        updates = T.map(lambda m, g: torch.lerp(m, g.to(m.dtype), 1 - b1).sign(), state.mu, grads)
        mu = T.map(lambda m, g: torch.lerp(m, g.to(m.dtype), 1 - b2), state.mu, grads)
        return updates, ScaleByLionState(state.count + 1, mu)

    return GradientTransformation(init, update, leafwise=True)


class TraceState(NamedTuple):
    trace: Any


def trace(decay: float, nesterov: bool = False) -> GradientTransformation:
    """Momentum: `t ← g + decay·t`, emitting `t` (or `g + decay·t` with nesterov).

    Starting from t = 0 this is exactly torch.optim.SGD's momentum buffer."""

    def init(params: Any) -> TraceState:
        return TraceState(_zeros(params))

    def update(grads: Any, state: TraceState, params: Any = None) -> tuple[Any, TraceState]:
        t = T.map(lambda t_, g: g.to(t_.dtype) + decay * t_, state.trace, grads)
        updates = T.map(lambda g, t_: g + decay * t_, grads, t) if nesterov else t
        return updates, TraceState(t)

    return GradientTransformation(init, update, leafwise=True)


def add_decayed_weights(weight_decay: float) -> GradientTransformation:
    """`u + weight_decay · p`: decoupled decay when chained after the direction."""

    def update(updates: Any, state: EmptyState, params: Any = None) -> tuple[Any, EmptyState]:
        if weight_decay == 0.0:
            return updates, state
        if params is None:
            raise ValueError("add_decayed_weights needs params: call update(grads, state, params)")
        return T.map(lambda u, p: u + weight_decay * p.to(u.dtype), updates, params), state

    return GradientTransformation(lambda params: EmptyState(), update, leafwise=True)


class ScheduleState(NamedTuple):
    count: torch.Tensor


def learning_rate_at(lr: float | Schedule, count: torch.Tensor) -> float | torch.Tensor:
    """The learning rate for the update after `count` updates."""
    return lr(count) if callable(lr) else lr


def scale_by_learning_rate(lr: float | Schedule) -> GradientTransformation:
    """`-lr · u`, with `lr` a float or a schedule of the update count."""

    def init(params: Any) -> ScheduleState | EmptyState:
        return ScheduleState(zero_count(params)) if callable(lr) else EmptyState()

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if not callable(lr):
            return T.map(lambda u: -lr * u, updates), state
        step_size = lr(state.count)
        return T.map(lambda u: -step_size.to(u.dtype) * u, updates), ScheduleState(state.count + 1)

    return GradientTransformation(init, update, leafwise=True)


class ClipState(NamedTuple):
    count: torch.Tensor  # updates so far
    norm: torch.Tensor  # the last update's global norm, before clipping (what a run logs as the grad norm)


def clip_by_global_norm(max_norm: float, steps: int | None = None) -> GradientTransformation:
    """Scale updates by `min(1, max_norm / (‖u‖ + 1e-6))`, as torch's clip_grad_norm_
    does, without reading the norm on the host; the norm stays in the state. With
    `steps=k`, only the first k updates are clipped (1-bit Adam's warmup, whose later
    grads are its exchanged momentum's)."""
    if max_norm <= 0:
        raise ValueError(f"clip_by_global_norm needs max_norm > 0, got {max_norm}")

    def init(params: Any) -> ClipState:
        count = zero_count(params)
        wide = [x.dtype for x in T.leaves(params) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.element_size() > 4]
        return ClipState(count, count.to(wide[0]) if wide else count.clone())  # the norm as precise as global_norm computes it

    def update(updates: Any, state: ClipState, params: Any = None) -> tuple[Any, ClipState]:
        norm = T.global_norm(updates)
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        if steps is not None:
            scale = torch.where(state.count.to(scale.device) < steps, scale, torch.ones_like(scale))
        new = ClipState(state.count + 1, norm.detach().to(state.norm.dtype).to(state.norm.device))
        return T.map(lambda u: u * scale.to(u.dtype), updates), new

    return GradientTransformation(init, update)
