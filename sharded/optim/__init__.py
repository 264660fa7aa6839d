"""Optimizers as optax-style `GradientTransformation`s over pytrees of torch tensors.

    tx = optim.chain(optim.clip_by_global_norm(1.0),
                     optim.adamw(optim.schedules.warmup_cosine(3e-4, 100, 10_000)))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = optim.apply_updates(params, updates)
"""
from sharded.optim import schedules as schedules
from sharded.optim.aliases import adamw, lion, onebit_adam, sgd
from sharded.optim.base import EmptyState, GradientTransformation, apply, apply_updates, chain, identity, states_of
from sharded.optim.parts import InParts, leafwise_tail
from sharded.optim.transforms import (
    ClipState,
    ScaleByAdamState,
    ScaleByFrozenAdamState,
    ScaleByLionState,
    ScheduleState,
    TraceState,
    add_decayed_weights,
    clip_by_global_norm,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    trace,
)

__all__ = [
    "GradientTransformation", "EmptyState", "identity", "chain", "apply_updates", "apply", "states_of", "schedules", "InParts", "leafwise_tail",
    "sgd", "adamw", "lion", "onebit_adam",
    "ClipState", "ScaleByAdamState", "ScaleByFrozenAdamState", "ScaleByLionState", "TraceState", "ScheduleState",
    "scale_by_adam", "scale_by_lion", "trace", "add_decayed_weights", "scale_by_learning_rate", "clip_by_global_norm",
]
