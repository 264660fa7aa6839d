"""One update of a leafwise optimizer run part by part: the leaves whose grads are ready
first are updated first (offload updates on the host while backward still reduces the
rest of the grads).

    parts = InParts(tx, opt_state, params)
    parts.run([0, 3], [g0, g3])      # leaves 0 and 3, with their grads
    parts.run([1, 2], [g1, g2])
    params, opt_state = parts.finish()

[Note: an update in parts] `tx.leafwise` promises that leaf i's new param and state
read only leaf i's grad, state and param, and the 0-d counts. A part is then the same
optimizer over a smaller tree: its params are the part's leaves (a list), and every
subtree of the state that mirrors the params (a moment) is cut to the same leaves.
Everything else in the state (the counts) is given to each part as a copy, so that
each part advances its own copy from the same value: the counts every part ends with
are equal, and `finish` writes one back into the state's own count tensors. In place,
so that a count in pinned host memory stays pinned: offload's streamed update copies
it up at every part, and CUDA documents that a copy up from pageable memory may make
the host wait for the stream first, which would cost the host its lead at every block.
Params are updated in place (`optim.apply` donates them); the state's moments are in
place too under a fused optimizer, and otherwise taken from each part's new state when
`finish` rebuilds the whole state. Every leaf must be in exactly one part.

A part may also run on copies of its leaves (`moments=`, `params=`: offload's disk
tier stages them through host buffers): `run` returns the part's new moments for the
caller to store back, and `finish` keeps the whole state's own moment tensors. Copies
may be pieces of leaves (`spans=`: flat element ranges, each leaf's in order), as a
leaf too large for the disk tier's buffers goes through them: a leafwise optimizer
reads each element's grad, state and param alone, the property ZeRO already relies on
when it runs the optimizer on this rank's flat chunk of each leaf.
"""
from __future__ import annotations

from typing import Any, Sequence

import optree
import torch

from sharded import tree as T
from sharded.optim.base import GradientTransformation, apply, chain

__all__ = ["InParts", "leafwise_tail"]


