"""The optimizer protocol: optax's `GradientTransformation`, on torch tensors.

An optimizer is a pair of pure functions, `init(params) -> state` and
`update(grads, state, params) -> (updates, state)`, composed with `chain`. Its state
is a pytree whose tensor leaves mirror the params (plus 0-d counts), so every
transform that shards, offloads or casts params does the same to the state.

An optimizer may also carry `fused(grads, state, params) -> (params, state)`, which
updates params and state in place (one kernel for all tensors, as
`torch.optim.AdamW(fused=True)` does) and must compute what `update` followed by
`apply_updates` computes. `apply` prefers it; see docs/decisions.md §2.

`leafwise=True` says that its update of each leaf reads only that leaf's grad, state
and param (and the 0-d counts): it may then run on any part of the leaves, one part
at a time (`apply_in_parts`), as offload runs it while backward still reduces the
rest. Adam, Lion, momentum, weight decay and learning rates are leafwise; a global-norm
clip is not; a chain is when all its members are.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import torch

from sharded import primitives
from sharded import tree as T

__all__ = ["GradientTransformation", "EmptyState", "identity", "chain", "apply_updates", "apply", "states_of"]

Params = Any
Updates = Any
State = Any


class EmptyState(NamedTuple):
    """The state of a transformation that keeps none."""


class _Fields(NamedTuple):
    init: Callable[[Params], State]
    update: Callable[[Updates, State, Params], tuple[Updates, State]]
    fused: Callable[[Updates, State, Params], tuple[Params, State]] | None = None
    leafwise: bool = False
    members: tuple = ()  # a chain's transformations, in order (its state is the tuple of theirs)


class GradientTransformation(_Fields):
    """`(init, update, fused=None, leafwise=False, members=())`; `update` refuses to run
    beside a transform that owns the update (see the module's docstring)."""

    __slots__ = ()

    def __new__(cls, init: Callable, update: Callable, fused: Callable | None = None, leafwise: bool = False, members: tuple = ()) -> GradientTransformation:
        return super().__new__(cls, init, _guarded(update), fused, leafwise, members)


def _guarded(update: Callable) -> Callable:
    if getattr(update, "_sharded_guarded", False):
        return update

    @functools.wraps(update)
    def guarded(updates: Updates, state: State, params: Params = None) -> tuple[Updates, State]:
        if not primitives.binding("update"):
            _refuse_outside_update()
        return update(updates, state, params)

    guarded._sharded_guarded = True  # type: ignore[attr-defined]
    return guarded


def _refuse_outside_update() -> None:
    from sharded.step import Capability

    owner = next((t for t in primitives.active() if Capability.OWNS_UPDATE in t.capabilities), None)
    if owner is not None:
        raise ValueError(
            f"{owner.describe()} rewrites the optimizer update (sharded grads, skipped steps or a stage's "
            "part of them), so tx.update(grads, opt_state, params) + apply_updates inside the step would be "
            "wrong; write `state = state.apply_gradients(grads)`, which it handles"
        )


def identity() -> GradientTransformation:
    """Leaves updates unchanged."""
    return GradientTransformation(lambda params: EmptyState(), lambda updates, state, params=None: (updates, state), leafwise=True)


def chain(*txs: GradientTransformation) -> GradientTransformation:
    """Apply `txs` in order; the state is the tuple of their states.

    The chain is fused when its last member is: the others run their pure updates and
    the last one applies the result in place, so `chain(clip_by_global_norm(1.0),
    adamw(3e-4))` is still one fused AdamW kernel.
    """
    if not txs:
        raise ValueError("chain() needs at least one GradientTransformation")

    def init(params: Params) -> tuple:
        return tuple(tx.init(params) for tx in txs)

    def run(txs_: tuple, updates: Updates, state: tuple, params: Params) -> tuple[Updates, list]:
        new_state = []
        for tx, s in zip(txs_, state):
            updates, s = tx.update(updates, s, params)
            new_state.append(s)
        return updates, new_state

    def update(updates: Updates, state: tuple, params: Params = None) -> tuple[Updates, tuple]:
        updates, new_state = run(txs, updates, state, params)
        return updates, tuple(new_state)

    def fused(grads: Updates, state: tuple, params: Params) -> tuple[Params, tuple]:
        grads, new_state = run(txs[:-1], grads, state[:-1], params)
        params, last = txs[-1].fused(grads, state[-1], params)
        return params, tuple(new_state) + (last,)

    return GradientTransformation(init, update, fused if txs[-1].fused is not None else None, all(tx.leafwise for tx in txs), tuple(txs))


def states_of(opt_state: Any, kind: type) -> list:
    """The states of type `kind` (a transform's NamedTuple) anywhere in an optimizer's
    state, in order: what a transform or a training loop reads of a chain's part."""
    import optree

    return [x for x in optree.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, kind), namespace="sharded") if isinstance(x, kind)]


def apply_updates(params: Params, updates: Updates) -> Params:
    """`params + updates`, leafwise, as new tensors (params keep their dtype)."""
    return T.map(lambda p, u: (p + u.to(p.dtype)) if u is not None else p, params, updates)


@torch.no_grad()
def apply(tx: GradientTransformation, grads: Updates, state: State, params: Params) -> tuple[Params, State]:
    """One optimizer step that donates `params`: their tensors are updated in place.

    This is the implementation of the "update" primitive that
    `TrainState.apply_gradients` binds; transforms (ZeRO, offload) replace it.
    """
    if tx.fused is not None:
        return tx.fused(grads, state, params)
    updates, state = tx.update(grads, state, params)
    ps, us = T.leaves(params), T.leaves(updates)
    torch._foreach_add_(ps, [u.to(p.dtype) for p, u in zip(ps, us)])
    return params, state
