"""`Step`: a training step with a stack of transforms, and the protocol a transform follows.

    step = data_parallel(accumulate(steps=4)(train_step))
    state = step.init(state)            # each transform lays out the state for this rank
    state, metrics = step(state, batch) # train_step runs; its primitives are rewritten
    print(step.explain())               # the rewritten program, rank by rank

A transform is a small object with
  - `handlers`: {primitive name: handler(next, *args)} (see `sharded.primitives`);
  - `init(state) -> state`: the state's layout on this rank;
  - `gather(state) -> state`: the inverse, the full state;
  - `explain(program, info) -> program`: its rewrite of the step's program, as `Op`s;
  - `check(stack)`: raise at composition when it conflicts with another transform;
  - `metrics(state) -> dict`: what it adds to the step's metrics (a loss scale, say).
Handlers apply outermost first; `init` runs innermost first, `gather` outermost first.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import torch

from sharded import primitives
from sharded import tree as T

__all__ = ["Op", "ProgramInfo", "Step", "Transform", "transform"]


@dataclasses.dataclass(frozen=True)
class Op:
    """One line of a rank's program: compute, communication or a group of ops."""

    kind: str  # "compute" | "collective" | "repeat" | "data"
    name: str
    detail: str = ""
    nbytes: int = 0
    overlaps: str = ""
    body: tuple[Op, ...] = ()

    def as_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if v not in ("", 0, ())}
        if self.body:
            d["body"] = [op.as_dict() for op in self.body]
        return d


@dataclasses.dataclass(frozen=True)
class ProgramInfo:
    """What `explain` knows about a rank: its coordinates and the params' layout."""

    rank: int
    world_size: int
    params: Any  # pytree of meta tensors with the params' shapes and dtypes


def _base_program() -> list[Op]:
    return [
        Op("compute", "forward", "model.apply on the batch"),
        Op("compute", "backward", "grads of the loss w.r.t. params"),
        Op("compute", "update", "optimizer step on params"),
    ]


class Transform:
    """Base class: a transform that rewrites nothing. Subclasses override what they need."""

    name = "transform"
    handlers: dict[str, Callable[..., Any]] = {}

    def init(self, state: Any) -> Any:
        return state

    def gather(self, state: Any) -> Any:
        return state

    def explain(self, program: list[Op], info: ProgramInfo) -> list[Op]:
        return program

    def check(self, stack: Sequence[Transform]) -> None:
        """Raise if this transform cannot run in `stack` (outermost first)."""

    def metrics(self, state: Any) -> dict:
        """Entries this transform adds to the metrics the step returns."""
        return {}

    def describe(self) -> str:
        return self.name


class Explanation:
    """The rewritten program of every rank: `str()` for people, `.data` for plots."""

    def __init__(self, transforms: Sequence[Transform], programs: dict[int, list[Op]]):
        self.transforms = tuple(transforms)
        self.programs = programs

    @property
    def data(self) -> dict[int, list[dict]]:
        return {r: [op.as_dict() for op in ops] for r, ops in self.programs.items()}

    def __str__(self) -> str:
        stack = " ∘ ".join(t.describe() for t in self.transforms) or "(no transforms)"
        lines = [f"step = {stack}"]
        for rank, ops in self.programs.items():
            lines.append(f"rank {rank}:")
            lines += _render(ops, indent="  ")
        return "\n".join(lines)

    __repr__ = __str__


def _render(ops: Sequence[Op], indent: str) -> list[str]:
    lines = []
    for op in ops:
        text = f"{indent}{op.name}"
        if op.detail:
            text += f": {op.detail}"
        if op.nbytes:
            text += f" [{op.nbytes / 2**20:.2f} MiB]"
        if op.overlaps:
            text += f" (overlaps {op.overlaps})"
        lines.append(text)
        lines += _render(op.body, indent + "    ")
    return lines


class Step:
    """`fn(state, *args) -> (state, metrics)` with transforms (outermost first) active."""

    def __init__(self, fn: Callable, transforms: Sequence[Transform] = ()):
        self.fn = fn
        self.transforms = tuple(transforms)
        for t in self.transforms:
            t.check(self.transforms)
        self._params_layout: Any = None
        functools.update_wrapper(self, fn, updated=())

    def init(self, state: Any) -> Any:
        """Lay out `state` for this rank (innermost transform first)."""
        for t in reversed(self.transforms):
            state = t.init(state)
        self._params_layout = T.map(lambda x: torch.empty_like(x, device="meta"), state.params)
        return state

    def __call__(self, state: Any, *args: Any, **kwargs: Any) -> Any:
        with primitives.handling(self.transforms, state):
            state, metrics = self.fn(state, *args, **kwargs)
        for t in self.transforms:
            extra = t.metrics(state)
            if extra:
                metrics = {**metrics, **extra}
        return state, metrics

    def gather(self, state: Any) -> Any:
        """The full, unsharded state (for eval or export)."""
        for t in self.transforms:
            state = t.gather(state)
        return state

    def explain(self, rank: int | None = None) -> Explanation:
        """Each rank's program (or one rank's) after every transform's rewrite."""
        if self._params_layout is None:
            raise RuntimeError("step.explain() describes the state's layout: call step.init(state) first")
        from sharded.mesh import Mesh

        world = Mesh.current().world_size
        ranks = range(world) if rank is None else [rank]
        programs = {}
        for r in ranks:
            program = _base_program()
            info = ProgramInfo(rank=r, world_size=world, params=self._params_layout)
            for t in reversed(self.transforms):
                program = t.explain(program, info)
            programs[r] = program
        return Explanation(self.transforms, programs)

    def __repr__(self) -> str:
        stack = " ∘ ".join(t.describe() for t in self.transforms)
        return f"Step({stack} ∘ {getattr(self.fn, '__name__', 'fn')})"


def transform(cls: type[Transform]) -> Callable:
    """Make `cls` usable as `t(fn)`, `t(step)`, `t(**options)(fn)` and, where the
    first option reads naturally unnamed, `t("bf16")(fn)`."""

    @functools.wraps(cls, updated=())
    def factory(*args: Any, **options: Any) -> Any:
        if args and callable(args[0]):
            fn, rest = args[0], args[1:]
            if rest:
                raise TypeError(f"{cls.name}(fn) takes the step alone; pass options by name: {cls.name}(**options)(fn)")
            return _wrap(cls(**options), fn)
        t = cls(*args, **options)
        return lambda f: _wrap(t, f)

    return factory


def _wrap(t: Transform, fn: Callable) -> Step:
    if isinstance(fn, Step):
        return Step(fn.fn, (t,) + fn.transforms)
    if not callable(fn):
        raise TypeError(f"{t.name} transforms a step function; got {type(fn).__name__}")
    return Step(fn, (t,))
