"""`data_parallel()`: replicas on the mesh's dp axis, grads all-reduced in buckets during backward.

Reference semantics (equal to the plain step on the global batch, up to the order of
float additions):

    rank r computes value_and_grad on rows [r*B/N, (r+1)*B/N) of the global batch
    grads = mean over ranks (all-reduce, started bucket by bucket as backward produces them)
    loss and float metrics = mean over ranks, so every rank returns the global values

Each rank holds full params and optimizer state (use `shard_zero` to shard them). It is
ZeRO that shards nothing: the grads go through the same reducer as `shard_zero`'s (see
[Note: DP buckets] in _reduce.py), in groups of one rank, each bucket all-reduced by
the "reduce_grads" primitive as soon as its grads are final, and returned as views of
the buckets. With `accumulate`, grads are reduced once per update, during the last
micro-batch's backward.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from sharded import tree as T
from sharded.mesh import Mesh
from sharded.step import Capability, Level, Op, ProgramInfo, Transform, transform
from sharded.transforms._batch import rank_rows
from sharded.transforms._flat import FlatGroup, plan_group
from sharded.transforms._reduce import GradReducer, ReadyOrder, broadcast_from_first, plan_buckets, reduce_during_backward

__all__ = ["data_parallel"]


class DataParallel(Transform):
    name = "data_parallel"
    level = Level.PARALLEL
    capabilities = Capability.SPLITS_ROWS | Capability.REDUCES_GRADS

    def __init__(self, bucket_mb: float = 25.0, mesh: Mesh | None = None, axis: str = "dp"):
        if not bucket_mb > 0:
            raise ValueError(f"data_parallel(bucket_mb=...) must be positive; got {bucket_mb!r}")
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.mesh, self.axis = mesh, axis
        self.handlers = {"value_and_grad": self._value_and_grad}
        self._plans: dict[Any, list[FlatGroup]] = {}
        self._order = ReadyOrder()

    def describe(self) -> str:
        return f"data_parallel({self.axis}={self._mesh().size(self.axis)})"

    def _mesh(self) -> Mesh:
        return self.mesh if self.mesh is not None else Mesh.current()

    def init(self, state: Any) -> Any:
        """Make every replica start from dp rank 0's state."""
        broadcast_from_first(state, self._mesh().group(self.axis))
        return state

    def _plan(self, leaves: list[torch.Tensor]) -> list[FlatGroup]:
        key = tuple((x.shape, x.dtype, x.device) for x in leaves)
        order = self._order.get(key)
        if (key, order is None) not in self._plans:
            buckets = plan_buckets(leaves, self.bucket_bytes, order)
            self._plans[(key, order is None)] = [plan_group(f"bucket {b}", k.leaves, leaves, 1) for b, k in enumerate(buckets)]
        return self._plans[(key, order is None)]

    def _value_and_grad(self, next_: Callable, fn: Callable, has_aux: bool, params: Any, args: tuple, kwargs: dict) -> Any:
        mesh = self._mesh()
        size, group = mesh.size(self.axis), mesh.group(self.axis)
        if size == 1:
            return next_(fn, has_aux, params, args, kwargs)
        local = rank_rows(args, size, mesh.rank(self.axis), who="data_parallel")
        make = lambda gp: GradReducer(gp.leaves, self._plan(gp.leaves), group, 0, scatter=False, scale=1.0 / size)  # noqa: E731
        learn = lambda gp: self._order.learn(tuple((x.shape, x.dtype, x.device) for x in gp.leaves), gp, group)  # noqa: E731
        return reduce_during_backward(self, make, next_, fn, has_aux, params, local, kwargs, group, size, learn)

    def explain(self, program: list[Op], info: ProgramInfo) -> list[Op]:
        size = self._mesh().size(self.axis)
        if size == 1:
            return program
        buckets = self._plan(T.leaves(info.params))
        names = [p for p, _ in T.leaves_with_paths(info.params)]
        r = self._mesh().rank(self.axis) if info.world_size == 1 else info.rank % size
        out = [Op("data", "slice batch", f"rows {r}/{size} of the global batch (dp rank {r})")]
        for op in program:
            out.append(op)
            if _contains_backward(op):
                where = "the last micro-batch's backward" if op.kind == "repeat" else "backward"
                for b, bucket in enumerate(buckets):
                    span = f"{names[bucket.leaves[0]]} .. {names[bucket.leaves[-1]]}"
                    out.append(
                        Op(
                            "collective",
                            f"all_reduce bucket {b}",
                            f"{len(bucket.leaves)} grads {span}, {str(bucket.dtype).removeprefix('torch.')}, over dp={size}",
                            nbytes=bucket.size * torch.empty((), dtype=bucket.dtype).element_size(),
                            overlaps=where if b < len(buckets) - 1 else "",
                        )
                    )
                out.append(Op("collective", "wait buckets; all_reduce loss and metrics", "grads are views of the buckets, pre-scaled by 1/%d" % size))
        return out


def _contains_backward(op: Op) -> bool:
    return op.name == "backward" or any(_contains_backward(o) for o in op.body)


data_parallel = transform(DataParallel)
