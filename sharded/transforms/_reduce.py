"""Reducing one step's grads over the dp axis into each rank's chunks, as backward runs.

Used by `shard_zero`: stage 1 all-reduces each group and keeps a view of this rank's
row (the full grads stay alive, as ZeRO-1 holds them); stages 2 and 3 reduce-scatter,
so only this rank's row is ever kept. Groups start in index order on every rank
(collectives must be issued in the same order everywhere), each as soon as all its
leaves' grads are final; the grads are copied in with the 1/N mean fused, and each
leaf's own grad is freed at once. With hybrid sharding each reduced chunk is then
all-reduced over the ranks that hold the same chunk (the replicas). With `dtype` the buffers (and so the bytes on the
wire and the sums) are in that dtype; the grads come back in `out_dtype` (the
masters' dtype, when ZeRO-3 gathered low-precision copies), else the params'.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from sharded import comm
from sharded.transforms._flat import FlatGroup

__all__ = ["GradReducer"]


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
    ):
        self.leaves, self.groups, self.group, self.rank, self.scatter = leaves, groups, group, rank, scatter
        self.dtype = dtype  # the reduction's dtype (None: each group's own)
        self.out_dtype = out_dtype  # the grads' dtype (None: each group's own)
        self.replicate_group = replicate_group  # hybrid sharding: chunks are then summed over replicas
        self.scale = scale  # folded into the copy-in (None: 1 / the group's ranks, a mean)
        self.replicas: list[comm.Pending] = []
        self.sums: list[torch.Tensor] | None = None  # reduce_each_pass: the chunks summed so far
        self.on_filled = on_filled
        self.where = {i: (g, k) for g, fg in enumerate(groups) for k, i in enumerate(fg.leaves)}
        self.inputs: list[torch.Tensor | None] = [None] * len(groups)
        self.outputs: list[torch.Tensor] = []
        self.missing = [len(fg.leaves) for fg in groups]
        self.filled: set[int] = set()
        self.pending: dict[int, comm.Pending] = {}  # started, not yet waited
        self.started = 0

    def _input(self, g: int) -> torch.Tensor:
        if self.inputs[g] is None:
            self.inputs[g] = self.groups[g].empty(self.dtype)
        return self.inputs[g]

    def ready(self, i: int, leaf: torch.Tensor) -> None:
        """A leaf's grad is final: copy it in; start its group once the group is full."""
        if i not in self.where or i in self.filled or leaf.grad is None:
            return
        g, k = self.where[i]
        fg = self.groups[g]
        fg.write_full(k, self._input(g), leaf.grad, self.scale if self.scale is not None else 1.0 / fg.ranks)
        leaf.grad = None
        self._filled(i, g)

    def _filled(self, i: int, g: int) -> None:
        self.filled.add(i)
        self.missing[g] -= 1
        if self.missing[g] == 0:
            if self.on_filled is not None:
                self.on_filled(g)
            self._start_ready()

    def _start_ready(self) -> None:
        while self.started < len(self.groups) and self.missing[self.started] == 0:
            g = self.started
            fg, inp = self.groups[g], self._input(g)
            if self.scatter:
                out = torch.empty(fg.size, dtype=inp.dtype, device=fg.device)
                self.pending[g] = comm.reduce_scatter_tensor(out, inp, group=self.group, async_op=True)
            else:
                out = fg.rows(inp)[self.rank]
                self.pending[g] = comm.all_reduce(inp, group=self.group, async_op=True)
            self.outputs.append(out)
            self.started += 1
            self._retire(keep=self.IN_FLIGHT)

    def _retire(self, keep: int) -> None:
        """Wait for all but the newest `keep` collectives and free their inputs, so a
        scattered reduction never holds more than a few groups' full-size buffers."""
        while len(self.pending) > keep:
            g = min(self.pending)
            self.pending.pop(g).wait()  # a Pending holds its tensors (for its error message)
            if self.scatter:
                self.inputs[g] = None
            if self.replicate_group is not None:
                self.replicas.append(comm.all_reduce(self.outputs[g], group=self.replicate_group, async_op=True))

    def end_pass(self) -> None:
        """For a reduction per micro-batch: finish this backward's reductions, add them
        to the running sums, and start afresh for the next backward."""
        self._complete()
        self.sums = self.outputs if self.sums is None else [a.add_(b) for a, b in zip(self.sums, self.outputs)]
        self.inputs = [None] * len(self.groups)
        self.outputs, self.filled, self.started = [], set(), 0
        self.missing = [len(fg.leaves) for fg in self.groups]

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
        the loss did not touch a leaf), zeros of the leaf's shape for the rest."""
        if self.sums is None:
            self._complete()
        outputs = self.sums if self.sums is not None else self.outputs
        grads: list[torch.Tensor | None] = [None] * len(self.leaves)
        for fg, out in zip(self.groups, outputs):
            for i, view in zip(fg.leaves, fg.chunk_views(out.to(self.out_dtype or fg.dtype), self.rank)):
                grads[i] = view
        return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, self.leaves)]
