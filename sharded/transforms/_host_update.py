"""offload's update on the host, started while backward still runs: each group of grads
goes to the host as soon as its reduction is done, and the optimizer updates those
leaves there while the device reduces the next groups.

[Note: the host update in parts] When the params live on the host (offload(params=True)),
the optimizer is leafwise (`tx.leafwise`) and every reduction's result is the grads
the update gets (`GradBucket.final`: no replica sum, no later micro-batch, no
transform that rewrites grads between reduction and update), the update of a group's
leaves can run as soon as that group is reduced. For each such group:

  device, compute stream   the reduce-scatter is waited (its rows are final)
  device, copy stream      after it: the rows to a pinned host buffer; an event; the
                           device's rows freed, the reducer reading the host's instead
  host, one worker thread  waits for the event, then runs the optimizer on those leaves
                           (`optim.InParts`), with this rank's share of the cores

The update handler then waits for the worker, updates any leaf no group covered,
and puts the state together.

[Note: grads leave the device] Once a group's rows are on the host, the device's are
freed (`GradBucket.take` hands the reducer the host rows, which `value_and_grad`
then returns), so a step never holds every grad on the device: at 13B on one GPU
that is 48 GB of fp32 grads that never accumulate there. A step whose grads never reached the host this way
(a reduction that was not final) takes the whole update at once, as before.
"""
from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Sequence

import torch

from sharded import tree as T
from sharded.optim import InParts
from sharded.reduce import GradBucket

__all__ = ["HostUpdate"]


class HostUpdate:
    """One step's update on the host, run group by group from a worker thread."""

    def __init__(
        self,
        tx: Any,
        opt_state: Any,
        params: Any,
        host_rows: Callable[[GradBucket], torch.Tensor],
        host_grad: Callable[[int, torch.Tensor], torch.Tensor],
        threads: Callable,
    ):
        self.parts = InParts(tx, opt_state, params)
        self.params = params
        self.host_rows, self.host_grad = host_rows, host_grad  # a bucket's pinned host rows; leaf i's host buffer shaped like a grad
        self.threads = threads  # the thread-count context
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sharded-offload")
        self.futures: list[concurrent.futures.Future] = []
        self.submitted: set[int] = set()  # leaves whose update is queued
        self.copies = torch.cuda.Stream() if torch.cuda.is_available() else None

    def reduced(self, bucket: GradBucket) -> None:
        """A group's reduce-scatter was waited: copy this rank's rows to the host, hand
        them to the reducer in place of the device's (`GradBucket.take`: see [Note:
        grads leave the device]) and queue the update of the group's leaves."""
        out, layout = bucket.out, bucket.layout
        if self.submitted & set(layout.leaves):
            raise RuntimeError(
                "offload(params=True): these leaves' update already ran on the host for this state, in a step that then failed; "
                "its params and optimizer state are partly updated, so restore them from a checkpoint before training on"
            )
        self.submitted |= set(layout.leaves)
        rows = self.host_rows(bucket)
        ready = None
        if out.device.type == "cuda":
            self.copies.wait_stream(torch.cuda.current_stream(out.device))
            with torch.cuda.stream(self.copies):
                rows.copy_(out, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self.copies)
            out.record_stream(self.copies)
        else:
            rows.copy_(out)
        bucket.take(rows, ready)
        out.untyped_storage().resize_(0)  # the allocator reuses it once the copy is done (record_stream)
        views = layout.chunk_views(rows, torch.distributed.get_rank(bucket.group))
        grads = [v.view(self.parts.leaves[i].shape) for i, v in zip(layout.leaves, views)]  # one rank: whole leaves, not flat chunks
        self.futures.append(self.worker.submit(self._run, ready, list(layout.leaves), grads))

    def _run(self, ready: torch.cuda.Event | None, indices: Sequence[int], grads: list[torch.Tensor]) -> None:
        if ready is not None:
            ready.synchronize()
        with self.threads():
            self.parts.run(indices, grads)

    def abandon(self) -> None:
        """A step that failed before its update: let the worker finish what it was given, then go."""
        self.worker.shutdown(wait=False)

    def finish(self, params: Any, grads: Any) -> tuple[Any, Any]:
        """Wait for every group's update; update the leaves no group covered (their
        `grads` copied to the host now); (params, opt_state)."""
        try:
            for f in self.futures:
                f.result()  # a worker's error surfaces here
        finally:
            self.worker.shutdown(wait=True)
        if any(a is not b for a, b in zip(T.leaves(params), T.leaves(self.params))):
            raise RuntimeError("offload: the update's params are not the tensors the host update in parts was given (a transform replaced them)")
        rest = [i for i in range(len(T.leaves(params))) if i not in self.parts.seen]
        if rest:
            device = [T.leaves(grads)[i] for i in rest]
            hosts = [self.host_grad(i, g) for i, g in zip(rest, device)]
            torch._foreach_copy_(hosts, device)
            with self.threads():
                self.parts.run(rest, hosts)
        return self.parts.finish()
