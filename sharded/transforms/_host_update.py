"""offload's update on the host, started while backward still runs: each group of grads
goes to the host as soon as its reduction is done, and the optimizer updates those
leaves there while the device reduces the next groups.

[Note: the host update in parts] When the params live on the host (offload(params=True)),
the optimizer is leafwise (`tx.leafwise`) and every reduction's result is the grads
the update gets (`GradBucket.final`: no replica sum, no later micro-batch, no
transform that rewrites grads between reduction and update), the update of a group's
leaves can run as soon as that group is reduced. For each such group:

  device, compute stream   the reduce-scatter is waited (its rows are final)
  device, copy stream      after it: each leaf's chunk to its pinned host buffer; an event
  host, one worker thread  waits for the event, then runs the optimizer on those leaves
                           (`optim.InParts`), with this rank's share of the cores

The update handler then waits for the worker, updates any leaf no group covered,
and puts the state together. A step whose grads never reached the host this way
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

    def __init__(self, tx: Any, opt_state: Any, params: Any, host_grad: Callable[[int, torch.Tensor], torch.Tensor], threads: Callable):
        self.parts = InParts(tx, opt_state, params)
        self.params = params
        self.host_grad, self.threads = host_grad, threads  # leaf i's host buffer shaped like a grad; the thread-count context
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sharded-offload")
        self.futures: list[concurrent.futures.Future] = []
        self.submitted: set[int] = set()  # leaves whose update is queued
        self.copies = torch.cuda.Stream() if torch.cuda.is_available() else None

    def reduced(self, bucket: GradBucket) -> None:
        """A group's reduce-scatter was waited: copy this rank's row to the host and
        queue the update of its leaves."""
        out, layout = bucket.out, bucket.layout
        if self.submitted & set(layout.leaves):
            raise RuntimeError(
                "offload(params=True): these leaves' update already ran on the host for this state, in a step that then failed; "
                "its params and optimizer state are partly updated, so restore them from a checkpoint before training on"
            )
        self.submitted |= set(layout.leaves)
        views = layout.chunk_views(out, torch.distributed.get_rank(bucket.group))
        hosts = [self.host_grad(i, v) for i, v in zip(layout.leaves, views)]
        ready = None
        if out.device.type == "cuda":
            self.copies.wait_stream(torch.cuda.current_stream(out.device))
            with torch.cuda.stream(self.copies):
                torch._foreach_copy_(hosts, views, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self.copies)
            out.record_stream(self.copies)
        else:
            torch._foreach_copy_(hosts, views)
        shaped = [h.view(self.parts.leaves[i].shape) for i, h in zip(layout.leaves, hosts)]  # one rank: whole leaves, not flat chunks
        self.futures.append(self.worker.submit(self._run, ready, list(layout.leaves), shaped))

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
