"""`compile(backend="inductor")`: the model's forward through `torch.compile`, whole or
block by block.

Reference semantics: the plain step (a compiled block computes what its forward does;
with inductor, to its kernels' rounding).

    step = sharded.shard_zero(stage=3)(sharded.compile()(train_step))

[Note: whole or by block] Where no other transform works inside the model's forward or
backward (no block or apply handler but a cast's, no grads reduced as backward makes
them: one GPU, with mixed_precision or accumulate), the whole forward, embedding, blocks
and head, is one graph: `torch.func.functional_call` of the module on the params,
compiled as `torch.compile(module)` would compile it, with the casts of mixed_precision
(`param_cast`) inside the graph, as autocast's are inside torch.compile's: the params'
casts and their grads' casts back are the graph's kernels, not hundreds of eager ops
(`Capability.RUNS_MODEL_WHOLE`). Elsewhere a graph of the whole model
would hide the blocks from the transforms that work on them (gathers, a schedule,
recompute) and end backward in one node, with no grad ready before the last, so
nothing would overlap the grads' reduction; there it compiles block by block, below.
A model that does not compile as one graph falls back to blocks, with a warning.

Block by block, it is a handler of the "block" primitive (see [Note: the block primitive] in trace.py)
at the innermost level, COMPILE: every other transform's block work (ZeRO-3's gathers
and frees, a pipeline's boundaries, remat's checkpoint, mixed_precision's casts) runs
around the compiled function, which is the block's own forward alone, a pure function
of its params and inputs with no hooks, collectives or Python state inside. So it is
compiled whole (`fullgraph=True`: a graph break raises, naming the block, rather than
silently running slower), under any transform stack. Blocks of one class share their
compiled code (torch.compile guards on shapes and dtypes, not on which module runs);
the embedding and head stay eager, as in torchtitan's per-block compile. Under
torch.func's transforms (a differentiation in the step's own code) blocks run eagerly.

[Note: the loss compiled too] With `loss=True` (the default) the function given to
`value_and_grad` goes through `torch.compile` as well (graph breaks allowed), with
`model.apply` a graph break in it: what the step computes from the model's output (the
loss: GPT's upcast to fp32 and cross-entropy over the vocabulary, ~4 ms a step of eager
memory-bound kernels at GPT-1.3B) becomes one fused graph, forward and backward, and the
model inside runs as above. Not where a transform runs its own schedule in place of the
function (a pipeline's), nor under torch.func's transforms; `loss=False` keeps it eager.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable

import torch

from sharded.step import Capability, Level, Op, ProgramInfo, Transform, transform
from sharded.trace import under_torch_func

__all__ = ["compile"]


class Compile(Transform):
    name = "compile"
    level = Level.COMPILE

    def __init__(self, backend: str | Callable = "inductor", mode: str | None = None, dynamic: bool | None = None, loss: bool = True):
        if not (isinstance(backend, str) or callable(backend)):
            raise ValueError(f"compile(backend={backend!r}): a torch.compile backend, by name ('inductor', 'aot_eager') or a callable")
        if isinstance(backend, str) and backend not in torch.compiler.list_backends(exclude_tags=()):
            raise ValueError(f"compile(backend={backend!r}) is not a torch.compile backend here; choose from {sorted(torch.compiler.list_backends())}")
        if not isinstance(loss, bool):
            raise ValueError(f"compile(loss={loss!r}): True compiles the function given to value_and_grad too, False leaves it eager")
        self.backend, self.mode, self.dynamic, self.loss = backend, mode, dynamic, loss
        self.handlers = {"block": self._block}
        self._compiled: dict[torch.nn.Module, Callable] = {}  # block (or whole) module -> its compiled forward
        self._loss_call: Callable | None = None  # `_call` compiled: value_and_grad's fn runs through it
        self._by_block: set[torch.nn.Module] = set()  # whole modules that did not compile as one graph
        self._casters: list[Transform] = []  # the stack's casts, which the whole graph runs (set by require)

    def check(self, stack: Any) -> None:
        """Whole or by block ([Note: whole or by block]), from the rest of the stack."""
        inside = any(
            Capability.REDUCES_GRADS in t.capabilities or (Capability.CASTS_PARAMS not in t.capabilities and {"apply", "block"} & t.handlers.keys())
            for t in stack if t is not self
        )
        self.capabilities = Capability.NONE if inside else Capability.RUNS_MODEL_WHOLE
        self.handlers = {"block": self._block} if inside else {"apply": self._apply, "block": self._block}
        if self.loss and not any(Capability.RUNS_SCHEDULE in t.capabilities for t in stack):
            self.handlers["value_and_grad"] = self._value_and_grad

    def require(self, stack: Any) -> None:
        self._casters = [t for t in stack if Capability.CASTS_PARAMS in t.capabilities]

    def __getstate__(self) -> dict:
        """Sent to other ranks without its compiled functions: each process compiles its own."""
        return {**self.__dict__, "_compiled": {}, "_loss_call": None}

    def describe(self) -> str:
        backend = self.backend if isinstance(self.backend, str) else getattr(self.backend, "__name__", "custom")
        return f"compile({backend!r})"

    def _compile(self, fn: Callable) -> Callable:
        return torch.compile(fn, backend=self.backend, mode=self.mode, dynamic=self.dynamic, fullgraph=True)

    def _forward(self, call: Any) -> Callable:
        forward = self._compiled.get(call.module)
        if forward is None:
            forward = self._compiled[call.module] = _whole(call.name, self._compile(call.forward))
        return forward

    def _apply(self, next_: Callable, model: Any, params: dict, args: tuple, kwargs: dict) -> Any:
        """The whole forward as one graph, the params' casts inside it; the blocks' path
        where it does not compile as one (the params cast first)."""
        if under_torch_func(params) or model.module in self._by_block or model.params.keys() - params.keys():
            return next_(model, self._cast(params)(params), args, kwargs)
        run = self._compiled.get(model.module)
        if run is None:
            module, tied, cast = model.module, model.tied, self._cast(params)

            def forward(params: dict, buffers: dict, args: tuple, kwargs: dict) -> Any:
                params = cast(params)
                named = {**buffers, **{alias: params[canonical] for alias, canonical in tied.items()}, **params}
                return torch.func.functional_call(module, named, args, kwargs, tie_weights=False)

            run = self._compiled[model.module] = self._compile(forward)
        try:
            return run(params, model.buffers, args, kwargs)
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as e:
            reason = str(e).strip().splitlines()[0]
            warnings.warn(f"compile: {type(model.module).__name__} does not compile as one graph ({reason}); compiling it block by block", stacklevel=2)
            self._by_block.add(model.module)
            return next_(model, self._cast(params)(params), args, kwargs)

    def _cast(self, params: dict) -> Callable[[dict], dict]:
        """The stack's casts of the params for compute, one after another (none: as they are)."""
        return _in_turn([c for c in (t.param_cast(params) for t in self._casters) if c is not None])

    def _value_and_grad(self, next_: Callable, fn: Callable, has_aux: bool, params: Any, args: tuple, kwargs: dict) -> Any:
        """[Note: the loss compiled too]: fn through one compiled trampoline, so a step that
        makes a new closure each call (a lambda in the step) reuses its graphs, which
        torch.compile guards by code and closure contents, and wraps nothing anew."""
        if under_torch_func(params):
            return next_(fn, has_aux, params, args, kwargs)
        if self._loss_call is None:
            self._loss_call = torch.compile(_call, backend=self.backend, mode=self.mode, dynamic=self.dynamic)
        return next_(functools.partial(self._loss_call, fn), has_aux, params, args, kwargs)

    def _block(self, next_: Callable, call: Any, params: dict, buffers: dict, args: tuple, kwargs: dict) -> Any:
        if under_torch_func(params):
            return next_(call, params, buffers, args, kwargs)
        return next_(dataclasses.replace(call, forward=self._forward(call)), params, buffers, args, kwargs)

    def explain(self, program: list[Op], info: ProgramInfo) -> list[Op]:
        note = (f"the whole forward compiled as one graph ({self.describe()})" if Capability.RUNS_MODEL_WHOLE in self.capabilities
                else f"each block's forward compiled whole ({self.describe()}), the transforms' block work around it")
        if "value_and_grad" in self.handlers:
            note += "; the loss around the model compiled too"

        def rewrite(op: Op) -> Op:
            detail = f"{op.detail}; {note}" if op.name == "forward" else op.detail
            return Op(op.kind, op.name, detail, op.nbytes, op.overlaps, tuple(rewrite(o) for o in op.body))

        return [rewrite(op) for op in program]


def _call(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def _in_turn(casts: list[Callable[[dict], dict]]) -> Callable[[dict], dict]:
    """The casts applied one after another (none: the params as they are)."""

    def cast(params: dict) -> dict:
        for c in casts:
            params = c(params)
        return params

    return cast


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
