"""ZeRO-3's just-in-time params: gathered per unit before use, freed after.

[Note: stage 3 params] For one differentiation, every sharded leaf gets a full-shaped
tensor whose storage is empty until its unit is gathered. Those tensors are what the
loss (and autograd) see. shard_zero's handler of the "block" primitive drives the
schedule, in the static order of `model.blocks`:

  before block u runs          gather u (wait if prefetched), start gathers of the
                               next `prefetch` units
  after block u ran            free u (reshard_after_forward), and hook u's outputs
  grad of u's outputs ready    gather u again for its backward, prefetch the units
                               before it
  all grads of u final         (GradReducer) reduce-scatter u's grads, free u

The embedding and head units (params outside any block) are gathered when the forward
starts and kept until the step's grads are reduced. Writes go through `.data` aliases,
which share the storage but not autograd's version counter, so refilling a tensor that
autograd saved for backward is not an in-place modification in its eyes. Every rank
runs the same hooks in the same order, so the collectives line up.
"""
from __future__ import annotations

import contextvars
from typing import Any, Sequence

import torch

from sharded import tree as T
from sharded.transforms._flat import FlatGroup

__all__ = ["Gatherer", "current"]

_current: contextvars.ContextVar[Gatherer | None] = contextvars.ContextVar("sharded_stage3", default=None)


def current() -> Gatherer | None:
    return _current.get()


def _free(x: torch.Tensor) -> None:
    x.untyped_storage().resize_(0)


class Gatherer:
    """The full-shaped params of one differentiation (on `device`, in `dtype`, else the
    chunks' own) and the state of each unit. The chunks may live on another tier."""

    def __init__(
        self,
        chunks: Sequence[torch.Tensor],
        shapes: Sequence[torch.Size],
        sharded: Sequence[bool],
        group: Any,
        prefetch: int,
        reshard_after_forward: bool,
        device: torch.device,
        dtype: torch.dtype | None = None,
    ):
        self.chunks, self.group = chunks, group
        self.prefetch, self.reshard_after_forward = prefetch, reshard_after_forward
        self.full = [
            torch.empty(shape, dtype=dtype or c.dtype, device=device) if s else c for c, shape, s in zip(chunks, shapes, sharded)
        ]
        self.writers = [x.data for x in self.full]
        for x, s in zip(self.full, sharded):
            if s:
                _free(x)
        self.units: Sequence[FlatGroup | None] | None = None
        self.inflight: dict[int, tuple[torch.Tensor, Any]] = {}

    def bind_units(self, units: Sequence[FlatGroup | None], is_block: Sequence[bool]) -> None:
        """The gather units (one per traced block, in order) and which are hooked blocks."""
        self.units, self.is_block = units, is_block
        self.gathered = [u is None for u in units]  # a unit without sharded params is always ready

    def __enter__(self) -> Gatherer:
        self._token = _current.set(self)
        self._context = contextvars.copy_context()  # for gathers from autograd's threads (see _start)
        return self

    def __exit__(self, *exc: Any) -> None:
        _current.reset(self._token)
        for pending in list(self.inflight):
            self._finish(pending)  # no collective is left unwaited
        for u in range(len(self.units or ())):
            self.free(u)
        # Hooks on this pass's activations may keep the gatherer reachable for a while;
        # drop its tensors now so the step's state can be freed when the caller drops it.
        self.chunks = self.full = self.writers = ()
        self.grad_pass = None

    def _start(self, u: int) -> None:
        if 0 <= u < len(self.units) and not self.gathered[u] and u not in self.inflight:
            unit = self.units[u]
            # in the step's context, as backward's regathers run on autograd's thread on GPU: a
            # gather binds "fetch" for chunks on another tier (see [Note: reduce in context])
            self.inflight[u] = self._context.run(unit.gather, [self.chunks[i] for i in unit.leaves], self.group, True)

    def _finish(self, u: int) -> None:
        rows, pending = self.inflight.pop(u)
        pending.wait()
        unit = self.units[u]
        writers = [self.writers[i] for i in unit.leaves]
        for w in writers:
            w.untyped_storage().resize_(w.numel() * w.element_size())
        unit.read_all(rows, writers)
        self.gathered[u] = True

    def ensure(self, u: int, step: int = 1) -> None:
        """Unit u gathered; the next `prefetch` units (in direction `step`) on their way."""
        self._start(u)
        for d in range(1, self.prefetch + 1):
            self._start(u + d * step)
        if u in self.inflight:
            self._finish(u)

    def ensure_roots(self) -> None:
        for u, block in enumerate(self.is_block):
            if not block:
                self.ensure(u, step=0)

    def free(self, u: int) -> None:
        if self.gathered[u] and self.units[u] is not None:
            for i in self.units[u].leaves:
                _free(self.full[i])
            self.gathered[u] = False

    def after_forward(self, u: int, output: Any) -> None:
        if not torch.is_grad_enabled():
            self.free(u)
            return
        if self.reshard_after_forward:
            self.free(u)
        needs_grad = [x for x in T.leaves(output) if isinstance(x, torch.Tensor) and x.requires_grad]
        fired = [False]

        def before_backward(grad: torch.Tensor) -> None:
            if not fired[0]:
                fired[0] = True
                self.ensure(u, step=-1)

        for x in needs_grad:
            x.register_hook(before_backward)
