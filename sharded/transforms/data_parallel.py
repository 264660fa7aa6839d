"""`data_parallel()`: replicas on the mesh's dp axis, grads all-reduced in buckets during backward.

Reference semantics (equal to the plain step on the global batch, up to the order of
float additions):

    rank r computes value_and_grad on rows [r*B/N, (r+1)*B/N) of the global batch
    grads = mean over ranks (all-reduce, started bucket by bucket as backward produces them)
    loss and float metrics = mean over ranks, so every rank returns the global values

Each rank holds full params and optimizer state (use `shard_zero` to shard them).
Stacks with `accumulate` on either side: outside it, grads are reduced once per update
during the last micro-batch's backward.

[Note: DP buckets] Leaves are packed, in reverse registration order (roughly the order
backward produces them), into flat buckets of at most `bucket_mb` MiB of one dtype and
device. When a leaf's grad is final, it is copied into its bucket slot with the 1/N
scale fused into the copy, and the leaf's own grad is freed. A full bucket starts an
async all-reduce, but only after every lower-numbered bucket has started: ranks must
issue collectives in the same order, whatever order their hooks fire in. After
backward, buckets never started (params the loss did not touch: zero grads) start, all
are waited on, and the grads returned are views into the buckets.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import torch

from sharded import comm
from sharded import tree as T
from sharded.grad import grad_pass
from sharded.mesh import Mesh
from sharded.step import Op, ProgramInfo, Transform, transform
from sharded.transforms._batch import rank_rows

__all__ = ["data_parallel"]


@dataclasses.dataclass(frozen=True)
class Bucket:
    leaves: tuple[int, ...]  # indices into the flat list of param leaves
    offsets: tuple[int, ...]
    numel: int
    dtype: torch.dtype
    device: torch.device


class ReadyOrder:
    """The order a step's grads become final in, learned from its first backward (as
    DDP rebuilds its buckets after the first iteration) and taken from the group's
    first rank, so every rank buckets alike. Until then: reverse flatten order."""

    def __init__(self):
        self.orders: dict[Any, list[int]] = {}

    def get(self, key: Any) -> list[int] | None:
        return self.orders.get(key)

    def learn(self, key: Any, gp: Any, group: Any) -> None:
        if key in self.orders or not gp.ready_order:
            return
        seen = list(dict.fromkeys(gp.ready_order))
        rest = [i for i in reversed(range(len(gp.leaves))) if i not in set(seen)]
        order = torch.tensor(seen + rest, dtype=torch.int64)
        if group is not None:
            comm.broadcast(order, src=torch.distributed.get_global_rank(group, 0), group=group)
        self.orders[key] = order.tolist()


def plan_buckets(params: list[torch.Tensor], bucket_bytes: int, order: list[int] | None = None) -> list[Bucket]:
    """Group leaves, in `order` (default: last registered first), into buckets of one
    dtype/device of at most bucket_bytes."""
    buckets: list[Bucket] = []
    cur: list[int] = []

    def close() -> None:
        if cur:
            offsets, total = [], 0
            for i in cur:
                offsets.append(total)
                total += params[i].numel()
            p = params[cur[0]]
            buckets.append(Bucket(tuple(cur), tuple(offsets), total, p.dtype, p.device))
            cur.clear()

    size = 0
    for i in order if order is not None else reversed(range(len(params))):
        p = params[i]
        if not p.is_floating_point():
            continue
        nbytes = p.numel() * p.element_size()
        if cur and (size + nbytes > bucket_bytes or (p.dtype, p.device) != (params[cur[0]].dtype, params[cur[0]].device)):
            close()
            size = 0
        cur.append(i)
        size += nbytes
    close()
    return buckets


class Reducer:
    """One step's gradient all-reduce: fills buckets as grads complete (see [Note: DP buckets])."""

    def __init__(self, leaves: list[torch.Tensor], buckets: list[Bucket], group: Any, size: int):
        self.leaves, self.buckets, self.group = leaves, buckets, group
        self.scale = 1.0 / size
        self.where = {i: (b, o) for b, bucket in enumerate(buckets) for i, o in zip(bucket.leaves, bucket.offsets)}
        self.flat = [torch.empty(b.numel, dtype=b.dtype, device=b.device) for b in buckets]
        self.missing = [len(b.leaves) for b in buckets]
        self.filled: set[int] = set()
        self.pending: list[comm.Pending] = []

    def ready(self, i: int, leaf: torch.Tensor) -> None:
        if i not in self.where or i in self.filled:
            return
        b, offset = self.where[i]
        slot = self.flat[b][offset : offset + leaf.numel()]
        torch.mul(leaf.grad.reshape(-1), self.scale, out=slot)
        leaf.grad = None
        self.filled.add(i)
        self.missing[b] -= 1
        self._start_ready()

    def _start_ready(self) -> None:
        while len(self.pending) < len(self.buckets) and self.missing[len(self.pending)] == 0:
            self.pending.append(comm.all_reduce(self.flat[len(self.pending)], group=self.group, async_op=True))

    def result(self) -> Any:
        for b, bucket in enumerate(self.buckets):
            for i, offset in zip(bucket.leaves, bucket.offsets):
                if i not in self.filled:
                    self.flat[b][offset : offset + self.leaves[i].numel()].zero_()
            self.missing[b] = 0
        self._start_ready()
        for work in self.pending:
            work.wait()
        self.pending = []  # a Pending holds its tensors (for its error message)
        grads = [torch.zeros_like(leaf) for leaf in self.leaves]
        for b, bucket in enumerate(self.buckets):
            for i, offset in zip(bucket.leaves, bucket.offsets):
                leaf = self.leaves[i]
                grads[i] = self.flat[b][offset : offset + leaf.numel()].view(leaf.shape)
        return grads


