"""`value_and_grad` and `grad` over a pytree of tensors.

    loss, grads = sharded.value_and_grad(loss_fn)(params, batch)

differentiates `loss_fn` with respect to its first argument and returns grads with the
params' structure. Plain torch autograd does the work: each param leaf becomes a fresh
leaf tensor that requires grad, the loss is backpropagated once, and the grads are read
off the leaves.

[Note: grad passes] Transforms that act during backward (data_parallel's bucketed
all-reduce, accumulate's micro-batches) share one `GradPass` per step: the set of leaf
tensors that grads accumulate into, the scale applied to each loss before backward, and
callbacks fired when a leaf's grad is final. The handler that opens the pass owns it and
reads the grads at the end (see `grad_pass`). `accumulate` runs several backward passes
into the same leaves and marks only the last one final; `data_parallel` registers a
callback that copies each final grad into its bucket and starts the all-reduce while
backward continues. Without transforms, a pass has one final backward and no callbacks.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

import torch

from sharded import primitives
from sharded import tree as T

__all__ = ["value_and_grad", "grad", "GradPass", "grad_pass"]

Ready = Callable[[int, torch.Tensor], None]


class GradPass:
    """The leaves of one differentiation and what happens as their grads complete."""

    def __init__(self, params: Any):
        self.treespec = T.structure(params)
        self.leaves = [self._leaf(p) for p in T.leaves(params)]
        self.loss_scale = 1.0
        self.final = True
        self.on_ready: list[Ready] = []  # see `listen`
        self.finalize: Callable[[], Any] | None = None
        self.attached: dict[Any, Any] = {}
        self.ready_order: list[int] = []  # leaves in the order their final grads arrived
        self.every_pass = False  # fire on_ready on every backward, not just the final one
        self.on_pass_end: list[Callable[[], None]] = []  # after each backward
        self.held: set[int] = set()  # leaves whose grad is not final until `release` (another rank adds to it)
        self._handles: list[Any] = []

    def listen(self, ready: Ready) -> None:
        """Call `ready(i, leaf)` as each leaf's grad is final (a reducer's bucketing). The
        leaves are hooked on the first listener only: a step with none skips a hook per
        param per step (~300 on a GPT, a few ms of host time that a host-bound compiled
        step feels)."""
        self.on_ready.append(ready)
        if not self._handles:
            self._handles = [
                leaf.register_post_accumulate_grad_hook(self._hook(i)) for i, leaf in enumerate(self.leaves) if leaf.requires_grad
            ]

    def close(self) -> None:
        """Drop the hooks and everything transforms attached. The pass, its leaves and
        its reducers form reference cycles; left to Python's cyclic collector, they
        would keep a step's bucket buffers (device memory) alive for several steps."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.on_ready, self.on_pass_end, self.finalize = [], [], [], None
        self.attached.clear()
        self.leaves = []

    @staticmethod
    def _leaf(p: torch.Tensor) -> torch.Tensor:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"value_and_grad differentiates tensors; got a leaf of type {type(p).__name__}")
        return p.detach().requires_grad_(p.is_floating_point() or p.is_complex())

    def _hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(leaf: torch.Tensor) -> None:
            if i in self.held:
                return
            if self.final:
                self.ready_order.append(i)
            if self.final or self.every_pass:
                for ready in self.on_ready:
                    ready(i, leaf)

        return hook

    def release(self, i: int) -> None:
        """Leaf i's grad is complete now: fire what its final grad would have fired."""
        self.held.discard(i)
        self._hook(i)(self.leaves[i])

    def params(self) -> Any:
        return T.unflatten(self.treespec, self.leaves)

    def grads(self) -> Any:
        """The pass's grads: what a transform's `finalize` makes of them (reduced over
        ranks, say), else as accumulated on the leaves, zeros for unused params."""
        if self.finalize is not None:
            return self.finalize()
        out = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in self.leaves]
        return T.unflatten(self.treespec, out)


_current: contextvars.ContextVar[GradPass | None] = contextvars.ContextVar("sharded_grad_pass", default=None)


@contextlib.contextmanager
def grad_pass(params: Any) -> Iterator[tuple[GradPass, bool]]:
    """(pass, owner): the enclosing pass, or a new one that this caller owns.

    Only the owner reads `pass.grads()`; the others return None for grads, so that
    the grads are read once, after every transform in the chain has had its say.
    """
    existing = _current.get()
    if existing is not None:
        yield existing, False
        return
    gp = GradPass(params)
    token = _current.set(gp)
    try:
        yield gp, True
    finally:
        _current.reset(token)
        gp.close()


def _value_and_grad_impl(fn: Callable, has_aux: bool, params: Any, args: tuple, kwargs: dict) -> Any:
    with grad_pass(params) as (gp, owner):
        out = fn(gp.params(), *args, **kwargs)
        loss, aux = out if has_aux else (out, None)
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.is_floating_point()):
            raise TypeError(
                "value_and_grad needs fn to return a scalar float tensor"
                + (" as the first element of (loss, aux)" if has_aux else "; pass has_aux=True to return (loss, aux)")
            )
        (loss if isinstance(gp.loss_scale, float) and gp.loss_scale == 1.0 else loss * gp.loss_scale).backward()
        for end in gp.on_pass_end:
            end()
        value = (loss.detach(), _detach(aux)) if has_aux else loss.detach()
        return value, (gp.grads() if owner else None)


def _detach(tree: Any) -> Any:
    return T.map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


primitives.register("value_and_grad", _value_and_grad_impl)


def value_and_grad(fn: Callable, has_aux: bool = False) -> Callable:
    """`fn(params, *args) -> loss` (or `(loss, aux)`) to `(value, grads)`.

    grads has the structure of `params`; value is `loss` or `(loss, aux)`, detached.
    Transforms rewrite it (micro-batching, gradient all-reduce) through the
    "value_and_grad" primitive; the user's code stays the same.
    """

    def wrapped(params: Any, *args: Any, **kwargs: Any) -> Any:
        return primitives.bind("value_and_grad", fn, has_aux, params, args, kwargs)

    return wrapped


def grad(fn: Callable, has_aux: bool = False) -> Callable:
    """Like `value_and_grad`, returning only grads (or `(grads, aux)` with has_aux)."""
    vg = value_and_grad(fn, has_aux=has_aux)

    def wrapped(params: Any, *args: Any, **kwargs: Any) -> Any:
        value, g = vg(params, *args, **kwargs)
        return (g, value[1]) if has_aux else g

    return wrapped
