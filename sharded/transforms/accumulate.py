"""`accumulate(steps=k)`: micro-batching, k forward/backward passes and one update.

Reference semantics (equal to the step on the whole batch, up to float rounding):

    grads = mean over the k row-slices b_i of batch of grad(loss)(params, b_i)
    loss  = mean of the k losses; float metrics from `has_aux` averaged the same way

Activations are held for one micro-batch at a time. The grads accumulate on the same
leaves across the k backward passes (see [Note: grad passes] in sharded/grad.py), and
only the last pass is final, so `data_parallel` around it reduces once per update,
overlapped with the last micro-batch's backward. Stacks with every transform (inside a
pipeline it is refused: give the pipeline more micro-batches); the global batch must
split into ranks × k equal parts.
"""
from __future__ import annotations

from typing import Any, Callable

from sharded.grad import grad_pass
from sharded.step import Capability, Level, Op, ProgramInfo, Transform, transform
from sharded.transforms._batch import mean_floats, split

__all__ = ["accumulate"]


class Accumulate(Transform):
    name = "accumulate"
    level = Level.SCHEDULE
    capabilities = Capability.MICROBATCHES
    once = False  # accumulate(a)(accumulate(b)(f)) is a·b micro-batches

    def __init__(self, steps: int | None = None):
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"accumulate(steps=k) needs a positive int number of micro-batches; got steps={steps!r}")
        self.steps = steps
        self.handlers = {"value_and_grad": self._value_and_grad}

    def describe(self) -> str:
        return f"accumulate(steps={self.steps})"

    def _value_and_grad(self, next_: Callable, fn: Callable, has_aux: bool, params: Any, args: tuple, kwargs: dict) -> Any:
        micro = split(
            args,
            self.steps,
            who=f"accumulate(steps={self.steps})",
            fix="make the (per-rank) batch a multiple of the micro-batch count (global batch = ranks × micro-batches × rows)",
        )
        with grad_pass(params) as (gp, owner):
            outer_final, outer_scale = gp.final, gp.loss_scale
            gp.loss_scale = outer_scale / self.steps
            values = []
            try:
                for i, mb in enumerate(micro):
                    gp.final = outer_final and i == self.steps - 1
                    value, _ = next_(fn, has_aux, params, mb, kwargs)
                    values.append(value)
            finally:
                gp.final, gp.loss_scale = outer_final, outer_scale
            return mean_floats(values), (gp.grads() if owner else None)

    def explain(self, program: list[Op], info: ProgramInfo) -> list[Op]:
        fwd_bwd = [op for op in program if op.name in ("forward", "backward")]
        rest = [op for op in program if op.name not in ("forward", "backward")]
        loop = Op(
            "repeat",
            f"repeat {self.steps}x",
            "one micro-batch (1/%d of the rows) at a time; grads accumulate, only the last backward is final" % self.steps,
            body=tuple(fwd_bwd),
        )
        return [loop] + rest


accumulate = transform(Accumulate)
