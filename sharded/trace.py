"""`trace(module) -> Model`: a module as a pure function over a parameter pytree.

    model = sharded.trace(gpt)
    logits = model.apply(model.params, idx)      # == gpt(idx), touches no module state

`model.params` is a flat dict {state_dict name: tensor} (a pytree); a weight tied under
several names (embedding and head) appears once, under its first name, and
`model.tied` maps every other name to it, so the tie survives any transform that
rebuilds the params. `model.blocks` are the ordered units (embedding, each block, head)
that sharding, pipelining, offload and remat work on.

[Note: the block primitive] While `model.apply` runs, each block module's forward binds
the "block" primitive with the block's own params and buffers (by their names in the
model) and its inputs; with no handler it runs the block. Block-level work (ZeRO-3's
gather and free, pipeline boundaries, casts, remat) is a handler of that one primitive,
run in the step's canonical order. The binding is installed on the module for the
duration of the call and removed after, so the user's module is never left changed. A
handler may call the rest of the chain later (remat recomputes in backward) or with
other tensors (a cast): the implementation then runs the block's own forward with the
params it is given swapped in (as `functional_call` does), so a block is a pure
function of (params, inputs) whenever it runs. Both swaps go through `Model._slots`,
resolved once, not through every dotted name on each call.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import weakref
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from sharded import comm, primitives, tree

__all__ = ["Block", "BlockCall", "Model", "trace", "model_of", "laying_out", "model_laid_out"]


@dataclasses.dataclass(frozen=True)
class Block:
    """One unit of the model: its module path and the params it owns (state_dict names)."""

    name: str
    params: tuple[str, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    module: nn.Module
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    blocks: tuple[Block, ...]
    tied: dict[str, str]

    def __post_init__(self) -> None:
        _traced[frozenset(self.params)] = self

    def __reduce__(self) -> tuple:
        # Rebuilt through __init__, so a model sent to another rank is found there too.
        return (Model, (self.module, self.params, self.buffers, self.blocks, self.tied))

    def with_buffers(self, buffers: dict[str, torch.Tensor]) -> Model:
        """This model with other buffers (a transform's view of it); unlike a new Model,
        it is not what `model_of` finds for these params."""
        view = object.__new__(Model)
        for f in dataclasses.fields(self):
            object.__setattr__(view, f.name, buffers if f.name == "buffers" else getattr(self, f.name))
        return view

    @torch.compiler.disable
    def apply(self, params: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """The module's forward with `params` (and `model.buffers`) in place of its own state.
        A graph break under `torch.compile`: the transforms' work around the model runs
        eagerly, and what compiles inside it (sharded.compile's graphs) compiles on its own."""
        return primitives.bind("apply", self, params, args, kwargs)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @functools.cached_property
    def block_modules(self) -> tuple[tuple[int, nn.Module, tuple[str, ...], tuple[str, ...]], ...]:
        """(index in `blocks`, module, param names, buffer names) of every block that is a
        module (not the "<embed>"/"<head>" groups), names as the model has them."""
        out = []
        for i, block in enumerate(self.blocks):
            if block.name.startswith("<"):
                continue
            module = self.module.get_submodule(block.name)
            prefix = block.name + "."
            params = tuple(prefix + n for n, _ in module.named_parameters(remove_duplicate=False))
            buffers = tuple(prefix + n for n, _ in module.named_buffers(remove_duplicate=False))
            out.append((i, module, params, buffers))
        return tuple(out)

    @functools.cached_property
    def _slots(self) -> dict[str, tuple[dict, str]]:
        """Where each param and buffer lives, by every name the module has for it (tied
        and block names included): its submodule's `_parameters` or `_buffers` and its key
        there, what `model.apply` and a block swap tensors into (see `_swapped`)."""
        out = {}
        for path, module in self.module.named_modules(remove_duplicate=False):
            prefix = path + "." if path else ""
            for store in (module._buffers, module._parameters):
                out.update((prefix + key, (store, key)) for key in store)
        return out

    @functools.cached_property
    def block_params(self) -> frozenset[str]:
        """The names of every param some block module owns (the rest: embedding, head, ...)."""
        return frozenset(n for _, _, names, _ in self.block_modules for n in names)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockCall:
    """The "block" primitive's first argument: which block runs, in which model view."""

    model: Model  # the model being applied (or a transform's view of it)
    index: int  # the block's position in `model.blocks`
    module: nn.Module
    forward: Callable  # the module's own forward

    @property
    def name(self) -> str:
        return self.model.blocks[self.index].name


def under_torch_func(params: Any) -> bool:
    """Whether params (a block's dict, or any tree) reach us inside torch.func's own
    transforms (vmap, grad, jvp in the step's code): they are then functorch's wrapped
    tensors, and handlers that change how the code runs (a checkpoint, a compiled graph)
    leave it as it is."""
    return any(isinstance(p, torch.Tensor) and comm.is_functorch_wrapped(p) for p in tree.leaves(params))


# The traced models of this process by their param names: how a transform whose
# layout depends on the blocks (pipeline) finds them from a state's params at init.
_traced: "weakref.WeakValueDictionary[frozenset, Model]" = weakref.WeakValueDictionary()


def model_of(params: Any) -> Model | None:
    """The traced model whose params have exactly these names (None if none is alive)."""
    return _traced.get(frozenset(params)) if isinstance(params, dict) else None



_laid_out: contextvars.ContextVar[Model | None] = contextvars.ContextVar("sharded_laid_out", default=None)


@contextlib.contextmanager
def laying_out(params: Any) -> Iterator[None]:
    """While a Step lays out a state: the traced model of its whole params, which an
    init that runs after another transform has cut them (a pipeline stage's share)
    still needs (`model_laid_out`)."""
    token = _laid_out.set(model_of(params))
    try:
        yield
    finally:
        _laid_out.reset(token)


def model_laid_out() -> Model | None:
    """The traced model of the state a Step is laying out now (None: none, or not traced)."""
    return _laid_out.get()


_in_place: contextvars.ContextVar[Any] = contextvars.ContextVar("sharded_block_params_in_place", default=None)


@contextlib.contextmanager
def _blocks_bound(model: Model, named: dict[str, torch.Tensor]) -> Iterator[None]:
    """Each block's forward binds "block" (see [Note: the block primitive])."""
    own = []
    for index, module, param_names, buffer_names in model.block_modules:
        forward = module.__dict__.get("forward")
        own.append((module, forward))
        call = BlockCall(model, index, module, forward or module.forward)
        module.forward = _binding(call, named, param_names, buffer_names)
    try:
        yield
    finally:
        for module, forward in own:
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _binding(call: BlockCall, named: dict, param_names: tuple[str, ...], buffer_names: tuple[str, ...]) -> Callable:
    def forward(*args: Any, **kwargs: Any) -> Any:
        params = {n: named[n] for n in param_names}
        buffers = {n: call.model.buffers[n] for n in buffer_names}
        token = _in_place.set(params)
        try:
            return primitives.bind("block", call, params, buffers, args, kwargs)
        finally:
            _in_place.reset(token)

    return forward


@contextlib.contextmanager
def _swapped(model: Model, named: dict[str, torch.Tensor]) -> Iterator[None]:
    """The module with `named` ({model name: tensor}) in place of its own tensors for the
    body, as `functional_call` (tie_weights=False) has it, through `model._slots`: a dict
    store per name, not a path walked. The old tensors go back last in, first out, so a
    slot two names reach (a submodule registered twice) ends as it was. A name the
    module has no param or buffer for goes through torch's own swap, as before."""
    slots = model._slots
    if not named.keys() <= slots.keys():
        with comm.reparametrize(model.module, named):
            yield
        return
    old = []
    try:
        for name, tensor in named.items():
            store, key = slots[name]
            old.append((store, key, store[key]))
            store[key] = tensor
        yield
    finally:
        for store, key, tensor in reversed(old):
            store[key] = tensor


def _block_impl(call: BlockCall, params: dict, buffers: dict, args: tuple, kwargs: dict) -> Any:
    if _in_place.get() is params:  # inside the model's forward, with the params it set: run as is
        return call.forward(*args, **kwargs)
    # The block's own forward on these tensors: not module(...), whose forward is the
    # binding while the model runs, and whose hooks ran already.
    with _swapped(call.model, {**buffers, **params}):
        return call.forward(*args, **kwargs)


primitives.register("block", _block_impl)


def _apply_impl(model: Model, params: dict, args: tuple, kwargs: dict) -> Any:
    missing = model.params.keys() - params.keys()
    if missing:
        raise KeyError(
            f"model.apply got params without {sorted(missing)[:3]}; pass the full tree "
            "(`step.gather(state)` reassembles a sharded one)"
        )
    # Every tied name is passed explicitly (its canonical tensor unless the caller gave
    # it its own), so a transform can hand one name a placeholder and the other the
    # weight (pipeline: the embedding on the first stage, the head on the last).
    named = {**{alias: params[canonical] for alias, canonical in model.tied.items()}, **params}
    with _blocks_bound(model, named), _swapped(model, {**model.buffers, **named}):
        return model.module(*args, **kwargs)


primitives.register("apply", _apply_impl)


def _tied_names(module: nn.Module) -> dict[str, str]:
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        canonical = first.setdefault(id(p), name)
        if canonical != name:
            tied[name] = canonical
    return tied


def _largest_module_list(module: nn.Module) -> tuple[str, nn.ModuleList] | None:
    lists = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    return max(lists, key=lambda nm: len(nm[1]), default=None)


def _block_paths(module: nn.Module, blocks: Sequence[str] | None) -> list[str]:
    """Module paths of the units, in order; '' marks params outside every named unit."""
    modules = dict(module.named_modules())
    if blocks is not None:
        unknown = [b for b in blocks if b not in modules]
        if unknown:
            some = [n for n in modules if n][:8]
            raise ValueError(
                f"trace(blocks=...) names {unknown!r}, which the module does not have; "
                f"block names are module paths such as {some}"
            )
        return list(blocks)
    found = _largest_module_list(module)
    if found is not None:
        prefix, mlist = found
        return [f"{prefix}.{i}" for i in range(len(mlist))]
    if isinstance(module, nn.Sequential):
        return [n for n, _ in module.named_children()]
    return []


def _group_params(param_names: list[str], block_paths: list[str]) -> tuple[Block, ...]:
    """Assign params to units, in registration order: each named block; params before
    the first block form the "<embed>" unit, params after the last the "<head>" unit,
    and params between two blocks join the block before them."""
    owner: dict[str, str] = {}
    for path in block_paths:
        for name in param_names:
            if name.startswith(path + ".") and name not in owner:
                owner[name] = path
    last_owned = max((i for i, n in enumerate(param_names) if n in owner), default=-1)
    units: dict[str, list[str]] = {}
    current = "<embed>"
    for i, name in enumerate(param_names):
        if name in owner:
            current = owner[name]
        elif i > last_owned:
            current = "<head>"
        units.setdefault(current, []).append(name)
    order = ["<embed>"] + [p for p in block_paths] + ["<head>"]
    return tuple(Block(u, tuple(units[u])) for u in order if u in units)


def trace(module: nn.Module, blocks: Sequence[str] | None = None) -> Model:
    """Split `module` into (pure function, params pytree, buffers, blocks).

    blocks: module paths of the units (e.g. ``["h.0", "h.1"]``); by default the entries
    of the largest ``nn.ModuleList``, else the children of an ``nn.Sequential``.
    The params are the module's own tensors (no copy): ``model.apply`` never mutates them.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"trace expects an nn.Module, got {type(module).__name__}")
    params = {n: p.detach() for n, p in module.named_parameters()}
    buffers = {n: b for n, b in module.named_buffers()}
    units = _group_params(list(params), _block_paths(module, blocks))
    return Model(module, params, buffers, units, _tied_names(module))
