"""`shard_zero(stage=1|2|3)`: ZeRO over the mesh's dp axis.

Reference semantics: those of `data_parallel` (the plain step on the global batch,
grads averaged over the dp ranks), with the model state split over those ranks:

    stage 1  optimizer state: each rank holds its chunk of every leaf
    stage 2  + grads: reduce-scattered during backward; each rank keeps its chunk
    stage 3  + params: each rank holds its chunk; whole params exist only while a
             block runs (see [Note: stage 3 params] in _stage3.py)

Chunks follow [Note: chunk layout] in sharded/sharding.py (DTensor's Shard(0) of the
flattened leaf); the state records them in `state.placements` (a cut over dp). The optimizer runs only on this rank's chunks, through the optimizer's fused
path; inside it, tree reductions (`clip_by_global_norm`) sum over the dp ranks. In
stages 1 and 2 the chunks are views of the full params, updated in place, then
all-gathered bucket by bucket.

Per-rank model-state bytes are the ZeRO paper's (Ψ·b params + Ψ·b grads + Ψ·K
optimizer, divided by N from the stage on), padding included: see
`sharded.memory.estimate_memory`, which tests/test_shard_zero.py holds this to.

`init` donates the state (decision 1): in stage 3 the full params' storage is
released once their chunks are taken, so the module's own tensors are empty after it.

Composes with `accumulate` (one reduction per update, in the last micro-batch's
backward); stage 3 must be outside it, since it replaces the params that the
differentiation starts from.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import optree
import torch

from sharded import comm, sharding
from sharded import tree as T
from sharded.grad import grad_pass
from sharded.mesh import Mesh
from sharded.step import Capability, Level, Op, ProgramInfo, Transform, transform
from sharded.transforms import _stage3
from sharded.transforms._batch import rank_rows
from sharded.placement import Cut, Placement
from sharded.sharding import ChunkLayout, local_chunk, map_chunked
from sharded.transforms._flat import FlatGroup, gather_leaf, plan_group
from sharded.transforms._reduce import GradReducer, ReadyOrder, broadcast_from_first, mean_over, plan_buckets, reduce_during_backward

__all__ = ["shard_zero"]


class ShardZero(Transform):
    name = "shard_zero"
    level = Level.PARALLEL

    def __init__(
        self,
        stage: int | None = None,
        bucket_mb: float = 200.0,  # decision 25
        prefetch: int = 1,
        reshard_after_forward: bool | None = None,
        reduce_dtype: torch.dtype | None = None,
        hybrid: int | None = None,
        reduce_every_microbatch: bool = False,
        mesh: Mesh | None = None,
        axis: str = "dp",
    ):
        if stage not in (1, 2, 3) or isinstance(stage, bool):
            raise ValueError(f"shard_zero(stage=...) must be 1, 2 or 3 (ZeRO's stages); got stage={stage!r}")
        if not bucket_mb > 0:
            raise ValueError(f"shard_zero(bucket_mb=...) must be positive; got {bucket_mb!r}")
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"shard_zero(prefetch=...) is how many blocks to gather ahead (an int >= 0); got {prefetch!r}")
        self.stage, self.bucket_bytes, self.prefetch = stage, int(bucket_mb * 2**20), prefetch
        if reduce_dtype is not None and not (isinstance(reduce_dtype, torch.dtype) and reduce_dtype.is_floating_point):
            raise ValueError(f"shard_zero(reduce_dtype=...) must be a floating torch.dtype (or None: the grads' own); got {reduce_dtype!r}")
        if hybrid is not None and (not isinstance(hybrid, int) or isinstance(hybrid, bool) or hybrid < 1):
            raise ValueError(f"shard_zero(hybrid=k) shards within groups of k dp ranks (an int >= 1); got {hybrid!r}")
        self.reshard_after_forward, self.reduce_dtype, self.mesh, self.axis = reshard_after_forward, reduce_dtype, mesh, axis
        self.hybrid = hybrid
        if reduce_every_microbatch and stage == 1:
            raise ValueError("shard_zero(stage=1) keeps whole grads, so reduce_every_microbatch saves nothing; use stage=2 or 3")
        self.reduce_every_microbatch = reduce_every_microbatch
        self._topology: _Topology | None = None
        self.capabilities = Capability.SPLITS_ROWS | Capability.REDUCES_GRADS | Capability.OWNS_UPDATE
        self.handlers = {"value_and_grad": self._value_and_grad, "update": self._update}
        if reduce_every_microbatch:
            self.capabilities |= Capability.REDUCES_EACH_MICROBATCH
        if stage == 3:
            self.capabilities |= Capability.SHARDS_PARAMS
            self.handlers.update(apply=self._apply, block=self._block)
        self._layout: ChunkLayout | None = None  # set by init
        self._like: list[torch.Tensor] = []  # a meta tensor per param leaf: its shape and dtype
        self._plans: dict[Any, list[FlatGroup]] = {}
        self.gather_dtype: torch.dtype | None = None  # set by check()
        self.gathers_alone = False  # set by check(): whether stage 3 gathers on one rank too
        self._order = ReadyOrder()
        self._stack: tuple[Transform, ...] = ()  # the finished stack, once `require` has seen it

    def describe(self) -> str:
        hybrid = f", sharded in groups of {self.hybrid}" if self.hybrid else ""
        return f"shard_zero(stage={self.stage}, {self.axis}={self._mesh().size(self.axis)}{hybrid})"

    def require(self, stack: Any) -> None:
        self._stack = tuple(stack)

    def check(self, stack: Any) -> None:
        # Stage 3 gathers params in the compute dtype of a transform that casts them
        # (half the bytes for bf16) and reduces their grads back to the masters' dtype.
        casts = [t.param_dtype for t in stack if Capability.CASTS_PARAMS in t.capabilities]
        self.gather_dtype = casts[0] if casts and self.stage == 3 else None
        # On one rank stage 3 has nothing to gather, but its gathers still run where they
        # do more: fetch params kept off the device (offload(params=True)) per block, or
        # cast them for a transform that casts (which leaves stage 3's params to them).
        hosted = any(Capability.HOSTS_PARAMS in t.capabilities for t in stack)
        self.gathers_alone = self.stage == 3 and (hosted or self.gather_dtype is not None)
        # By default stage 3 frees a block after its forward, except under a schedule
        # of micro-batches: there a stage's blocks run once per micro-batch, and
        # re-gathering them for each would multiply the all-gathers by m; they stay
        # until their grads are reduced.
        self.reshard = self.reshard_after_forward
        if self.reshard is None:
            self.reshard = not any(Capability.RUNS_SCHEDULE in t.capabilities for t in stack)

    # -- the axis -------------------------------------------------------------------

    def _mesh(self) -> Mesh:
        return self.mesh if self.mesh is not None else Mesh.current()

    def _axis(self) -> tuple[int, int, Any]:
        """(shard ranks, this rank among them, their group): what chunks are cut over."""
        t = self._topo()
        return t.shard_size, t.shard_rank, t.shard_group

    def _topo(self) -> _Topology:
        if self._topology is not None:
            return self._topology
        mesh = self._mesh()
        size = mesh.size(self.axis)
        if size == 1 and mesh.world_size > 1:
            raise ValueError(
                f"shard_zero shards over the mesh's {self.axis!r} axis, which has size 1 in {mesh}; "
                f"give the mesh a {self.axis} axis (e.g. sharded.Mesh({self.axis}={mesh.world_size})) or drop shard_zero"
            )
        rank, group = mesh.rank(self.axis), mesh.group(self.axis)
        k = self.hybrid or size
        if size % k:
            raise ValueError(f"shard_zero(hybrid={k}) needs the {self.axis} size ({size}) to be a multiple of {k}")
        if k == size:
            self._topology = _Topology(size, rank, group, size, rank, group, None)
        else:
            shard, replicate = _hybrid_groups(group, size, k)
            self._topology = _Topology(size, rank, group, k, rank % k, shard, replicate)
        return self._topology

    # -- layout ---------------------------------------------------------------------

    def init(self, state: Any) -> Any:
        self._topology = None
        self._topology = topo = self._topo()
        size, rank, group = topo.shard_size, topo.shard_rank, topo.shard_group
        broadcast_from_first(state, topo.dp_group)
        leaves = T.leaves(state.params)
        self._layout = ChunkLayout(
            group=group,
            ranks=size,
            rank=rank,
            params=self.stage == 3,
            treespec=T.structure(state.params),
            shapes=tuple(p.shape for p in leaves),
            chunked=tuple(isinstance(p, torch.Tensor) and p.is_floating_point() and p.numel() > 0 for p in leaves),
        )
        self._like = [torch.empty_like(p, device="meta") for p in leaves]
        self._device = leaves[0].device if leaves else torch.device("cpu")
        if size == 1:
            return state
        layout = self._layout

        def cut(x: torch.Tensor, i: int) -> torch.Tensor:
            return local_chunk(x.contiguous(), size, rank).clone()

        placements = state.placements.update(self._placements(state, topo))
        opt_state = map_chunked(state.opt_state, layout.treespec, layout.chunked, cut)
        if self.stage < 3:
            return state.replace(opt_state=opt_state, placements=placements)
        params = map_chunked(state.params, layout.treespec, layout.chunked, cut)
        for x, chunked in zip(leaves, layout.chunked):  # donated (decision 1): the full params' memory goes back now
            if chunked:
                x.untyped_storage().resize_(0)
        return state.replace(params=params, opt_state=opt_state, placements=placements)

    def _placements(self, state: Any, topo: _Topology) -> dict[str, Placement]:
        """The entries of `state.placements` for the leaves this transform cuts."""
        layout, cut = self._layout, Cut(self.axis, topo.shard_group, topo.shard_size, topo.shard_rank)
        parts = {"opt_state": state.opt_state, **({"params": state.params} if self.stage == 3 else {})}
        out = {}
        for part, tree in parts.items():
            marked = map_chunked(tree, layout.treespec, layout.chunked, lambda x, i: _Leaf(i))
            for path, leaf in T.leaves_with_paths(marked):
                if isinstance(leaf, _Leaf):
                    before = state.placements.get(part + path) or Placement(layout.shapes[leaf.index])
                    out[part + path] = before.cut(cut)
        return out

    def gather_params(self, params: Any) -> Any:
        layout = self._layout
        if self.stage < 3 or layout is None or layout.ranks == 1:
            return params
        return map_chunked(params, layout.treespec, layout.chunked, lambda x, i: gather_leaf(x, layout.shapes[i], layout.group, layout.ranks))

    def gather(self, state: Any) -> Any:
        size, _, group = self._axis()
        layout = self._layout
        if size == 1 or layout is None:
            return state

        def whole(x: torch.Tensor, i: int) -> torch.Tensor:
            return gather_leaf(x, layout.shapes[i], group, size)

        params = map_chunked(state.params, layout.treespec, layout.chunked, whole) if layout.params else state.params
        opt_state = map_chunked(state.opt_state, layout.treespec, layout.chunked, whole)
        return state.replace(params=params, opt_state=opt_state, placements=state.placements.map(lambda p: p.uncut(self.axis)))

    def _buckets(self, leaves: list[torch.Tensor], size: int) -> list[FlatGroup]:
        key = tuple((x.shape, x.dtype, x.device) for x in leaves)
        order = self._order.get(key)
        if (key, order is None) not in self._plans:
            buckets = plan_buckets(leaves, self.bucket_bytes, order)
            self._plans[(key, order is None)] = [plan_group(f"bucket {b}", k.leaves, leaves, size) for b, k in enumerate(buckets)]
        return self._plans[(key, order is None)]

    def _units(self, model: Any, size: int) -> list[FlatGroup | None]:
        """One group per traced block (stage 3's gather unit), in model.blocks order."""
        key = ("units", id(model))
        if key not in self._plans:
            spec, shapes, sharded = self._layout.treespec, self._layout.shapes, self._layout.chunked
            names = [path[0] for path in optree.tree_paths(T.unflatten(spec, list(range(len(shapes)))), namespace="sharded")]
            index = {name: i for i, name in enumerate(names)}
            units = []
            for block in model.blocks:
                idx = [index[n] for n in block.params if n in index and sharded[index[n]]]
                dtypes = {self._like[i].dtype for i in idx}
                if len(dtypes) > 1:
                    raise ValueError(
                        f"shard_zero(stage=3) gathers each block in one buffer, but block {block.name!r} mixes "
                        f"{sorted(str(d) for d in dtypes)}; cast the model to one dtype (mixed_precision keeps the rest)"
                    )
                unit = plan_group(block.name, idx, self._like, size) if idx else None
                if unit is not None:
                    unit = dataclasses.replace(unit, device=self._device, dtype=self.gather_dtype or unit.dtype)
                units.append(unit)
            self._plans[key] = units
        return self._plans[key]

    # -- handlers -------------------------------------------------------------------

    def _reducer(self, gp: Any, groups: list[FlatGroup], **options: Any) -> GradReducer:
        """The grad pass's reducer; with reduce_every_microbatch it reduces after every
        backward into summed chunks, so no whole-size grad outlives a micro-batch."""
        t = self._topo()
        reducer = GradReducer(
            gp.leaves, groups, t.shard_group, t.shard_rank, dtype=options.pop("dtype", self.reduce_dtype),
            replicate_group=t.replicate_group, scale=1.0 / t.dp_size, summed=self.reduce_every_microbatch, **options,
        )
        if self.reduce_every_microbatch:
            gp.every_pass = True
            gp.on_pass_end.append(reducer.end_pass)
        return reducer

    def _value_and_grad(self, next_: Callable, fn: Callable, has_aux: bool, params: Any, args: tuple, kwargs: dict) -> Any:
        t = self._topo()
        if t.dp_size == 1 and not self.gathers_alone:
            return next_(fn, has_aux, params, args, kwargs)
        local = rank_rows(args, t.dp_size, t.dp_rank, who=f"shard_zero(stage={self.stage})")
        if self.stage == 3:
            return self._value_and_grad_stage3(next_, fn, has_aux, params, local, kwargs, t)
        # stage 1 reduce-scatters too: its update reads only this rank's chunk of the grads,
        # so an all-reduce would move twice the bytes for rows no one reads (decision 39)
        make = lambda gp: self._reducer(gp, self._buckets(gp.leaves, t.shard_size), scatter=True)  # noqa: E731
        learn = lambda gp: self._order.learn(tuple((x.shape, x.dtype, x.device) for x in gp.leaves), gp, t.dp_group)  # noqa: E731
        return reduce_during_backward(self, make, next_, fn, has_aux, params, local, kwargs, t.dp_group, t.dp_size, learn)

    def _gatherer(self, chunks: list[torch.Tensor], size: int, group: Any) -> _stage3.Gatherer:
        layout = self._layout
        return _stage3.Gatherer(
            chunks, layout.shapes, layout.chunked, group, self.prefetch, self.reshard, self._device, dtype=self.gather_dtype
        )

    def _value_and_grad_stage3(self, next_, fn, has_aux, params, local, kwargs, t: _Topology) -> Any:
        spec = self._layout.treespec
        with self._gatherer(T.leaves(params), t.shard_size, t.shard_group) as gatherer:
            full = T.unflatten(spec, gatherer.full)
            with grad_pass(full) as (gp, owner):
                gatherer.grad_pass = gp
                value, _ = next_(fn, has_aux, full, local, kwargs)
                if gatherer.units is None:
                    raise RuntimeError("shard_zero(stage=3) gathers params inside model.apply; the loss never called it")
                return mean_over(value, t.dp_group, t.dp_size), (gp.grads() if owner else None)

    def _apply(self, next_: Callable, model: Any, params: Any, args: tuple, kwargs: dict) -> Any:
        size, rank, group = self._axis()
        if size == 1 and not self.gathers_alone:
            return next_(model, params, args, kwargs)
        gatherer = _stage3.current()
        if gatherer is None and _differentiated(params):  # torch.func or autograd over the chunks, in the step's code
            layout = self._layout
            whole = lambda x, i: sharding.whole(x, layout.shapes[i], group, size, rank)  # noqa: E731
            return next_(model, map_chunked(params, layout.treespec, layout.chunked, whole), args, kwargs)
        if gatherer is None:  # a forward outside value_and_grad (eval in the step): gather per block for this call
            with self._gatherer(T.leaves(params), size, group) as g:
                self._bind(g, model, size, rank, group)
                g.ensure_roots()
                return next_(model, T.unflatten(self._layout.treespec, g.full), args, kwargs)
        self._bind(gatherer, model, size, rank, group)
        gatherer.ensure_roots()
        return next_(model, params, args, kwargs)

    def params_group(self) -> Any:
        return self._axis()[2] if self.stage == 3 and self._layout is not None else None

    def _bind(self, g: _stage3.Gatherer, model: Any, size: int, rank: int, group: Any) -> None:
        """First apply of a differentiation: the units, the hooks, the grad reducer."""
        if g.units is not None:
            return
        units = self._units(model, size)
        g.bind_units(units, [not b.name.startswith("<") for b in model.blocks])
        gp = getattr(g, "grad_pass", None)
        if gp is not None:
            order = [u for u in reversed(range(len(units))) if units[u] is not None]
            masters = next(c.dtype for c, chunked in zip(g.chunks, self._layout.chunked) if chunked)
            reducer = self._reducer(
                gp, [units[u] for u in order], scatter=True, on_filled=lambda j: g.free(order[j]),
                dtype=self.reduce_dtype or masters, out_dtype=masters,
            )
            gp.attached[self] = reducer
            gp.listen(reducer.ready)
            gp.finalize = lambda: T.unflatten(gp.treespec, reducer.result())

    def _block(self, next_: Callable, call: Any, params: dict, buffers: dict, args: tuple, kwargs: dict) -> Any:
        """Gather the block before it runs (prefetching the next); free it after, and
        gather it again when its output's grads arrive (see [Note: stage 3 params])."""
        g = _stage3.current()
        if g is None or g.units is None:
            return next_(call, params, buffers, args, kwargs)
        g.ensure(call.index)
        out = next_(call, params, buffers, args, kwargs)
        g.after_forward(call.index, out)
        return out

    def _update(self, next_: Callable, tx: Any, grads: Any, opt_state: Any, params: Any) -> Any:
        size, rank, group = self._axis()
        if size == 1:
            return next_(tx, grads, opt_state, params)
        if self.stage < 3:
            whole = next((w for w in (t.whole_update(opt_state) for t in self._stack) if w is not None), None)
            if whole is not None:
                return self._update_whole(next_, tx, *whole, opt_state, params)
        with T.sharded_over(group):
            if self.stage == 3:
                return next_(tx, grads, opt_state, params)
            leaves, sharded = T.leaves(params), self._layout.chunked
            chunks = [local_chunk(p, size, rank) if s else p for p, s in zip(leaves, sharded)]
            _, opt_state = next_(tx, grads, opt_state, T.unflatten(self._layout.treespec, chunks))
        buckets = self._buckets(leaves, size)
        started = [b.gather([chunks[i] for i in b.leaves], group, async_op=True) for b in buckets]
        for b, (rows, pending) in zip(buckets, started):
            pending.wait()
            b.read_all(rows, [leaves[i] for i in b.leaves])
        return params, opt_state

    def _update_whole(self, next_: Callable, tx: Any, grads: Any, stand_in: Any, opt_state: Any, params: Any) -> Any:
        """[Note: an update every rank runs whole] Stages 1 and 2 update this rank's chunk
        and all-gather the params, which costs as much as an uncompressed reduction. When
        a transform offers this step's grads whole and bitwise equal on every rank, with
        an optimizer state of whole tensors standing in for the chunks (`whole_update`:
        1-bit Adam after warmup, whose exchange all-gathers the new momentum and whose
        frozen variance every rank keeps), every rank runs the optimizer on the whole
        params by one kernel, so the params stay equal without a gather; this rank keeps
        its chunks of the new state. A skipped update (an overflow) keeps the state as
        it was, since the stand-in is not it."""
        params, new = next_(tx, grads, stand_in, params)
        if any(t.skipped_update() for t in self._stack):
            return params, opt_state
        layout = self._layout
        return params, map_chunked(new, layout.treespec, layout.chunked, lambda x, i: local_chunk(x, layout.ranks, layout.rank).clone())

    # -- explain --------------------------------------------------------------------

    def explain(self, program: list[Op], info: ProgramInfo) -> list[Op]:
        size = self.hybrid or self._mesh().size(self.axis)
        if size == 1:
            return program
        leaves = T.leaves(info.params)
        buckets = self._buckets(leaves, size)
        itemsize = lambda g: torch.empty((), dtype=g.dtype).element_size()  # noqa: E731
        r = info.rank % size
        out = [Op("data", "slice batch", f"rows {r}/{size} of the global batch (dp rank {r})")]
        if self.stage == 3:
            out.append(Op("collective", "all_gather per block", f"each block's params just before its forward and again before its backward, {self.prefetch} block(s) ahead; freed after use"))
        for op in program:
            out.append(op)
            if _contains(op, "backward") and self.stage == 3:
                out.append(Op("collective", "reduce_scatter grads per block", f"as each block's backward completes, over {self.axis}={size}", overlaps="backward"))
            elif _contains(op, "backward"):
                for b, g in enumerate(buckets):
                    out.append(Op("collective", f"reduce_scatter grads {g.name}", f"{len(g.leaves)} leaves, over {self.axis}={size}", nbytes=size * g.size * itemsize(g), overlaps="backward" if b < len(buckets) - 1 else ""))
            if op.name == "update":
                out[-1] = Op("compute", "update", f"optimizer step on this rank's 1/{size} chunk of every leaf")
                if self.stage < 3:
                    for g in buckets:
                        out.append(Op("collective", f"all_gather params {g.name}", "updated chunks to every rank", nbytes=size * g.size * itemsize(g), overlaps="the next bucket's gather"))
        return out


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """A marker standing for param leaf `index` (or its optimizer-state mirror): a pytree leaf."""

    index: int


class _Topology(NamedTuple):
    """The dp ranks (the batch is split and loss averaged over all of them), the group
    that chunks are cut over, and (hybrid sharding) the group that holds replicas."""

    dp_size: int
    dp_rank: int
    dp_group: Any
    shard_size: int
    shard_rank: int
    shard_group: Any
    replicate_group: Any


def _hybrid_groups(dp_group: Any, size: int, k: int) -> tuple[Any, Any]:
    """This rank's shard group (k consecutive dp ranks) and replica group (the ranks at
    its position in every shard group). Every rank creates every group, in one order."""
    dist = torch.distributed
    ranks = dist.get_process_group_ranks(dp_group)
    everyone = _every_dp_group(ranks)
    shard = replicate = None
    for dp_ranks in everyone:
        for s in range(size // k):
            g = dist.new_group(dp_ranks[s * k : (s + 1) * k])
            if dp_ranks == ranks and dist.get_rank() in dp_ranks[s * k : (s + 1) * k]:
                shard = g
        for j in range(k):
            g = dist.new_group(dp_ranks[j::k])
            if dp_ranks == ranks and dist.get_rank() in dp_ranks[j::k]:
                replicate = g
    return shard, replicate


def _every_dp_group(mine: list[int]) -> list[list[int]]:
    """The ranks of every dp group of the world (one per coordinate on the other axes)."""
    dist = torch.distributed
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return [list(r) for r in sorted({tuple(r) for r in gathered})]


def _differentiated(params: Any) -> bool:
    """Whether a forward on these params will be differentiated: they require grad, or a
    torch.func transform wraps them."""
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and (x.requires_grad or comm.is_functorch_wrapped(x)) for x in T.leaves(params)
    )


def _contains(op: Op, name: str) -> bool:
    return op.name == name or any(_contains(o, name) for o in op.body)


shard_zero = transform(ShardZero)
