"""`Step`: a training step with a stack of transforms, and the protocol a transform follows.

    step = data_parallel(accumulate(steps=4)(train_step))
    state = step.init(state)            # each transform lays out the state for this rank
    state, metrics = step(state, batch) # train_step runs; its primitives are rewritten
    print(step.explain())               # the rewritten program, rank by rank

[Note: protocol v2] What a user holds, `shard_zero(stage=3)`, is a `TransformSpec`: an
immutable record of options. Each `Step` builds its own `Transform` from it (the
runtime: layouts, bucket plans, caches, groups), so one spec can wrap many steps and
nothing a step learns leaks into another. A Transform has
  - `level`: its place in the canonical order (`Level`); `levels` ({primitive: Level})
    places one primitive's handler elsewhere; the Step sorts its transforms
    by level, keeping the user's nesting only between transforms of one level, so
    `shard_zero(stage=3)(pipeline(f))` and `pipeline(shard_zero(stage=3)(f))` are one
    program. Where the nesting inside a level has no valid meaning, `check` raises
    naming the order that works;
  - `capabilities`: what it does (`Capability`); checks are written against these,
    never against another transform's name;
  - `handlers`: {primitive name: handler(next, *args)} (see `sharded.primitives`);
  - `init(state) -> state`: the state's layout on this rank;
  - `gather(state) -> state`: the inverse, the full state (`gather_params`: params only);
  - `explain(program, info) -> program`: its rewrite of the step's program, as `Op`s;
  - `check(stack)`: raise at construction when it cannot run in `stack`;
  - `require(stack)`: raise at `init` when the finished stack lacks what it needs;
  - `metrics(state) -> dict`: what it adds to the step's metrics (a loss scale, say);
  - `grad_scale`, `skipped_update`, `whole_update`: what a transform that rewrites the
    grads tells the others about this step's (a loss scale, a skipped update, grads
    that every rank holds whole).
Handlers apply outermost first; `init` runs innermost first, `gather` outermost first.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
from typing import Any, Callable, Mapping, Sequence

import torch

from sharded import primitives
from sharded import tree as T

__all__ = ["Capability", "Level", "Op", "ProgramInfo", "Step", "Transform", "TransformSpec", "transform"]


class Level(enum.IntEnum):
    """A transform's place in the canonical order, outermost first (decision 29)."""

    STORAGE = 5  # where the state's tensors live between steps: offload (laid out last, gathered first)
    PARALLEL = 10  # which rows and shards this rank holds, how grads travel: data_parallel, shard_zero, compress_grads
    MODEL = 15  # how the model's own tensors are split over ranks: tensor_parallel (laid out before ZeRO chunks its slices)
    SCHEDULE = 20  # how this rank's rows are cut into micro-batches and ordered: pipeline, accumulate
    MEMORY = 30  # what is kept between forward and backward: remat
    PRECISION = 40  # the dtype compute runs in: mixed_precision
    COMPILE = 50  # how a block's own forward runs, inside everything else's block work: compile
    HOST = 60  # where the optimizer runs, after every other update handler: offload's update


