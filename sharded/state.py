"""`TrainState`: everything a training step carries from one call to the next, as a pytree."""
from __future__ import annotations

import dataclasses
from typing import Any

import optree
import torch

from sharded import primitives
from sharded import tree as T
from sharded.optim import GradientTransformation
from sharded.placement import Placements
from sharded.optim import apply as apply_optimizer

__all__ = ["TrainState"]


@dataclasses.dataclass(frozen=True)
class TrainState:
    """params, opt_state, step and `extra` (what transforms add: loss scale, error
    feedback, ...) are the pytree's children; `tx`, the optimizer, and `placements`
    (where each leaf lives and how it is cut: [Note: placements] in placement.py) are
    static.

    A step may update the tensors of the state it is given in place (as jax.jit with
    donated arguments does): keep using the state it returns, not the one passed in.
    """

    params: Any
    opt_state: Any
    step: torch.Tensor
    tx: GradientTransformation
    extra: dict = dataclasses.field(default_factory=dict)
    placements: Placements = Placements()

    @classmethod
    def create(cls, params: Any, tx: GradientTransformation, opt_device: str | torch.device | None = None, **extra: Any) -> TrainState:
        """Fresh state: optimizer initialised on `params`, step 0. `opt_device="cpu"` makes
        the optimizer state in host memory (from host copies of the params), for
        `offload`: a state larger than the accelerator then never lands on it."""
        on = params if opt_device is None else T.map(lambda p: p.detach().to(opt_device), params)
        return cls(params=params, opt_state=tx.init(on), step=torch.zeros((), dtype=torch.int64), tx=tx, extra=extra)

    def replace(self, **changes: Any) -> TrainState:
        return dataclasses.replace(self, **changes)

    def apply_gradients(self, grads: Any) -> TrainState:
        """One optimizer update; transforms rewrite it through the "update" primitive."""
        params, opt_state = primitives.bind("update", self.tx, grads, self.opt_state, self.params)
        return self.replace(params=params, opt_state=opt_state, step=self.step + 1)


def _flatten(s: TrainState):
    return (s.params, s.opt_state, s.step, s.extra), (s.tx, s.placements), ("params", "opt_state", "step", "extra")


def _unflatten(static: tuple, children: tuple) -> TrainState:
    params, opt_state, step, extra = children
    tx, placements = static
    return TrainState(params=params, opt_state=opt_state, step=step, tx=tx, extra=extra, placements=placements)


optree.register_pytree_node(TrainState, _flatten, _unflatten, namespace="sharded")
primitives.register("update", apply_optimizer)
