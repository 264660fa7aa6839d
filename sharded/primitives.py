"""The few operations a step performs that transforms may rewrite.

A user's step calls `model.apply`, `sharded.value_and_grad` and
`state.apply_gradients`; each of those *binds* a primitive here. With no transform
active, `bind` runs the primitive's implementation. While a `Step` runs, its transforms
are on a stack in the canonical order (`sharded.step.Level`) and `bind` passes the call
through their handlers from the outermost in, each receiving `next` to call the rest of
the chain — the way JAX's interpreters rewrite `jit(vmap(f))` without the user's code
changing. A transform's handler of one primitive may sit elsewhere in the order than
its `level` (`Transform.levels`: offload lays out state outermost but runs the
optimizer innermost); each primitive's chain is sorted once per step.

Primitives, with the arguments their handlers receive after `next`:
  "apply"          (model, params, args, kwargs): the model's forward
  "block"          (call, params, buffers, args, kwargs): one block's forward, bound by
                   `model.apply` for every block (see [Note: the block primitive] in trace.py)
  "value_and_grad" (fn, has_aux, params, args, kwargs): a differentiation
  "reduce_grads"   (bucket): one bucket of grads over a group (see sharded/reduce.py)
  "fetch"          (chunks, device): param chunks on another tier (offload's host
                   memory) copied to the device before ZeRO-3 gathers them
  "update"         (tx, grads, opt_state, params): the optimizer step
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator

__all__ = ["bind", "register", "active", "handling", "step_state", "binding"]

_impls: dict[str, Callable[..., Any]] = {}
_stack: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar("sharded_transforms", default=())
_chains: contextvars.ContextVar[dict[str, list]] = contextvars.ContextVar("sharded_chains", default={})
_state: contextvars.ContextVar[Any] = contextvars.ContextVar("sharded_step_state", default=None)
_binding: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("sharded_binding", default=frozenset())


def register(name: str, impl: Callable[..., Any]) -> None:
    """Set the plain (untransformed) implementation of primitive `name`."""
    _impls[name] = impl


def active() -> tuple[Any, ...]:
    """The transforms handling primitives now, outermost first."""
    return _stack.get()


def step_state() -> Any:
    """The state the running step was called with (None outside a step): where a
    handler reads what its transform keeps in the state, such as a loss scale."""
    return _state.get()


@contextlib.contextmanager
def handling(transforms: tuple[Any, ...], state: Any = None) -> Iterator[None]:
    """Run the body with `transforms` (outermost first) handling every bind."""
    token, state_token, chains_token = _stack.set(transforms), _state.set(state), _chains.set(_by_primitive(transforms))
    try:
        yield
    finally:
        _stack.reset(token)
        _state.reset(state_token)
        _chains.reset(chains_token)


def _by_primitive(transforms: tuple[Any, ...]) -> dict[str, list]:
    """{primitive: its handlers' transforms, outermost first}: by each one's level for
    that primitive (its `levels` entry, else its `level`); ties keep the given order."""
    chains: dict[str, list] = {}
    for t in transforms:
        for name in t.handlers:
            chains.setdefault(name, []).append(t)
    for name, chain in chains.items():
        chain.sort(key=lambda t: getattr(t, "levels", {}).get(name, getattr(t, "level", 0)))
    return chains


def binding(name: str) -> bool:
    """Whether primitive `name` is being bound now (its handlers or implementation run)."""
    return name in _binding.get()


def bind(name: str, *args: Any) -> Any:
    """Call primitive `name` through the active transforms' handlers."""
    chain = _chains.get().get(name, [])
    outer = _binding.get()
    if name not in outer:
        token = _binding.set(outer | {name})
        try:
            return _call(chain, name, args)
        finally:
            _binding.reset(token)
    return _call(chain, name, args)


def _call(chain: list, name: str, args: tuple) -> Any:
    return _from(chain, name, 0, *args)


def _from(chain: list, name: str, i: int, *args: Any) -> Any:
    """The chain from handler `i` in; each handler's `next` a partial of this, which,
    unlike a closure calling itself, leaves no reference cycle for the garbage
    collector per bind."""
    if i == len(chain):
        # Inner calls (e.g. the loss's own model.apply) see the full stack again.
        return _impls[name](*args)
    return chain[i].handlers[name](functools.partial(_from, chain, name, i + 1), *args)
