"""shard_zero(update_in_backward=True): each group's update run on the device as soon as
backward has reduced its grads, instead of after backward.

[Note: the update during backward] Once a group's reduce-scatter is waited, its grads
are final (`GradBucket.final`: no replica sum, no later micro-batch, nothing that
rewrites them before the update), and nothing left in backward reads the group's
params: their last use queued its grad before the hook that filled the group. So the
group's part of a leafwise optimizer (`optim.InParts`) can run then, on a side stream
that waits for what the compute stream has queued so far, while backward goes on with
the earlier blocks. Under stages 1 and 2 the group's all-gather of the new chunks and
their copy into the whole params follow on that stream too. What ran after backward
with nothing to overlap it (the optimizer, and under stages 1/2 the params' gather)
then hides behind backward; the update handler waits for the side stream and updates
what no group held (leaves that are not chunked).

The cost is a changed contract, which is why it is an option (torch's optimizer in
backward is one too): the params change inside `value_and_grad`, before the step calls
`apply_gradients`. A step must hand that call the grads `value_and_grad` returned, as
they are (checked: the same tensors, not written since), and must call it: a step that
reached backward and did not (an exception, a skipped update) leaves the params partly
updated, which the next step refuses (`Progress`).
"""
from __future__ import annotations

import contextvars
import enum
from typing import Any, Sequence

import torch

from sharded import tree as T
from sharded.optim import InParts
from sharded.transforms._flat import FlatGroup
from sharded.transforms._streams import on_stream

__all__ = ["BackwardUpdate", "Progress"]

_CHECKPOINT = "restore the last checkpoint before training on"


class Progress(enum.Enum):
    """How far one step's update in backward went."""

    WAITING = "no group updated yet"
    UPDATING = "some groups updated"
    APPLIED = "the step's apply_gradients finished it"


class BackwardUpdate:
    """One step's update, group by group as backward reduces them ([Note: the update
    during backward]), on `chunks` (this rank's chunk of every param leaf; stages 1/2:
    views of `wholes`, which each group's gather then refreshes)."""

    def __init__(self, call: Any, tx: Any, opt_state: Any, params: Any, chunks: Sequence[torch.Tensor], group: Any, wholes: Sequence[torch.Tensor] | None):
        if not tx.leafwise:
            raise ValueError(
                "shard_zero(update_in_backward=True) updates each group of leaves as backward reduces it, which needs a leafwise "
                "optimizer; this one reads every grad first (a global-norm clip): drop the clip, or update_in_backward=False"
            )
        self.call, self.group = call, group  # call: the step call it belongs to (primitives.step_call)
        self.params = T.leaves(params)  # the tensors apply_gradients must hand the update
        self.parts = InParts(tx, opt_state, T.unflatten(T.structure(params), list(chunks)))
        self.wholes = wholes
        self.progress = Progress.WAITING
        self.handed: list[tuple[torch.Tensor, int]] = []  # the grads value_and_grad returned, and their versions
        cuda = next((c.device for c in chunks if c.device.type == "cuda"), None)
        self.stream = torch.cuda.Stream(cuda) if cuda is not None else None

    def reduced(self, group: FlatGroup, grads: torch.Tensor) -> None:
        """Group `group`'s reduction was waited (`grads`: this rank's rows): update its
        leaves, and under stages 1/2 gather them into the whole params."""
        if self.parts.seen & set(group.leaves):
            raise RuntimeError(
                "shard_zero(update_in_backward=True): a second value_and_grad in one step reduced grads whose update already ran "
                "during the first one's backward; take one value_and_grad per step (accumulate splits micro-batches), or "
                "update_in_backward=False"
            )
        self.progress = Progress.UPDATING
        rank = torch.distributed.get_rank(self.group)
        with on_stream(self.stream):
            if self.stream is not None:
                self.stream.wait_stream(torch.cuda.current_stream(grads.device))  # after the reduction and the block's backward
                grads.record_stream(self.stream)
            # outside the step's transforms: this is the update itself, as apply_gradients would run it
            views = [v.view(self.parts.leaves[i].shape) for i, v in zip(group.leaves, group.chunk_views(grads, rank))]
            contextvars.Context().run(self.parts.run, list(group.leaves), views)
            if self.wholes is not None:
                rows, pending = group.gather([self.parts.leaves[i] for i in group.leaves], self.group, async_op=True)
                pending.wait()
                group.read_all(rows, [self.wholes[i] for i in group.leaves])

    def returned(self, grads: Any) -> None:
        """value_and_grad handed the step these grads: the update must get them as they are."""
        self.handed = [(g, g._version) for g in T.leaves(grads)]

    def finish(self, grads: Any, params: Any) -> Any:
        """The update the step asked for: wait for the side stream, update the leaves no
        group held; the new optimizer state."""
        given = T.leaves(grads)
        if any(a is not b for a, b in zip(T.leaves(params), self.params)):
            raise RuntimeError(f"shard_zero(update_in_backward=True): the update's params are not the state's (a transform or the step replaced them); {_CHECKPOINT}")
        if len(given) != len(self.handed) or any(g is not h or g._version != v for g, (h, v) in zip(given, self.handed)):
            raise RuntimeError(
                "shard_zero(update_in_backward=True) already updated the params with the grads value_and_grad returned, during its "
                "backward, but apply_gradients got other grads (changed or replaced: a clip or scale in the step); put that change "
                f"in the optimizer, or update_in_backward=False; {_CHECKPOINT}"
            )
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        rest = [i for i in range(len(self.parts.leaves)) if i not in self.parts.seen]
        if rest:
            self.parts.run(rest, [given[i] for i in rest])
        _, opt_state = self.parts.finish()
        self.progress = Progress.APPLIED
        self.parts, self.params, self.handed, self.wholes = None, [], [], None  # nothing of this step outlives it
        return opt_state

    def check_applied(self) -> None:
        """Before the next step: this one's update ran whole, or not at all."""
        if self.progress is Progress.UPDATING:
            raise RuntimeError(
                "shard_zero(update_in_backward=True): the last step updated part of the params during its backward and never "
                f"reached apply_gradients (it raised, or skipped the update); its params and optimizer state are partly updated: {_CHECKPOINT}"
            )

