"""`compile(backend="inductor")`: each block's forward through `torch.compile`.

Reference semantics: the plain step (a compiled block computes what its forward does;
with inductor, to its kernels' rounding).

    step = sharded.shard_zero(stage=3)(sharded.compile()(train_step))

It is a handler of the "block" primitive (see [Note: the block primitive] in trace.py)
at the innermost level, COMPILE: every other transform's block work (ZeRO-3's gathers
and frees, a pipeline's boundaries, remat's checkpoint, mixed_precision's casts) runs
around the compiled function, which is the block's own forward alone, a pure function
of its params and inputs with no hooks, collectives or Python state inside. So it is
compiled whole (`fullgraph=True`: a graph break raises, naming the block, rather than
silently running slower), under any transform stack. Blocks of one class share their
compiled code (torch.compile guards on shapes and dtypes, not on which module runs);
the embedding, head and loss stay eager, as in torchtitan's per-block compile. Under
torch.func's transforms (a differentiation in the step's own code) blocks run eagerly.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from sharded.step import Level, Op, ProgramInfo, Transform, transform
from sharded.trace import under_torch_func

__all__ = ["compile"]


class Compile(Transform):
    name = "compile"
    level = Level.COMPILE

    def __init__(self, backend: str | Callable = "inductor", mode: str | None = None, dynamic: bool | None = None):
        if not (isinstance(backend, str) or callable(backend)):
            raise ValueError(f"compile(backend={backend!r}): a torch.compile backend, by name ('inductor', 'aot_eager') or a callable")
        if isinstance(backend, str) and backend not in torch.compiler.list_backends(exclude_tags=()):
            raise ValueError(f"compile(backend={backend!r}) is not a torch.compile backend here; choose from {sorted(torch.compiler.list_backends())}")
        self.backend, self.mode, self.dynamic = backend, mode, dynamic
        self.handlers = {"block": self._block}
        self._compiled: dict[torch.nn.Module, Callable] = {}  # block module -> its compiled forward

    def __getstate__(self) -> dict:
        """Sent to other ranks without its compiled functions: each process compiles its own."""
        return {**self.__dict__, "_compiled": {}}

    def describe(self) -> str:
        backend = self.backend if isinstance(self.backend, str) else getattr(self.backend, "__name__", "custom")
        return f"compile({backend!r})"

    def _forward(self, call: Any) -> Callable:
        forward = self._compiled.get(call.module)
        if forward is None:
            forward = self._compiled[call.module] = _whole(call.name, torch.compile(
                call.forward, backend=self.backend, mode=self.mode, dynamic=self.dynamic, fullgraph=True
            ))
        return forward

    def _block(self, next_: Callable, call: Any, params: dict, buffers: dict, args: tuple, kwargs: dict) -> Any:
        if under_torch_func(params):
            return next_(call, params, buffers, args, kwargs)
        return next_(dataclasses.replace(call, forward=self._forward(call)), params, buffers, args, kwargs)

    def explain(self, program: list[Op], info: ProgramInfo) -> list[Op]:
        note = f"each block's forward compiled whole ({self.describe()}), the transforms' block work around it"

        def rewrite(op: Op) -> Op:
            detail = f"{op.detail}; {note}" if op.name == "forward" else op.detail
            return Op(op.kind, op.name, detail, op.nbytes, op.overlaps, tuple(rewrite(o) for o in op.body))

        return [rewrite(op) for op in program]


def _whole(name: str, compiled: Callable) -> Callable:
    """`compiled`, with what stops it compiling as one graph named for the user."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as e:  # a graph break; a data-dependent branch
            reason = str(e).strip().splitlines()[0]
            raise ValueError(
                f"compile: block {name!r} does not compile as one graph ({reason}); make its forward traceable "
                "(no .item(), print or data-dependent Python branches), or leave compile out of this step"
            ) from e

    return forward


compile = transform(Compile)  # noqa: A001 - sharded.compile, as the issue and users spell it
