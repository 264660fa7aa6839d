"""offload(where=...): the update of the leaves the predicate keeps on the device runs
there, and of the offloaded ones on the host, at once.

[Note: a split update] The optimizer runs in parts (`optim.InParts`), after a head that
reads every leaf (a global-norm clip, `optim.leafwise_tail`) has run on the device's
grads. The device's part is queued first: its kernels run while the host copies the
offloaded leaves' grads and params over, updates them with this rank's share of the
cores, and copies the params back. The counts stay on the device; each part advances
its own copy of them, on the device it runs on.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from sharded import tree as T
from sharded.optim import InParts, leafwise_tail

__all__ = ["update_split"]


def update_split(
    tx: Any, grads: Any, opt_state: Any, params: Any, offloaded: Sequence[int], host_buffer: Callable[[str, int, torch.Tensor], torch.Tensor], threads: Callable
) -> tuple[Any, Any]:
    """(params, opt_state) after one update: leaves `offloaded` (their moments in host
    memory) on the host, through `host_buffer(kind, i, like)`'s copies, the rest in place."""
    head, tail, tail_state, join = leafwise_tail(tx, opt_state)
    grads = head(grads, params)
    parts = InParts(tail, tail_state, params)
    gs, ps = T.leaves(grads), T.leaves(params)
    moved = set(offloaded)
    kept = [i for i in range(len(ps)) if i not in moved]
    if kept:
        parts.run(kept, [gs[i] for i in kept])
    if offloaded:
        host_grads = [host_buffer("grad", i, gs[i]) for i in offloaded]
        host_params = [host_buffer("param", i, ps[i]) for i in offloaded]
        torch._foreach_copy_(host_grads + host_params, [gs[i] for i in offloaded] + [ps[i] for i in offloaded], non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # the host reads them next
        with threads():
            parts.run(offloaded, host_grads, params=host_params, device="cpu")
        torch._foreach_copy_([ps[i] for i in offloaded], host_params, non_blocking=True)
    params, new_tail = parts.finish()
    return params, join(new_tail)
