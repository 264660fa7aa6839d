"""offload's update in parts, started while backward still runs: each group of grads
goes to the host as soon as its reduction is done, and the optimizer updates those
leaves there while the device reduces the next groups (or, with the update on the
device, the group's state comes to the grads instead).

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
and puts the state together. An optimizer with a head that reads every grad (a
global-norm clip before AdamW, `optim.leafwise_tail`) cannot start early: its groups
still go to the host and leave the device during backward, and the update runs the
head and then the rest on the host once backward is done, as DeepSpeed's does.

[Note: grads leave the device] Once a group's rows are on the host, the device's are
freed (`GradBucket.take` hands the reducer the host rows, which `value_and_grad`
then returns), so a step never holds every grad on the device: at 13B on one GPU
that is 48 GB of fp32 grads that never accumulate there. A step whose grads never reached the host this way
(a reduction that was not final) takes the whole update at once, as before.

[Note: the update streamed through the device] With `UpdateSite.DEVICE` the state
stays in pinned host memory between steps, but a group's update runs on the GPU: its
param chunks and moments go up (the `up` stream, as soon as the group is known: they
do not wait for its grads), the optimizer's CUDA kernel runs on them and the device's
grad rows once the reduce-scatter is done (the `copies` stream), and the new values
come back down (the `down` stream), while backward goes on. The counts' copies go up
without a host wait too (`InParts.run` copies them non-blocking), so the host keeps
queueing backward ahead of the GPU. PCIe then carries 20-24 bytes per fp32 param (8 or
12 up, 12 down) where the host update moves 4 (the grads down), but the host's cores
do nothing: where several GPUs share one host's cores, torch's CPU AdamW is the
slower of the two (2 H200s, 16 cores per GPU: 2.49 Gparams/s per rank on the host
against 3.12 streamed, `benchmarks/streamed_update.py`; decision 54). The grads stay on
the device, as under ZeRO-3 without offload. `finish` waits for the last copy down: the
next step fetches the params from the host.

[Note: the param a regather already fetched] With reshard_after_forward, ZeRO-3 fetches a
block's param chunks to the device twice a step: for its forward and again for its
backward (offload handles the "fetch" primitive it binds for them). The second copy is
what the block's update needs: the chunk has not changed since, and the update comes
right after the block's backward. `Refetches` keeps it, so the update sends only the
moments up, not the param again (a fifth of what a 1.3B step sends up, 2.8 GB per
rank on 2 ranks). A chunk fetched once (no reshard) goes up for its update as before, and so
does every chunk under micro-batches: there the second fetch is the first micro-batch's
backward, and keeping it until the update would hold every block on the device.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import enum
import functools
import itertools
from typing import Any, Callable, NamedTuple, Sequence

import torch

from sharded import tree as T
from sharded.optim import InParts, leafwise_tail
from sharded.reduce import GradBucket

__all__ = ["HostUpdate", "Refetches", "UpdateSite"]


class UpdateSite(enum.Enum):
    """Where offload's update in parts runs: on the host's cores, or on the device with
    the state streamed through it ([Note: the update streamed through the device])."""

    HOST = "host"
    DEVICE = "device"


class Refetches:
    """The device copies of param chunks fetched a second time in one step ([Note: the
    param a regather already fetched]), kept until the update takes them."""

    def __init__(self):
        self.clear()

    def fetched(self, step: Any, chunks: Sequence[torch.Tensor], copies: Sequence[torch.Tensor]) -> None:
        if step is not self.step:
            self.clear()
            self.step = step
        for chunk, copy in zip(chunks, copies):
            self.times[id(chunk)] = self.times.get(id(chunk), 0) + 1
            if self.times[id(chunk)] == 2:
                self.kept[id(chunk)] = copy

    def take(self, chunk: torch.Tensor) -> torch.Tensor | None:
        return self.kept.pop(id(chunk), None)

    def clear(self) -> None:
        self.step: Any = None
        self.times: dict[int, int] = {}  # id of a host chunk -> how often it was fetched this step
        self.kept: dict[int, torch.Tensor] = {}


class HostUpdate:
    """One step's update in parts, group by group: on the host from a worker thread, or
    through the device (`UpdateSite`)."""

    def __init__(
        self,
        tx: Any,
        opt_state: Any,
        params: Any,
        host_rows: Callable[[GradBucket], torch.Tensor],
        host_grad: Callable[[int, torch.Tensor], torch.Tensor],
        threads: Callable,
        site: UpdateSite = UpdateSite.HOST,
        refetches: Refetches | None = None,
    ):
        self.head, tail, tail_state, self.join = leafwise_tail(tx, opt_state)
        self.eager = tx.leafwise  # else a head (a global-norm clip) needs every grad first: the update waits for backward
        self.parts = InParts(tail, tail_state, params)
        self.params = params
        self.host_rows, self.host_grad = host_rows, host_grad  # a bucket's pinned host rows; leaf i's host buffer shaped like a grad
        self.threads = threads  # the thread-count context
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sharded-offload")
        self.futures: list[concurrent.futures.Future] = []
        self.submitted: set[int] = set()  # leaves whose update is queued
        self.site, self.refetches = site, refetches
        # host site: the grads down on `copies`; device site: the state up, the update on `copies`, the new state down
        sides = _side_streams(torch.cuda.current_device()) if torch.cuda.is_available() else None
        self.copies = sides.copies if sides is not None else None
        self.up, self.down = (sides.up, sides.down) if sides is not None and site is UpdateSite.DEVICE else (None, None)

    def reduced(self, bucket: GradBucket) -> None:
        """A group's reduce-scatter was waited: copy this rank's rows to the host, hand
        them to the reducer in place of the device's (`GradBucket.take`: see [Note:
        grads leave the device]) and queue the update of the group's leaves."""
        out, layout = bucket.out, bucket.layout
        if self.eager and self.submitted & set(layout.leaves):
            raise RuntimeError(
                "offload(params=True): these leaves' update already ran on the host for this state, in a step that then failed; "
                "its params and optimizer state are partly updated, so restore them from a checkpoint before training on"
            )
        self.submitted |= set(layout.leaves)
        if self.eager and self.site is UpdateSite.DEVICE:
            return self._through_device(bucket)
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
        if not self.eager:
            return  # the reducer hands these rows on; the update reads them after the head
        self.futures.append(self.worker.submit(self._run, ready, list(layout.leaves), self._grads(bucket, rows)))

    def _grads(self, bucket: GradBucket, rows: torch.Tensor) -> list[torch.Tensor]:
        """The bucket's leaves' grads as views of `rows` (this rank's chunks; on one rank,
        whole leaves, shaped as the parts' params)."""
        views = bucket.layout.chunk_views(rows, torch.distributed.get_rank(bucket.group))
        return [v.view(self.parts.leaves[i].shape) for i, v in zip(bucket.layout.leaves, views)]

    def _through_device(self, bucket: GradBucket) -> None:
        """[Note: the update streamed through the device]: the group's param chunks and
        moments to the grads' device, updated there, and back into the host's tensors."""
        out, indices = bucket.out, list(bucket.layout.leaves)
        grads = self._grads(bucket, out)
        hosts = [[self.parts.leaves[i] for i in indices], *([m[i] for i in indices] for m in self.parts.mirrored())]
        device, cuda = out.device, self.down is not None
        kept = [self.refetches.take(x) if self.refetches is not None else None for x in hosts[0]]
        up = lambda x: torch.empty_like(x, device=device).copy_(x, non_blocking=True)  # noqa: E731
        with _on(self.up):  # at once: the state does not wait for the grads
            ups = [[k if k is not None else up(x) for k, x in zip(kept, hosts[0])], *([up(x) for x in xs] for xs in hosts[1:])]
        if cuda:
            self.copies.wait_stream(self.up)
            self.copies.wait_stream(torch.cuda.current_stream(device))  # after the reduce-scatter
            out.record_stream(self.copies)
            for x in itertools.chain(*ups):
                x.record_stream(self.copies)
        with _on(self.copies if cuda else None):
            # outside the step's transforms, as the host site's worker thread runs it: this is the update itself
            moments = contextvars.Context().run(self.parts.run, indices, grads, moments=ups[1:], params=ups[0], device=device)
        downs = list(itertools.chain(ups[0], *moments))
        if cuda:
            self.down.wait_stream(self.copies)
            for d in downs:
                d.record_stream(self.down)
        with _on(self.down):
            for h, d in zip(itertools.chain(*hosts), downs):
                h.copy_(d, non_blocking=True)

    def _run(self, ready: torch.cuda.Event | None, indices: Sequence[int], grads: list[torch.Tensor]) -> None:
        if ready is not None:
            ready.synchronize()
        with self.threads():
            self.parts.run(indices, grads)

    def abandon(self) -> None:
        """A step that failed before its update: let the worker finish what it was given, then go."""
        self.worker.shutdown(wait=False)

    def finish(self, params: Any, grads: Any) -> tuple[Any, Any]:
        """Wait for every group's update; update the leaves no group covered (all of them
        where a head needs every grad first), their `grads` on the host (the taken rows,
        or copied now); (params, opt_state)."""
        try:
            for f in self.futures:
                f.result()  # a worker's error surfaces here
        finally:
            self.worker.shutdown(wait=True)
        if self.down is not None:
            self.down.synchronize()  # the host's params and moments are whole again: the next step fetches them
        if self.refetches is not None:
            self.refetches.clear()  # any copy no update took
        if any(a is not b for a, b in zip(T.leaves(params), T.leaves(self.params))):
            raise RuntimeError("offload: the update's params are not the tensors the host update in parts was given (a transform replaced them)")
        given = T.leaves(grads)
        rest = [i for i in range(len(given)) if i not in self.parts.seen]
        if rest:
            hosts = {i: given[i] if given[i].device.type == "cpu" else self.host_grad(i, given[i]).copy_(given[i]) for i in rest}
            if not self.eager:  # rest is every leaf: the head (a clip) first, on the host's grads
                copies = [(given[i], hosts[i]) for i in rest if hosts[i] is not given[i]]
                with T.copies_of(copies):  # a tied grad still counts once in the clip's norm
                    hosts = dict(enumerate(T.leaves(self.head(T.unflatten(T.structure(grads), [hosts[i] for i in rest]), params))))
            with self.threads():
                self.parts.run(rest, [hosts[i] for i in rest])
        params, new_tail = self.parts.finish()
        return params, self.join(new_tail)


def _on(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    """Queue on `stream`; where there is none (off CUDA), run here."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


class _SideStreams(NamedTuple):
    copies: torch.cuda.Stream
    up: torch.cuda.Stream
    down: torch.cuda.Stream


@functools.cache
def _side_streams(device: int) -> _SideStreams:
    """[Note: side streams made once] torch hands out CUDA streams round-robin from a pool
    of 32 per priority, the pool NCCL's communicators take their streams from too. Made
    anew every step (three on the device site), the update's streams walked through the
    whole pool every 11 steps, so on some steps one of them was a communicator's stream
    (or the gathers' fetch stream), and the state's copies queued behind collectives or
    the other way round.
    Made once per device, at the first step, they take three of the pool's streams for
    good: they coincide with another only if the process takes more than 32 in all."""
    return _SideStreams(*(torch.cuda.Stream(device) for _ in range(3)))