class InParts:
    def __init__(self, tx: GradientTransformation, state: Any, params: Any):
        if not tx.leafwise:
            raise ValueError("an update in parts needs a leafwise optimizer (tx.leafwise): a global-norm clip reads every leaf")
        if isinstance(params, torch.Tensor):
            raise ValueError("an update in parts cuts the trees that mirror the params, so the params must be a container of tensors (a dict), not one tensor")
        self.tx, self.state, self.params = tx, state, params
        self.treespec, self.leaves = T.structure(params), T.leaves(params)
        self.nodes, self.outer = optree.tree_flatten(state, is_leaf=self._mirrors, none_is_leaf=False, namespace="sharded")
        # each node's leaves where it mirrors the params (a moment), else None: flattened once,
        # since a step runs a part per group of leaves (hundreds) and each would flatten every moment
        self.node_leaves = [T.leaves(n) if self._mirrors(n) else None for n in self.nodes]
        self.done: list[tuple[Sequence[int], list, bool]] = []  # (indices, that part's new state nodes, whether it ran on copies)
        self.seen: set[int] = set()  # leaves a part has updated, whole or in part
        self.covered: dict[int, int] = {}  # for each leaf in self.seen: how many of its flat elements, from the first

    def _mirrors(self, x: Any) -> bool:
        return not isinstance(x, torch.Tensor) and x is not None and T.structure(x) == self.treespec

    def mirrored(self) -> list[list[torch.Tensor]]:
        """Each subtree of the state that mirrors the params (a moment), as its leaves."""
        return [xs for xs in self.node_leaves if xs is not None]

    def run(
        self,
        indices: Sequence[int],
        grads: Sequence[torch.Tensor],
        moments: Sequence[Sequence[torch.Tensor]] | None = None,
        params: Sequence[torch.Tensor] | None = None,
        device: torch.device | str | None = None,
        spans: Sequence[tuple[int, int]] | None = None,
    ) -> list[list[torch.Tensor]]:
        """Update leaves `indices` (each once per update) with their `grads`, in place
        (on `moments`, one list per moment as `mirrored()` orders them, and `params`
        where given: copies of those leaves; the counts' copies on `device`, where the
        part runs, if given); the part's new moments. With `spans`, entry j is the flat
        elements [start, stop) of leaf indices[j] that its copies hold; a leaf's spans
        come in order, over one or more parts, until they cover it."""
        if spans is None:
            spans = [(0, self.leaves[i].numel()) for i in indices]
        elif moments is None or params is None:
            raise ValueError("an update in parts runs pieces of leaves (spans=) only on copies of them: pass moments= and params=")
        for i, (start, stop) in zip(indices, spans):
            if self.covered.get(i, 0) != start or not start <= stop <= self.leaves[i].numel() or (i in self.seen and start == 0):
                raise ValueError(
                    f"an update in parts got elements [{start}, {stop}) of leaf {i} after [0, {self.covered.get(i, 0)}): "
                    "it updates each element once, not twice, and a leaf's pieces in order"
                )
            self.covered[i] = stop
            self.seen.add(i)
        given = iter(moments) if moments is not None else None
        part = [
            (list(next(given)) if given is not None else [xs[i] for i in indices]) if xs is not None else _copy(n, device)
            for n, xs in zip(self.nodes, self.node_leaves)
        ]
        own = [self.leaves[i] for i in indices] if params is None else list(params)
        _, new_state = apply(self.tx, list(grads), optree.tree_unflatten(self.outer, part), own)
        new = optree.tree_flatten(new_state, is_leaf=lambda x: isinstance(x, list), none_is_leaf=False, namespace="sharded")[0]
        self.done.append((indices, new, moments is not None))
        return [x for x, xs in zip(new, self.node_leaves) if xs is not None]

    def finish(self) -> tuple[Any, Any]:
        """(params, state) once every leaf has been in a part."""
        whole = sum(self.covered.get(i, -1) == x.numel() for i, x in enumerate(self.leaves))
        if whole != len(self.leaves):
            raise ValueError(f"an update in parts covered {whole} of {len(self.leaves)} leaves")
        nodes = [list(xs) if xs is not None else n for n, xs in zip(self.nodes, self.node_leaves)]
        for indices, new, on_copies in self.done:
            for k, xs in enumerate(self.node_leaves):
                if xs is not None and not on_copies:
                    for i, x in zip(indices, new[k]):
                        nodes[k][i] = x
        if self.done:  # every part advanced its copy of the counts alike: the last one's, into the state's own tensors
            last = self.done[-1][1]
            for k, node in enumerate(self.nodes):
                if self.node_leaves[k] is None:
                    nodes[k] = node.copy_(last[k]) if isinstance(node, torch.Tensor) else last[k]
        whole = [T.unflatten(self.treespec, n) if xs is not None else n for n, xs in zip(nodes, self.node_leaves)]
        return self.params, optree.tree_unflatten(self.outer, whole)


def _copy(x: Any, device: torch.device | str | None) -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    if device is None:
        return x.clone()
    # Up to a GPU not blocking: a part's run would wait for every kernel queued before it.
    # Down to the host blocking: the host reads the copy next, and a non-blocking copy
    # down lands in pinned memory later, after the host may have read it.
    return x.to(device, copy=True, non_blocking=torch.device(device).type != "cpu")


def leafwise_tail(tx: GradientTransformation, state: Any) -> tuple[Any, GradientTransformation, Any, Any]:
    """A chain cut into the members that read every leaf, first, and its leafwise rest:
    `(head, tail, tail_state, join)`. `head(grads, params)` runs the head on whole grads
    (a global-norm clip, as `chain(clip_by_global_norm(1.0), adamw(...))` starts) and
    returns the grads the tail gets; the tail can then run in parts; `join(tail_state)`
    is the chain's new state. A leafwise `tx` is all tail."""
    if tx.leafwise:
        return (lambda grads, params: grads), tx, state, (lambda new: new)
    members = tx.members
    cut = next((j for j in range(1, len(members)) if all(m.leafwise for m in members[j:])), None)
    if cut is None:
        raise ValueError(
            "this optimizer's update cannot run in parts: it is not leafwise, and it is not a chain whose "
            "members after the first few (a global-norm clip) are; reorder the chain, or drop what reads every leaf"
        )
    head_states = list(state[:cut])
    last = cut == len(members) - 1

    def head(grads: Any, params: Any) -> Any:
        for j, m in enumerate(members[:cut]):
            grads, head_states[j] = m.update(grads, state[j], params)
        return grads

    tail = members[cut] if last else chain(*members[cut:])
    return head, tail, state[cut] if last else tuple(state[cut:]), lambda new: tuple(head_states) + ((new,) if last else tuple(new))
