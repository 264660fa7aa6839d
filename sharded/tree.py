"""Pytree helpers over optree, with torch tensors as leaves.

Every structure in sharded (params, grads, optimizer state, a whole TrainState) is a
pytree; these are the few operations the rest of the library needs on them.
`None` is a leaf-less node, as in optree and JAX.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

import optree
import torch
from optree.integrations.torch import tree_ravel

__all__ = [
    "map",
    "leaves",
    "leaves_with_paths",
    "structure",
    "unflatten",
    "path_str",
    "global_norm",
    "sharded_over",
    "copies_of",
    "reduction_groups",
    "ravel",
    "zeros_like",
    "tree_bytes",
]

PyTree = Any
_NS = "sharded"


def map(fn: Callable, tree: PyTree, *rest: PyTree) -> PyTree:  # noqa: A001 - mirrors jax.tree.map
    """Apply `fn` leafwise over one or more trees of the same structure."""
    return optree.tree_map(fn, tree, *rest, namespace=_NS)


def leaves(tree: PyTree) -> list:
    return optree.tree_leaves(tree, namespace=_NS)


def structure(tree: PyTree):
    return optree.tree_structure(tree, namespace=_NS)


def unflatten(treespec, leaves_: list) -> PyTree:
    return optree.tree_unflatten(treespec, leaves_)


def path_str(path: tuple) -> str:
    """`('blocks', 3, 'w')` -> `"['blocks'][3]['w']"`: how errors name a leaf."""
    return "".join(f"[{k!r}]" for k in path)


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    """[(path string, leaf)] in flatten order, for error messages and selection."""
    paths, leaves_, _ = optree.tree_flatten_with_path(tree, namespace=_NS)
    return [(path_str(p), x) for p, x in zip(paths, leaves_)]


_sharded_over: contextvars.ContextVar[tuple[tuple[Any, frozenset[int]], ...]] = contextvars.ContextVar(
    "sharded_tree_sharded_over", default=()
)


@contextlib.contextmanager
def sharded_over(group: Any, counted_elsewhere: Any = ()) -> Iterator[None]:
    """Within the block, trees hold this rank's part of leaves split over `group`:
    reductions such as `global_norm` sum over the group, so `clip_by_global_norm` inside
    a ZeRO or pipeline optimizer step clips by the norm of the whole gradient. Blocks
    nest (a pipeline stage's ZeRO shards: sums over dp, then over pp). Leaves in
    `counted_elsewhere` (a tied weight that another stage holds too) are left out of
    this rank's part, so they count once."""
    token = _sharded_over.set(_sharded_over.get() + ((group, frozenset(map(id, counted_elsewhere))),))
    try:
        yield
    finally:
        _sharded_over.reset(token)


@contextlib.contextmanager
def copies_of(pairs: Any) -> Iterator[None]:
    """Within the block, the copy of a leaf that `sharded_over` leaves out is left out
    too: for each (leaf, copy) of `pairs` (offload hands the optimizer host copies of the
    grads, and a tied weight's grad must still count once in `global_norm`)."""
    skip = frozenset().union(*(s for _, s in _sharded_over.get()))
    with sharded_over(None, [copy for leaf, copy in pairs if id(leaf) in skip]):
        yield


def reduction_groups() -> list[Any]:
    """The groups that tree reductions sum over now ([]: this process's trees are whole)."""
    return [g for g, _ in _sharded_over.get() if g is not None]


def global_norm(tree: PyTree) -> torch.Tensor:
    """sqrt(sum of squares) over every leaf, accumulated in fp32 or wider (over every
    rank's part inside `sharded_over`)."""
    scopes = _sharded_over.get()
    skip = frozenset().union(*(s for _, s in scopes))
    xs = [x for x in leaves(tree) if isinstance(x, torch.Tensor) and id(x) not in skip]
    if not xs and not scopes:
        return torch.zeros(())
    norms = torch._foreach_norm([x.float() if x.element_size() < 4 else x for x in xs])
    square = torch.stack(norms).square().sum() if norms else torch.zeros((), dtype=torch.float32)
    if scopes:
        from sharded import comm

        for group in reduction_groups():
            comm.all_reduce(square, group=group)
    return square.sqrt()


def ravel(tree: PyTree) -> tuple[torch.Tensor, Callable[[torch.Tensor], PyTree]]:
    """Flatten every tensor leaf into one 1-D buffer; returns (flat, unravel)."""
    return tree_ravel(tree, namespace=_NS)


def zeros_like(tree: PyTree, dtype: torch.dtype | None = None) -> PyTree:
    return map(lambda x: torch.zeros_like(x, dtype=dtype), tree)


def tree_bytes(tree: PyTree) -> int:
    """Bytes held by the tensor leaves (local storage only)."""
    return sum(x.numel() * x.element_size() for x in leaves(tree) if isinstance(x, torch.Tensor))
