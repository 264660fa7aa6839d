"""Replaying the blocks before a pipeline chunk from their recorded output structure.

On pp rank r, a forward through chunk k > 0 calls the user's whole loss function, so
the blocks of chunks before k run on meta tensors (see [Note: pipeline forward] in
pipeline.py). They only give chunk k's first block its inputs' structure: that block
swaps every tensor among its inputs for the ones received. A block's meta forward runs
through Python decompositions, ~15 ms per GPT-1.3B block on an H200 host, so 12 such
blocks per micro-batch made the pipelined step host-bound (1.2 s of host time per step
against 0.3 s of GPU compute). A block's output structure depends only on its inputs'
structure, shapes and dtypes, so it is computed once per input signature and replayed.
"""
from __future__ import annotations

from typing import Any, Callable

import optree
import torch

__all__ = ["ShapeReplay"]


class ShapeReplay:
    """Per block and input signature, the recorded output recipe: each output tensor is
    one of the inputs (kept by identity, so a mask a block passes along stays the object
    later blocks see) or a meta tensor of the recorded shape."""

    def __init__(self) -> None:
        self._recipes: dict[tuple, tuple[Any, list[tuple[bool, Any]]]] = {}

    def call(self, path: str, forward: Callable[[tuple, dict], Any], args: tuple, kwargs: dict) -> Any:
        """`forward(args, kwargs)` of block `path` on meta inputs, run once per input
        signature and replayed from its recorded output after."""
        leaves, spec = optree.tree_flatten((args, kwargs), namespace="sharded")
        key = (path, spec, tuple(_signature(x) for x in leaves))
        try:
            recipe = self._recipes.get(key)
        except TypeError:  # an unhashable non-tensor argument: no replay
            return forward(args, kwargs)
        if recipe is None:
            out = forward(args, kwargs)
            self._recipes[key] = _recipe(out, leaves)
            return out
        out_spec, parts = recipe
        return out_spec.unflatten([leaves[v] if from_input else v for from_input, v in parts])


def _signature(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.device.type)
    return x


def _recipe(out: Any, inputs: list) -> tuple[Any, list[tuple[bool, Any]]]:
    position = {id(x): i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)}
    leaves, spec = optree.tree_flatten(out, namespace="sharded")
    parts = []
    for x in leaves:
        if isinstance(x, torch.Tensor) and id(x) in position:
            parts.append((True, position[id(x)]))
        else:
            parts.append((False, torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x))
    return spec, parts
