"""`remat(policy="full"|"selective"|predicate)`: activation checkpointing per block.

Reference semantics: the plain step, exactly. A rematerialized block keeps only its
inputs through the forward; its backward first runs its forward again (same params,
same inputs, same RNG state and autocast) to rebuild what it needs.

    step = sharded.shard_zero(stage=3)(sharded.remat("full")(train_step))

policy:
  "full"       every block keeps only its inputs;
  "selective"  every block also keeps its matmul and attention outputs, so backward
               recomputes only the cheap elementwise ops (torch's selective
               activation checkpointing);
  a predicate  `policy(block_name) -> bool` picks the blocks to rematerialize fully.

It is a handler of the "block" primitive (see [Note: the block primitive] in trace.py)
at the MEMORY level: inside ZeRO-3's gather (which regathers a block's params before
its backward, hence before the recompute) and a pipeline's boundaries, outside the
block's own compute. Written against protocol v2 alone: no other transform knows it.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils import checkpoint as ckpt

from sharded.step import Level, Op, ProgramInfo, Transform, transform
from sharded.trace import under_torch_func

__all__ = ["remat"]

# Ops whose outputs "selective" keeps: the expensive ones to recompute.
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _keep_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> ckpt.CheckpointPolicy:
    return ckpt.CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else ckpt.CheckpointPolicy.PREFER_RECOMPUTE


class Remat(Transform):
    name = "remat"
    level = Level.MEMORY

    def __init__(self, policy: str | Callable[[str], bool] = "full"):
        if not (policy in ("full", "selective") or callable(policy)):
            raise ValueError(
                f"remat(policy={policy!r}): use 'full', 'selective' or a predicate block_name -> bool "
                "(e.g. lambda name: name.endswith(('.0', '.2')))"
            )
        self.policy = policy
        self.handlers = {"block": self._block}

    def describe(self) -> str:
        return f"remat({self.policy!r})" if isinstance(self.policy, str) else "remat(predicate)"

    def _selects(self, name: str) -> bool:
        return not callable(self.policy) or bool(self.policy(name))

    def _block(self, next_: Callable, call: Any, params: dict, buffers: dict, args: tuple, kwargs: dict) -> Any:
        if not torch.is_grad_enabled() or not self._selects(call.name) or under_torch_func(params):  # checkpoint does not run under torch.func
            return next_(call, params, buffers, args, kwargs)
        context = (lambda: ckpt.create_selective_checkpoint_contexts(_keep_matmuls)) if self.policy == "selective" else ckpt.noop_context_fn
        run = lambda p, b, a, k: next_(call, p, b, a, k)  # noqa: E731
        return ckpt.checkpoint(run, params, buffers, args, kwargs, use_reentrant=False, context_fn=context)

    def explain(self, program: list[Op], info: ProgramInfo) -> list[Op]:
        kept = {"full": "each block keeps only its inputs", "selective": "each block keeps its inputs and matmul outputs"}
        notes = {"forward": kept.get(self.policy, "the picked blocks keep only their inputs"), "backward": "each block's forward recomputed first"}

        def rewrite(op: Op) -> Op:
            detail = f"{op.detail}; {notes[op.name]}" if op.name in notes else op.detail
            return Op(op.kind, op.name, detail, op.nbytes, op.overlaps, tuple(rewrite(o) for o in op.body))

        return [rewrite(op) for op in program]


remat = transform(Remat)
