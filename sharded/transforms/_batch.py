"""Splitting a batch (any pytree of tensors) along its leading dimension."""
from __future__ import annotations

from typing import Any

import torch

from sharded import tree as T


def rows(batch: Any) -> int | None:
    """The leading size shared by the batch's tensor leaves (None if it has none)."""
    sizes = {x.shape[0] for x in T.leaves(batch) if isinstance(x, torch.Tensor) and x.ndim}
    return sizes.pop() if len(sizes) == 1 else None


def split(batch: Any, parts: int, who: str, fix: str) -> list[Any]:
    """`parts` equal row-slices (views) of every tensor leaf with a leading dimension.

    Leaves without one (scalars, Python values) are passed to every part unchanged.
    """
    if parts == 1:
        return [batch]
    for path, x in T.leaves_with_paths(batch):
        if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] % parts:
            raise ValueError(
                f"{who}: batch leaf {path or 'batch'} has {x.shape[0]} rows, which do not split into "
                f"{parts} equal parts; {fix}"
            )

    def part(i: int) -> Any:
        def cut(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.ndim:
                n = x.shape[0] // parts
                return x[i * n : (i + 1) * n]
            return x

        return T.map(cut, batch)

    return [part(i) for i in range(parts)]


def rank_rows(batch: Any, ranks: int, rank: int, who: str) -> Any:
    """This rank's equal share of the global batch's rows (data parallelism)."""
    fix = f"use a global batch that is a multiple of {ranks} ranks × micro-batches (drop or pad the last batch)"
    return split(batch, ranks, who=f"{who} over {ranks} ranks", fix=fix)[rank]


def mean_floats(values: list[Any]) -> Any:
    """Average the floating tensor leaves of equal-structured trees; others from the last."""

    def avg(*xs: Any) -> Any:
        if isinstance(xs[0], torch.Tensor) and xs[0].is_floating_point():
            return torch.stack(xs).mean(0)
        return xs[-1]

    return T.map(avg, *values)