class Capability(enum.Flag):
    """What a transform does, as the checks of the others need to know it."""

    NONE = 0
    SPLITS_ROWS = enum.auto()  # takes this rank's rows of the global batch over `axis`
    REDUCES_GRADS = enum.auto()  # averages the grads over `axis` (binds "reduce_grads")
    SHARDS_PARAMS = enum.auto()  # between steps the params are this rank's chunks
    OWNS_UPDATE = enum.auto()  # rewrites the update: an optax-style `tx.update` beside it would be wrong
    MICROBATCHES = enum.auto()  # cuts the rows into micro-batches and sums their grads
    REDUCES_EACH_MICROBATCH = enum.auto()  # reduces after every micro-batch: the update's grads are a sum of reductions
    RUNS_SCHEDULE = enum.auto()  # runs the micro-batches itself, in its own order (pipeline)
    CASTS_PARAMS = enum.auto()  # computes with params in `param_dtype`
    SCALES_LOSS = enum.auto()  # multiplies the loss before backward and skips steps whose grads overflow
    REWRITES_GRADS = enum.auto()  # the update's grads are not the reductions' results (unscaled, exchanged momentum)
    HOSTS_PARAMS = enum.auto()  # keeps the params off the device between steps: ZeRO-3 fetches them per block, on one rank too
    RUNS_MODEL_WHOLE = enum.auto()  # runs model.apply as one function (compile's whole-model graph), the casts' `param_cast` inside it: no "block" is bound there


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
    level = Level.MEMORY
    capabilities = Capability.NONE
    levels: dict[str, Level] = {}  # a primitive whose handler sits elsewhere than `level`
    axis: str | None = None
    once = True  # applying it twice is a mistake (accumulate twice is not: k1 × k2 micro-batches)
    handlers: dict[str, Callable[..., Any]] = {}

    def init(self, state: Any) -> Any:
        return state

    def gather(self, state: Any) -> Any:
        return state

    def gather_params(self, params: Any) -> Any:
        """The full params from this rank's part of them (the optimizer state stays put)."""
        return params

    def params_group(self) -> Any:
        """With SHARDS_PARAMS: the process group whose ranks hold the other chunks of the
        params between steps (None: this transform leaves the params whole)."""
        return None

    def explain(self, program: list[Op], info: ProgramInfo) -> list[Op]:
        return program

    def check(self, stack: Sequence[Transform]) -> None:
        """Raise if this transform cannot run in `stack` (outermost first). A step is built
        from the inside out, so `stack` may still grow: check conflicts here."""

    def require(self, stack: Sequence[Transform]) -> None:
        """Raise if something this transform needs is missing from the finished `stack`
        (a transform to work with): `init` calls it before any transform lays out state."""

    def metrics(self, state: Any) -> dict:
        """Entries this transform adds to the metrics the step returns."""
        return {}

    def grad_scale(self, state: Any) -> float | torch.Tensor:
        """With SCALES_LOSS: the factor the grads carry from backward until the update
        divides it out (a loss scale), as `state` holds it; what a reduction that is not
        linear in the grads must divide out first."""
        return 1.0

    def skipped_update(self) -> bool:
        """With SCALES_LOSS: whether the update this step just ran skipped the step (its
        grads overflowed), so that state a transform changed earlier in the step (an
        exchange's error feedback) can be put back as the skipped step found it."""
        return False

    def param_cast(self, params: Any) -> Callable[[dict], dict] | None:
        """With CASTS_PARAMS: its cast of the params for compute as a pure function of
        them (what to cast decided now, from `params`), for a transform that runs the
        model whole (RUNS_MODEL_WHOLE) to fold into its graph; it then casts nothing
        itself in apply. None: it casts no params."""
        return None

    def whole_update(self, opt_state: Any) -> tuple[Any, Any] | None:
        """With REWRITES_GRADS: this step's update as every rank can run it alike on the
        whole params, or None: the grads of every leaf, whole and bitwise equal on every
        rank, and an optimizer state of whole tensors standing in for `opt_state` (this
        rank's chunks). A transform that shards the update (ZeRO-1/2) may then run it on
        the whole params and keep its chunks of the new state, with no params to gather
        (see [Note: an update every rank runs whole] in shard_zero.py)."""
        return None

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
    """`fn(state, *args) -> (state, metrics)` with transforms active, in canonical order.

    `specs` are the user's, outermost first; `transforms` are this step's own runtimes,
    built from them and sorted by `Level` (see [Note: protocol v2])."""

    def __init__(self, fn: Callable, specs: Sequence[TransformSpec] = ()):
        self.fn = fn
        self.specs = tuple(specs)
        for s in self.specs:
            if not isinstance(s, TransformSpec):
                raise TypeError(
                    f"Step takes transforms as sharded.transform(cls)(**options); got {type(s).__name__}: "
                    "declare it once with `my_transform = sharded.transform(MyTransform)`"
                )
        self.transforms = tuple(sorted((s.build() for s in self.specs), key=lambda t: t.level))
        _check_stack(self.transforms)
        for t in self.transforms:
            t.check(self.transforms)
        self._params_layout: Any = None
        functools.update_wrapper(self, fn, updated=())

    def init(self, state: Any) -> Any:
        """Lay out `state` for this rank (innermost transform first)."""
        from sharded.trace import laying_out

        for t in self.transforms:
            t.require(self.transforms)
        with laying_out(state.params):
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
        """The full, unsharded state, optimizer state included, on every rank (for
        tests and small models; to export, `gather_params` moves a quarter of it)."""
        for t in self.transforms:
            state = t.gather(state)
        return state

    def gather_params(self, state: Any) -> Any:
        """The full params on every rank, from this rank's part of them: the optimizer
        state never moves (decision 30)."""
        params = state.params
        for t in self.transforms:
            params = t.gather_params(params)
        return params

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


def _check_stack(stack: Sequence[Transform]) -> None:
    """A transform applied twice, or two that each average the grads over one axis."""
    names = [t.name for t in stack if t.once]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise ValueError(f"{twice} appears twice in the step; apply it once (with the options of both)")
    seen: dict[str, Transform] = {}
    for t in stack:
        if Capability.REDUCES_GRADS in t.capabilities:
            other = seen.setdefault(t.axis, t)
            if other is not t:
                raise ValueError(
                    f"{other.name} and {t.name} both average the grads over the {t.axis!r} axis; apply one of them "
                    "(shard_zero is data parallelism with sharded state: drop data_parallel)"
                )


@dataclasses.dataclass(frozen=True, eq=False)
class TransformSpec:
    """A transform as the user holds it: its class and options, validated, immutable.
    Calling it on a step function makes a `Step`, which builds its own runtime."""

    cls: type
    args: tuple
    options: Mapping[str, Any]

    def build(self) -> Transform:
        return self.cls(*self.args, **self.options)

    def __call__(self, fn: Callable) -> Step:
        if isinstance(fn, Step):
            return Step(fn.fn, (self,) + fn.specs)
        if not callable(fn):
            raise TypeError(f"{self.cls.name} transforms a step function; got {type(fn).__name__}")
        return Step(fn, (self,))

    def __repr__(self) -> str:
        spelled = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.options.items()]
        return f"{self.cls.name}({', '.join(spelled)})"


def _takes_state_and_batch(fn: Callable) -> bool:
    """Whether `fn` can be called as a step, fn(state, batch) (a Step always can)."""
    if isinstance(fn, Step):
        return True
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): let the call decide
        return True
    return True


def transform(cls: type[Transform]) -> Callable:
    """Make `cls` usable as `t(fn)`, `t(step)`, `t(**options)(fn)` and, where the
    first option reads naturally unnamed, `t("bf16")(fn)`. Options are checked now."""

    @functools.wraps(cls, updated=())
    def factory(*args: Any, **options: Any) -> Any:
        if args and callable(args[0]):
            fn, rest = args[0], args[1:]
            if rest or not _takes_state_and_batch(fn):
                raise TypeError(
                    f"{cls.name}(fn) takes the step, fn(state, batch), alone; pass options by name: "
                    f"{cls.name}(**options)(fn) (a predicate too, e.g. remat(policy=lambda name: ...))"
                )
            return factory(**options)(fn)
        cls(*args, **options)  # bad options raise here, where the user wrote them
        return TransformSpec(cls, args, dict(options))

    return factory
