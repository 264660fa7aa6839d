"""The "reduce_grads" primitive: one bucket of grads reduced over a group of ranks.

`data_parallel` and `shard_zero` bind it for every bucket of grads they fill during
backward (see sharded/transforms/_reduce.py); a transform that changes how grads travel
(compressed communication, say) handles it, without knowing which transform bound it.
The bucket's grads are already scaled (the mean's 1/N is folded into the copy-in), so
every reduction here is a sum.

[Note: reduce in context] Buckets start from autograd's hooks, which run on autograd's
own threads on GPU, where the step's context variables (the transform stack, the step's
state) are not set. A reducer therefore captures the context it was made in and binds
each bucket inside it (`bind_in`), so the handlers run on every device alike.
"""
from __future__ import annotations

import contextvars
import dataclasses
import enum
from typing import Any, Callable

import torch

from sharded import comm, primitives

__all__ = ["GradBucket", "Reduction", "reduce_grads", "bind_in"]


class Reduction(enum.Enum):
    ALL_REDUCE = "all_reduce"  # every rank gets the whole sum, in `grads`
    REDUCE_SCATTER = "reduce_scatter"  # each rank gets its row of the sum, in `out`


@dataclasses.dataclass(frozen=True, eq=False)
class GradBucket:
    """What one reduction moves: `grads` (flat) over `group`, the result in `out`."""

    name: str
    grads: torch.Tensor
    out: torch.Tensor  # `grads` itself for ALL_REDUCE; this rank's row for REDUCE_SCATTER
    reduction: Reduction
    group: Any
    layout: Any = None  # the `FlatGroup` of `grads`: which param leaves, where (None: not param grads)
    final: bool = False  # `out` is these leaves' grads as the update gets them: no later reduction adds to it
    # A final bucket's handler may move the result elsewhere (offload: to host memory) and
    # free `out`: take(rows, ready) says the grads are now `rows` (out's size and dtype),
    # valid once the CUDA event `ready` (None: at once) has completed.
    take: Callable[[torch.Tensor, Any], None] | None = None


def _reduce_impl(bucket: GradBucket) -> comm.Pending:
    with comm.tagged("reduce_grads"):
        if bucket.reduction is Reduction.ALL_REDUCE:
            return comm.all_reduce(bucket.grads, group=bucket.group, async_op=True)
        return comm.reduce_scatter_tensor(bucket.out, bucket.grads, group=bucket.group, async_op=True)


primitives.register("reduce_grads", _reduce_impl)


def reduce_grads(bucket: GradBucket) -> comm.Pending:
    """Start the bucket's reduction through the active transforms; wait on the result."""
    return primitives.bind("reduce_grads", bucket)


def bind_in(context: contextvars.Context, bucket: GradBucket) -> comm.Pending:
    """`reduce_grads(bucket)` in `context` (see [Note: reduce in context])."""
    return context.run(reduce_grads, bucket)