class DataParallel(Transform):
    name = "data_parallel"

    def __init__(self, bucket_mb: float = 25.0, mesh: Mesh | None = None, axis: str = "dp"):
        if not bucket_mb > 0:
            raise ValueError(f"data_parallel(bucket_mb=...) must be positive; got {bucket_mb!r}")
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.mesh, self.axis = mesh, axis
        self.handlers = {"value_and_grad": self._value_and_grad}
        self._plans: dict[Any, list[Bucket]] = {}
        self._order = ReadyOrder()

    def describe(self) -> str:
        return f"data_parallel({self.axis}={self._mesh().size(self.axis)})"

    def check(self, stack: Any) -> None:
        if sum(isinstance(t, DataParallel) for t in stack) > 1:
            raise ValueError("data_parallel appears twice in the step; apply it once")

    def _mesh(self) -> Mesh:
        return self.mesh if self.mesh is not None else Mesh.current()

    def init(self, state: Any) -> Any:
        """Make every replica start from dp rank 0's state."""
        broadcast_from_first(state, self._mesh().group(self.axis))
        return state

    def _plan(self, leaves: list[torch.Tensor], treespec: Any) -> list[Bucket]:
        key = (treespec, tuple((x.shape, x.dtype, x.device) for x in leaves))
        order = self._order.get(key)
        if (key, order is None) not in self._plans:
            self._plans[(key, order is None)] = plan_buckets(leaves, self.bucket_bytes, order)
        return self._plans[(key, order is None)]

    def _value_and_grad(self, next_: Callable, fn: Callable, has_aux: bool, params: Any, args: tuple, kwargs: dict) -> Any:
        mesh = self._mesh()
        size, group = mesh.size(self.axis), mesh.group(self.axis)
        if size == 1:
            return next_(fn, has_aux, params, args, kwargs)
        local = rank_rows(args, size, mesh.rank(self.axis), who="data_parallel")
        make = lambda gp: Reducer(gp.leaves, self._plan(gp.leaves, gp.treespec), group, size)  # noqa: E731
        learn = lambda gp: self._order.learn((gp.treespec, tuple((x.shape, x.dtype, x.device) for x in gp.leaves)), gp, group)  # noqa: E731
        return reduce_during_backward(self, make, next_, fn, has_aux, params, local, kwargs, group, size, learn)

    def explain(self, program: list[Op], info: ProgramInfo) -> list[Op]:
        size = self._mesh().size(self.axis)
        if size == 1:
            return program
        leaves = T.leaves(info.params)
        buckets = self._plan(leaves, T.structure(info.params))
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
                            nbytes=bucket.numel * torch.empty((), dtype=bucket.dtype).element_size(),
                            overlaps=where if b < len(buckets) - 1 else "",
                        )
                    )
                out.append(Op("collective", "wait buckets; all_reduce loss and metrics", "grads are views of the buckets, pre-scaled by 1/%d" % size))
        return out


def _contains_backward(op: Op) -> bool:
    return op.name == "backward" or any(_contains_backward(o) for o in op.body)


def broadcast_from_first(state: Any, group: Any) -> None:
    """Every rank of `group` takes its first rank's tensors (replicas start equal)."""
    if group is not None:
        src = torch.distributed.get_global_rank(group, 0)
        for x in T.leaves(state):
            if isinstance(x, torch.Tensor):
                comm.broadcast(x, src=src, group=group)


def reduce_during_backward(
    key: Any, make_reducer: Callable, next_: Callable, fn: Callable, has_aux: bool, params: Any, local: Any,
    kwargs: dict, group: Any, size: int, learn: Callable | None = None,
) -> Any:
    """value_and_grad on this rank's rows, with grads reduced over `group` by the reducer
    that `make_reducer(grad_pass)` builds (once per pass: `accumulate` may call again);
    `learn(grad_pass)` runs after the grads are read (to learn their ready order)."""
    with grad_pass(params) as (gp, owner):
        if key not in gp.attached:
            reducer = make_reducer(gp)
            gp.attached[key] = reducer
            gp.on_ready.append(reducer.ready)
            gp.finalize = lambda: T.unflatten(gp.treespec, reducer.result())
        value, _ = next_(fn, has_aux, params, local, kwargs)
        grads = gp.grads() if owner else None
        if learn is not None and owner:
            learn(gp)
        return mean_over(value, group, size), grads


def mean_over(value: Any, group: Any, size: int) -> Any:
    """Average the float tensor leaves of (loss, aux) over the group, in one all-reduce."""
    leaves = T.leaves(value)
    floats = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    if not floats:
        return value
    dtype = functools.reduce(torch.promote_types, [leaves[i].dtype for i in floats], torch.float32)
    flat = torch.cat([leaves[i].reshape(-1).to(dtype) for i in floats])
    comm.all_reduce(flat, group=group)
    flat /= size
    out, offset = list(leaves), 0
    for i in floats:
        x = leaves[i]
        out[i] = flat[offset : offset + x.numel()].view(x.shape).to(x.dtype)
        offset += x.numel()
    return T.unflatten(T.structure(value), out)


data_parallel = transform(DataParallel)
