"""Reducing one step's grads over the dp axis, as backward runs: the one gradient
reducer of `data_parallel` and `shard_zero`.

[Note: DP buckets] Leaves are packed, in the order their grads become final (learned
from the first backward, `ReadyOrder`; before that, reverse registration order), into
flat buckets of at most `bucket_mb` MiB of one dtype and device. Each bucket is a
`FlatGroup`; every reduction is a "reduce_grads" primitive (sharded/reduce.py).
`data_parallel` is the case that shards nothing: groups of one rank, all-reduced, the
grads returned as views of the buckets in the leaves' shapes. `shard_zero` reduce-scatters
in every stage (stage 1's update reads only this rank's chunk too: decision 39), so only
this rank's row is ever kept. Groups start in index order on every rank
(collectives must be issued in the same order everywhere), each as soon as all its
leaves' grads are final; the group's grads are then copied in together, cast to the
buffer's dtype with the 1/N mean fused (one kernel: a copy per leaf cost more host time
than its GPU time, and per-piece torch copies ~10 ms of a GPT-1.3B step's GPU time),
and freed. With hybrid sharding each reduced chunk is then
all-reduced over the ranks that hold the same chunk (the replicas). With `dtype` the buffers (and so the bytes on the
wire and the sums) are in that dtype; the grads come back in `out_dtype` (the
masters' dtype, when ZeRO-3 gathered low-precision copies), else the params'.
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
from typing import Any, Callable, Sequence

import torch

from sharded import comm
from sharded import tree as T
from sharded.grad import grad_pass
from sharded.placement import state_leaves
from sharded.reduce import GradBucket, Reduction, bind_in
from sharded.transforms._flat import FlatGroup

__all__ = ["GradReducer", "ReadyOrder", "plan_buckets", "broadcast_from_first", "mean_over", "reduce_during_backward"]


@dataclasses.dataclass(frozen=True)
class Bucket:
    leaves: tuple[int, ...]  # indices into the flat list of param leaves


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
    """Group floating leaves, in `order` (default: last registered first), into buckets
    of one dtype/device of at most bucket_bytes."""
    buckets: list[Bucket] = []
    cur: list[int] = []
    size = 0
    for i in order if order is not None else reversed(range(len(params))):
        p = params[i]
        if not p.is_floating_point():
            continue
        nbytes = p.numel() * p.element_size()
        if cur and (size + nbytes > bucket_bytes or (p.dtype, p.device) != (params[cur[0]].dtype, params[cur[0]].device)):
            buckets.append(Bucket(tuple(cur)))
            cur, size = [], 0
        cur.append(i)
        size += nbytes
    if cur:
        buckets.append(Bucket(tuple(cur)))
    return buckets


def broadcast_from_first(state: Any, group: Any) -> None:
    """Every rank of `group` takes its first rank's tensors (replicas start equal), but
    for the buffers the state's placements say are each rank's own."""
    if group is not None:
        src = torch.distributed.get_global_rank(group, 0)
        for path, x in state_leaves(state):
            p = state.placements.get(path)
            if isinstance(x, torch.Tensor) and not (p is not None and p.per_rank):
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
            gp.listen(reducer.ready)
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
    if not floats or size == 1:
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


class GradReducer:
    IN_FLIGHT = 2  # reductions left running while backward goes on
    def __init__(
        self,
        leaves: Sequence[torch.Tensor],
        groups: Sequence[FlatGroup],
        group: Any,
        rank: int,
        scatter: bool,
        on_filled: Callable[[int], None] | None = None,
        dtype: torch.dtype | None = None,
        out_dtype: torch.dtype | None = None,
        replicate_group: Any = None,
        scale: float | None = None,
        summed: bool = False,
    ):
        self.leaves, self.groups, self.group, self.rank, self.scatter = leaves, groups, group, rank, scatter
        self.dtype = dtype  # the reduction's dtype (None: each group's own)
        self.out_dtype = out_dtype  # the grads' dtype (None: each group's own)
        self.replicate_group = replicate_group  # hybrid sharding: chunks are then summed over replicas
        self.scale = scale  # folded into the copy-in (None: 1 / the group's ranks, a mean)
        self.final = replicate_group is None and not summed  # what a reduction gives is the update's grads (GradBucket.final)
        self.replicas: list[comm.Pending] = []
        self.sums: list[torch.Tensor] | None = None  # reduce_each_pass: the chunks summed so far
        self.on_filled = on_filled
        self.where = {i: (g, k) for g, fg in enumerate(groups) for k, i in enumerate(fg.leaves)}
        self.inputs: list[torch.Tensor | None] = [None] * len(groups)
        self.outputs: list[torch.Tensor] = []
        self.moved: list[Any] = []  # events after which outputs a handler took are valid
        self.missing = [len(fg.leaves) for fg in groups]
        self.held: list[list[torch.Tensor | None]] = [[None] * len(fg.leaves) for fg in groups]  # grads until their group is full
        self.filled: set[int] = set()
        self.pending: dict[int, comm.Pending] = {}  # started, not yet waited
        self.started = 0
        self.context = contextvars.copy_context()  # [Note: reduce in context] in sharded/reduce.py

    def _input(self, g: int) -> torch.Tensor:
        if self.inputs[g] is None:
            self.inputs[g] = self.groups[g].empty(self.dtype)
        return self.inputs[g]

    def ready(self, i: int, leaf: torch.Tensor) -> None:
        """A leaf's grad is final: hold it; once its group is full, copy the group's grads
        in (one launch: see [Note: DP buckets]) and start the group."""
        if i not in self.where or i in self.filled or leaf.grad is None:
            return
        g, k = self.where[i]
        self.held[g][k] = leaf.grad
        leaf.grad = None
        self._filled(i, g)

    def _filled(self, i: int, g: int) -> None:
        self.filled.add(i)
        self.missing[g] -= 1
        if self.missing[g] == 0:
            fg = self.groups[g]
            fg.write_all(self._input(g), self.held[g], self.scale if self.scale is not None else 1.0 / fg.ranks)
            self.held[g] = [None] * len(fg.leaves)
            if self.on_filled is not None:
                self.on_filled(g)
            self._start_ready()

    def _start_ready(self) -> None:
        while self.started < len(self.groups) and self.missing[self.started] == 0:
            g = self.started
            fg, inp = self.groups[g], self._input(g)
            if self.scatter:
                # one rank's row is the whole input: the scatter copies nothing
                out = inp if fg.ranks == 1 else torch.empty(fg.size, dtype=inp.dtype, device=fg.device)
                take = functools.partial(self._taken, g) if self.final else None
                self.pending[g] = bind_in(self.context, GradBucket(fg.name, inp, out, Reduction.REDUCE_SCATTER, self.group, fg, self.final, take))
            else:
                out = fg.rows(inp)[self.rank]
                self.pending[g] = bind_in(self.context, GradBucket(fg.name, inp, inp, Reduction.ALL_REDUCE, self.group, fg, self.final))
            self.outputs.append(out)
            self.started += 1
            self._retire(keep=self.IN_FLIGHT)

    def _taken(self, g: int, rows: torch.Tensor, ready: Any) -> None:
        """GradBucket.take: group g's result is `rows` now (its device rows may be freed)."""
        self.outputs[g] = rows
        if ready is not None:
            self.moved.append(ready)

    def _retire(self, keep: int) -> None:
        """Wait for all but the newest `keep` collectives and free their inputs, so a
        scattered reduction never holds more than a few groups' full-size buffers."""
        while len(self.pending) > keep:
            g = min(self.pending)
            self.pending.pop(g).wait()  # a Pending holds its tensors (for its error message)
            if self.scatter:
                self.inputs[g] = None
            if self.replicate_group is not None:
                out = self.outputs[g]
                replicas = GradBucket(f"{self.groups[g].name} replicas", out, out, Reduction.ALL_REDUCE, self.replicate_group)
                self.replicas.append(bind_in(self.context, replicas))

    def end_pass(self) -> None:
        """For a reduction per micro-batch: finish this backward's reductions, add them
        to the running sums, and start afresh for the next backward."""
        self._complete()
        self.sums = self.outputs if self.sums is None else [a.add_(b) for a, b in zip(self.sums, self.outputs)]
        self.inputs = [None] * len(self.groups)
        self.outputs, self.filled, self.started = [], set(), 0
        self.missing = [len(fg.leaves) for fg in self.groups]
        self.held = [[None] * len(fg.leaves) for fg in self.groups]

    def _complete(self) -> None:
        """Zero-fill the leaves the loss did not touch, start what is left, wait for all."""
        for i, (g, k) in self.where.items():
            if i in self.filled:
                continue
            if self.leaves[i].grad is not None:
                self.ready(i, self.leaves[i])
            else:  # the loss did not touch this leaf: its grad is zero
                fg = self.groups[g]
                fg.rows(self._input(g))[:, fg.offsets[k] : fg.offsets[k] + fg.chunks[k]].zero_()
                self._filled(i, g)
        self._start_ready()
        self._retire(keep=0)
        for work in self.replicas:
            work.wait()
        self.replicas = []

    def result(self) -> list[torch.Tensor]:
        """Every leaf's reduced grad: this rank's chunk for grouped leaves (zeros where
        the loss did not touch a leaf; the whole leaf in its shape for groups of one
        rank), zeros of the leaf's shape for the rest."""
        if self.sums is None:
            self._complete()
        for ready in self.moved:
            ready.synchronize()  # a taken result is read (or handed on) from here
        self.moved = []
        outputs = self.sums if self.sums is not None else self.outputs
        grads: list[torch.Tensor | None] = [None] * len(self.leaves)
        for fg, out in zip(self.groups, outputs):
            for i, view in zip(fg.leaves, fg.chunk_views(out.to(self.out_dtype or fg.dtype), self.rank)):
                grads[i] = view.view(self.leaves[i].shape) if fg.ranks == 1 else view
        return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, self.leaves)]
