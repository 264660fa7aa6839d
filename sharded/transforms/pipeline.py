"""`pipeline(stages=p, microbatches=m, schedule=..., virtual=v, partition=...)`: pipeline
parallelism over the mesh's pp axis.

Reference semantics (equal to the plain step, up to float rounding):

    grads = mean over the m row-slices b_i of the batch of grad(loss)(params, b_i)
    loss  = mean of the m losses (float metrics from `has_aux` the same), on every rank

The model's blocks are cut into p·v chunks (see sharded/transforms/_stages.py); chunk k
runs on pp rank k % p, and each rank's state holds only its chunks' params (`init`
drops and frees the rest). The user's step is unchanged: the same `train_step` runs
on every rank, and [Note: pipeline forward] explains how each rank runs only its part
of it. The order of forwards, backwards, sends and receives is data
(sharded/transforms/_schedules.py) that `_Run` executes. Each dp rank pipelines its own
rows: `data_parallel` and `shard_zero` sit outside the pipeline in the canonical order.

[Note: pipeline forward] For the forward of micro-batch mb through chunk k, the user's
loss function is called as usual. Inside `model.apply`, params of other chunks are
meta tensors and, for k > 0, so are the call's tensor arguments: the code before the
chunk runs on shapes only (blocks of earlier chunks replay their recorded output
structure, _shape_replay.py). The pipeline's handler of the "block" primitive swaps
the tensor inputs of the chunk's first block for those received from chunk k-1
(hidden states, and any mask or rotary tables the blocks pass along); at the next
chunk's first block it raises `_Boundary` with that block's inputs, which are this
chunk's outputs, to be sent on. Only the last chunk runs to the loss. Code before the first block must
therefore run on meta tensors (shape arithmetic, embedding lookups, masks built from
the inputs' device); a model whose prefix reads a module buffer elementwise is not
supported there.

Stacks with every transform: `accumulate` around it runs the whole schedule once per
accumulation step; inside it, it is refused (it would cut each micro-batch again). The grads of a
weight two chunks share (a tied embedding and head) are summed over the pp ranks before
any reduction around the pipeline sees them.
"""
from __future__ import annotations

import contextvars
import dataclasses
import time
from typing import Any, Callable

import optree
import torch

from sharded import comm
from sharded import tree as T
from sharded.grad import grad_pass
from sharded.mesh import Mesh
from sharded.step import Capability, Level, Op, ProgramInfo, Transform, transform
from sharded.trace import Model, model_of
from sharded.transforms._batch import mean_floats, split
from sharded.transforms._shape_replay import ShapeReplay
from sharded.transforms._schedules import SCHEDULES, Action, simulate, with_comm
from sharded.transforms._stages import ChunkPlan, plan_chunks

__all__ = ["pipeline"]


class _Boundary(Exception):
    """Raised at the next chunk's first block: its inputs are this chunk's outputs."""

    def __init__(self, args: Any):
        super().__init__("pipeline chunk boundary")
        self.args = args


@dataclasses.dataclass
class _Forward:
    """The forward being run on this rank: its chunk and the inputs it received."""

    plan: ChunkPlan
    chunk: int
    inputs: list[torch.Tensor] | None
    swapped: dict[int, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)  # id(meta) -> (meta, received)


_running: contextvars.ContextVar[_Forward | None] = contextvars.ContextVar("sharded_pipeline", default=None)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in T.leaves(tree) if isinstance(x, torch.Tensor)]


def _replace_tensors(tree: Any, new: list[torch.Tensor]) -> Any:
    it = iter(new)
    out = T.map(lambda x: next(it) if isinstance(x, torch.Tensor) else x, tree)
    return out


def _meta(x: Any) -> Any:
    return torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.bool, torch.uint8]
_HEADER = 64  # int64s in a header: count, then (dtype, requires_grad, ndim, *shape) per tensor


def _connect(links: dict[tuple[int, int], Any], me: int, device: torch.device) -> None:
    """Every link carries one scalar at `init`, in the global order of links (so two
    ranks never wait on different links of each other). NCCL creates a link's
    communicator, and opens its connection, on first use, in a handshake that blocks
    the host until the peer joins. Inside a schedule that handshake can deadlock: under
    GPipe the last stage first sends back only after its host has queued every forward
    and a backward, which wait on a receive the first stage cannot post while its host
    is stuck in the handshake (seen over NCCL on 2 H200s)."""
    for (sender, receiver), group in sorted(links.items()):
        op = ("send", torch.zeros(1, device=device), receiver) if me == sender else ("recv", torch.empty(1, device=device), sender)
        comm.exchange([op], group).wait()


def _header(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    fields = [len(tensors)]
    for x in tensors:
        fields += [_DTYPES.index(x.dtype), int(x.requires_grad), x.ndim, *x.shape]
    if len(fields) > _HEADER:
        raise ValueError(f"pipeline: a chunk boundary passes {len(tensors)} tensors, too many to describe in {_HEADER} ints")
    return torch.tensor(fields + [0] * (_HEADER - len(fields)), dtype=torch.int64, device=device)


def _from_header(h: list[int]) -> list[tuple[torch.dtype, bool, tuple[int, ...]]]:
    out, pos = [], 1
    for _ in range(h[0]):
        dtype, grad, ndim = _DTYPES[h[pos]], bool(h[pos + 1]), h[pos + 2]
        out.append((dtype, grad, tuple(h[pos + 3 : pos + 3 + ndim])))
        pos += 3 + ndim
    return out


class Pipeline(Transform):
    name = "pipeline"
    level = Level.SCHEDULE
    capabilities = Capability.MICROBATCHES | Capability.RUNS_SCHEDULE | Capability.OWNS_UPDATE

    def __init__(
        self,
        stages: int | None = None,
        microbatches: int = 1,
        schedule: str = "1f1b",
        virtual: int | None = None,
        partition: Any = "params",
        mesh: Mesh | None = None,
        axis: str = "pp",
    ):
        for what, value in (("stages", stages), ("microbatches", microbatches)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"pipeline({what}=...) needs a positive int; got {what}={value!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"pipeline(schedule={schedule!r}): choose one of {', '.join(map(repr, SCHEDULES))}")
        self.stages, self.microbatches, self.schedule_name = stages, microbatches, schedule
        self.virtual = virtual if virtual is not None else (2 if schedule == "interleaved" else 1)
        self.chunks = self.stages * self.virtual
        self.schedule = SCHEDULES[schedule](stages, microbatches, self.virtual)  # validates m, v
        self.partition, self.mesh, self.axis = partition, mesh, axis
        self.who = f"pipeline(stages={stages})" if self.virtual == 1 else f"pipeline(stages={stages}, virtual={self.virtual})"
        self.handlers = {"value_and_grad": self._value_and_grad, "apply": self._apply, "block": self._block, "update": self._update}
        self.record_timeline = False  # set True to keep each step's measured action times
        self.timeline: list[tuple[Action, float, float]] = []
        self.peak_held = 0  # the last step's most micro-batches whose activations this rank held at once
        self._plan: ChunkPlan | None = None
        self._topology: tuple[int, Any, list[int]] | None = None
        self._actions = with_comm(self.schedule, self.chunks)  # each rank's list, sends and receives included
        self._views: dict[int, tuple[Model, dict]] = {}
        self._value_spec: Any = None  # the structure of the step's value, learned on the first step
        # Boundary tensors' (dtype, requires_grad, shape), by (chunk, micro-batch shapes):
        # described in a header the first time, known to both ends after.
        self._shapes: dict[tuple, list] = {}
        self._sent: set[tuple] = set()

    def check(self, stack: Any) -> None:
        inner = [t for t in stack[stack.index(self) + 1 :] if Capability.MICROBATCHES in t.capabilities]
        if inner:
            t = inner[0]
            raise ValueError(
                f"{t.describe()} inside {self.who} would cut every micro-batch of the schedule again; "
                f"put it outside: {t.describe()}({self.who}(train_step)), or give the pipeline more micro-batches"
            )

    def describe(self) -> str:
        v = f", virtual={self.virtual}" if self.virtual > 1 else ""
        return f"pipeline(stages={self.stages}, microbatches={self.microbatches}, {self.schedule_name}{v})"

    # -- layout ---------------------------------------------------------------------

    def _topo(self) -> tuple[int, Any, list[int]]:
        """(this rank's pp coordinate, the pp group, the pp group's global ranks), found at `init`."""
        if self._topology is None:
            self._topology = self._find_topo()
        return self._topology

    def _mesh(self) -> Mesh:
        return self.mesh if self.mesh is not None else Mesh.current()

    def _find_topo(self) -> tuple[int, Any, list[int]]:
        mesh = self._mesh()
        size = mesh.size(self.axis)
        if size != self.stages:
            raise ValueError(
                f"{self.who} runs over the mesh's {self.axis!r} axis, which has size {size} in {mesh}; "
                f"use a mesh with {self.axis}={self.stages} (e.g. sharded.Mesh({self.axis}={self.stages}, dp=...))"
            )
        group = mesh.group(self.axis)
        ranks = torch.distributed.get_process_group_ranks(group) if group is not None else [0]
        return mesh.rank(self.axis), group, ranks

    def init(self, state: Any) -> Any:
        model = model_of(state.params)
        if model is None:
            raise ValueError(
                f"{self.who} cuts the model by its blocks, but no traced model has these params; "
                "create the state from `sharded.trace(module).params`"
            )
        self._topology = None  # the mesh may have changed since the last init
        rank, group, ranks = self._topo()
        self._links = self._mesh().links(self.axis)
        _connect(self._links, ranks[rank], next(iter(state.params.values())).device)
        self._model, self._names = model, list(state.params)
        self._plan = plan = plan_chunks(model, self.chunks, self.partition, self.who)
        self._replay = ShapeReplay()
        self._block_index = {name: i for i, name in enumerate(plan.blocks)}
        self._mine = [k for k in range(self.chunks) if k % self.stages == rank]
        keep = set(plan.held_by(self._mine))
        self._like = {n: torch.empty_like(p, device="meta") for n, p in state.params.items()}
        self._opt_spec = _params_dicts(state.opt_state, frozenset(self._names))
        for name, x in state.params.items():  # donated (decision 1): other stages' params are freed
            if name not in keep:
                x.untyped_storage().resize_(0)
        params = {n: p for n, p in state.params.items() if n in keep}
        opt_state = _select(state.opt_state, self._opt_spec, keep)
        return state.replace(params=params, opt_state=opt_state)

    def gather_params(self, params: Any) -> Any:
        """Every param from the first stage that holds it, one broadcast each."""
        if self._plan is None or self.stages == 1:
            return params
        rank, group, ranks = self._topo()
        device = next(iter(params.values())).device if params else torch.device("cpu")
        out = {}
        for name in self._names:
            holder = min(k % self.stages for k in self._plan.holders[name])
            like = self._like[name]
            x = params[name] if holder == rank else torch.empty(like.shape, dtype=like.dtype, device=device)
            comm.broadcast(x, src=ranks[holder], group=group)
            out[name] = x
        return out

    def gather(self, state: Any) -> Any:
        if self._plan is None or self.stages == 1:
            return state
        _, group, _ = self._topo()
        parts = comm.all_gather_object((state.params, self._opt_spec.flatten_up_to(state.opt_state)), group=group)
        params = _merge([p for p, _ in parts], self._names)
        leaves = []
        for i, first in enumerate(parts[0][1]):
            is_dict = isinstance(first, dict) and set(first) <= set(self._names)
            leaves.append(_merge([o[i] for _, o in parts], self._names) if is_dict else first)
        return state.replace(params=params, opt_state=self._opt_spec.unflatten(leaves))

    # -- handlers -------------------------------------------------------------------

    def _apply(self, next_: Callable, model: Any, params: dict, args: tuple, kwargs: dict) -> Any:
        run = _running.get()
        if run is None:
            raise RuntimeError(
                f"{self.who}: model.apply outside value_and_grad (an eval, or torch.func over the model in the step's "
                "own code) is not pipelined: each pp rank holds only its stage's params; evaluate on step.gather_params(state)"
            )
        view, placeholders = self._view(model, run.chunk)
        full = {**placeholders, **{n: p for n, p in params.items() if self._plan.name_chunk.get(n) == run.chunk}}
        full.update({a: params[c] for a, c in model.tied.items() if self._plan.name_chunk[a] == run.chunk and c in params})
        if run.chunk > 0:
            args, kwargs = T.map(_meta, (args, kwargs))
        return next_(view, full, args, kwargs)

    def _view(self, model: Model, chunk: int) -> tuple[Model, dict]:
        """The model as chunk `chunk` runs it (other chunks' buffers on meta), and meta
        placeholders for every param name (tied aliases included)."""
        if chunk not in self._views:
            plan = self._plan
            buffers = {n: (b if plan.buffer_chunk.get(n, chunk) == chunk else _meta(b)) for n, b in model.buffers.items()}
            placeholders = {n: self._like[model.tied.get(n, n)] for n in plan.name_chunk}
            self._views[chunk] = (model.with_buffers(buffers), placeholders)
        return self._views[chunk]

    def _block(self, next_: Callable, call: Any, params: dict, buffers: dict, args: tuple, kwargs: dict) -> Any:
        """Run the block as this chunk's forward needs it (see [Note: pipeline forward])."""
        run = _running.get()
        i = self._block_index.get(call.name) if self._plan is not None else None
        if run is None or i is None:
            return next_(call, params, buffers, args, kwargs)
        first = run.plan.first_block
        if i < first[run.chunk]:  # an earlier chunk's block: only its output's structure matters
            return self._replay.call(call.name, lambda a, k: next_(call, params, buffers, a, k), args, kwargs)
        if run.chunk > 0 and i == first[run.chunk]:
            metas = _tensors((args, kwargs))
            run.swapped = {id(m): (m, x) for m, x in zip(metas, run.inputs)}
            args, kwargs = _replace_tensors((args, kwargs), run.inputs)
        elif run.swapped:  # later blocks get the prefix's values (a mask, say) again: swap them too
            args, kwargs = _replace_tensors((args, kwargs), [run.swapped.get(id(x), (x, x))[1] for x in _tensors((args, kwargs))])
        if run.chunk + 1 < run.plan.chunks and i == first[run.chunk + 1]:
            raise _Boundary((args, kwargs))
        return next_(call, params, buffers, args, kwargs)

    def _value_and_grad(self, next_: Callable, fn: Callable, has_aux: bool, params: Any, args: tuple, kwargs: dict) -> Any:
        with grad_pass(params) as (gp, owner):
            box: dict[str, Any] = {}

            def whole_schedule(leaves: Any, *rows: Any, **kw: Any) -> Any:
                micro = split(
                    rows, self.microbatches, who=f"pipeline(microbatches={self.microbatches})",
                    fix="make the (per-rank) batch a multiple of the micro-batch count",
                )
                box["value"] = _Run(self, fn, has_aux, leaves, micro, kw, gp).run()
                done = torch.zeros((), requires_grad=True)  # the grads are in already
                return (done, None) if has_aux else done

            next_(whole_schedule, has_aux, params, args, kwargs)
            return box["value"], (gp.grads() if owner else None)

    def _update(self, next_: Callable, tx: Any, grads: Any, opt_state: Any, params: Any) -> Any:
        """The optimizer sees this stage's part of the grads: its reductions (a global
        norm) sum over the stages, counting a weight that two stages hold once."""
        if self.stages == 1:
            return next_(tx, grads, opt_state, params)
        rank, group, _ = self._topo()
        holders = self._plan.holders
        elsewhere = [g for n, g in grads.items() if n in holders and min(k % self.stages for k in holders[n]) != rank]
        with T.sharded_over(group, counted_elsewhere=elsewhere):
            return next_(tx, grads, opt_state, params)

    # -- explain --------------------------------------------------------------------

    def explain(self, program: list[Op], info: ProgramInfo) -> list[Op]:
        rank = (info.rank // max(1, info.world_size // self.stages)) % self.stages
        actions = self.actions(rank)
        body = tuple(Op("p2p" if "_" in a.kind else "compute", str(a), _describe(a)) for a in actions)
        sched = Op("repeat", f"{self.schedule_name} schedule, pp rank {rank}", f"chunks {[k for k in range(self.chunks) if k % self.stages == rank]}, {self.microbatches} micro-batches", body=body)
        out = []
        for op in program:
            if op.name == "forward":
                out.append(sched)
            elif op.name == "backward":
                continue
            else:
                out.append(op)
        return out

    def actions(self, rank: int) -> list[Action]:
        """pp rank `rank`'s schedule: its forwards, backwards, sends and receives, in order."""
        return self._actions[rank]

    def bubble(self) -> float:
        """The schedule's idle fraction with backward = 2 × forward (simulated)."""
        return simulate(self.schedule, self.chunks).bubble


def _describe(a: Action) -> str:
    return {
        "F": f"forward of micro-batch {a.mb} through chunk {a.chunk}",
        "B": f"backward of micro-batch {a.mb} through chunk {a.chunk}",
        "recv_f": f"receive chunk {a.chunk}'s inputs",
        "send_f": f"send chunk {a.chunk}'s outputs",
        "recv_b": f"receive the grads of chunk {a.chunk}'s outputs",
        "send_b": f"send the grads of chunk {a.chunk}'s inputs",
    }[a.kind]


class _Run:
    """One step's schedule on this rank: runs its actions in order."""

    def __init__(self, t: Pipeline, fn: Callable, has_aux: bool, params: Any, micro: list, kwargs: dict, gp: Any):
        self.t, self.fn, self.has_aux, self.params, self.micro, self.kwargs, self.gp = t, fn, has_aux, params, micro, kwargs, gp
        self.rank, self.group, self.ranks = t._topo()
        self.device = next(iter(params.values())).device if params else torch.device("cpu")
        self.saved: dict[tuple[int, int], tuple[str, list[torch.Tensor], list[torch.Tensor]]] = {}
        self.inbox: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.sends: list[comm.Pending] = []  # posted exchanges, kept (with their tensors) to the end
        self.posting: list[tuple[str, torch.Tensor, int]] = []  # this run of sends/receives, not yet posted
        self.values: list[Any] = []
        self.peak_saved = 0
        self.key = tuple((x.shape, x.dtype) for x in _tensors(micro[0]))

    def _peer(self, chunk: int) -> int:
        return self.ranks[chunk % self.t.stages]

    def run(self) -> Any:
        gp, t = self.gp, self.t
        outer_final = gp.final
        names = T.leaves({n: n for n in self.params})  # the names in the grad pass's leaf order
        tied = set(t._plan.shared())
        shared = [i for i, n in enumerate(names) if n in tied]
        gp.held.update(shared)
        t.timeline = []
        try:
            timed = t.record_timeline and self.device.type == "cuda"
            for a in t.actions(self.rank):
                if a.kind in ("F", "B"):
                    self._post()
                if timed and a.kind in ("F", "B"):  # its inputs' arrival is idle time, not compute
                    torch.cuda.synchronize(self.device)
                start = time.perf_counter()
                getattr(self, a.kind)(a, outer_final)
                if t.record_timeline and a.kind in ("F", "B"):
                    if timed:
                        torch.cuda.synchronize(self.device)
                    t.timeline.append((a, start, time.perf_counter()))
            self._post()
            for pending in self.sends:
                pending.wait()
            t.peak_held = self.peak_saved
        finally:
            gp.final = outer_final
        self._sum_shared([(i, names[i]) for i in shared], outer_final)
        return self._value()

    # -- actions -------------------------------------------------------------------
    # [Note: one link per direction] The sends and receives queued between two
    # computations are posted when the next computation starts (`_post`), each on the
    # group of its directed link (`Mesh.links`). Only receives are waited for (by the
    # compute stream on GPU, by the host on CPU); sends complete in the background and
    # are waited at the end of the step. That is what `simulate` proves deadlock-free:
    # a send never waits on anything but its own receiver. One group for both
    # directions deadlocked: a send must meet its receive (gloo, and NCCL beyond its
    # buffers), so a rank waiting in a send held back the receive, posted after it,
    # that its peer's own waiting send needed (interleaved, 2 ranks, over gloo).

    def _post(self) -> None:
        """Post the queued sends and receives, each on its link's group; wait for the receives."""
        if not self.posting:
            return
        me, links = self.ranks[self.rank], self.t._links
        by_link: dict[tuple[int, int], list] = {}
        for op in self.posting:
            kind, _, peer = op
            by_link.setdefault((me, peer) if kind == "send" else (peer, me), []).append(op)
        self.posting = []
        receives = []
        for link, ops in sorted(by_link.items()):
            pending = comm.exchange(ops, links[link])
            (self.sends if link[0] == me else receives).append(pending)
        for pending in receives:
            pending.wait()

    def recv_f(self, a: Action, _: bool) -> None:
        cache = self.t._shapes
        key = (a.chunk, self.key)
        if key not in cache:  # first step: the shapes come in a header, read on the host
            self._post()
            h = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
            peer = self._peer(a.chunk - 1)
            comm.exchange([("recv", h, peer)], self.t._links[(peer, self.ranks[self.rank])]).wait()
            cache[key] = _from_header(h.tolist())
        bufs = [torch.empty(shape, dtype=dtype, device=self.device) for dtype, _, shape in cache[key]]
        self.posting += [("recv", b, self._peer(a.chunk - 1)) for b in bufs]
        self.inbox[(a.mb, a.chunk)] = [b.requires_grad_(grad) for b, (_, grad, _) in zip(bufs, cache[key])]

    def F(self, a: Action, _: bool) -> None:
        inputs = self.inbox.pop((a.mb, a.chunk), None)
        token = _running.set(_Forward(self.t._plan, a.chunk, inputs))
        try:
            out = self.fn(self.params, *self.micro[a.mb], **self.kwargs)
        except _Boundary as b:
            self.saved[(a.mb, a.chunk)] = ("out", _tensors(b.args), inputs or [])
        else:
            if a.chunk != self.t.chunks - 1:
                raise RuntimeError(f"{self.t.who}: chunk {a.chunk} reached the loss; the model's forward did not run its later blocks")
            loss, aux = out if self.has_aux else (out, None)
            self.values.append((loss.detach(), _detach(aux)) if self.has_aux else loss.detach())
            self.saved[(a.mb, a.chunk)] = ("loss", [loss], inputs or [])
        finally:
            _running.reset(token)
        self.peak_saved = max(self.peak_saved, len(self.saved))

    def send_f(self, a: Action, _: bool) -> None:
        outs = self.saved[(a.mb, a.chunk)][1]
        cache = self.t._sent
        if (a.chunk, self.key) not in cache:
            cache.add((a.chunk, self.key))
            self.posting.append(("send", _header(outs, self.device), self._peer(a.chunk + 1)))
        self.posting += [("send", x.detach(), self._peer(a.chunk + 1)) for x in outs]

    def recv_b(self, a: Action, _: bool) -> None:
        outs = self.saved[(a.mb, a.chunk)][1]
        grads = [torch.empty_like(x) for x in outs if x.requires_grad]
        self.posting += [("recv", g, self._peer(a.chunk + 1)) for g in grads]
        self.inbox[(a.mb, a.chunk)] = grads

    def B(self, a: Action, outer_final: bool) -> None:
        kind, outs, inputs = self.saved.pop((a.mb, a.chunk))
        self.gp.final = outer_final and a.mb == self.t.microbatches - 1
        if kind == "loss":
            scale = self.gp.loss_scale / self.t.microbatches
            torch.autograd.backward(outs[0] * scale)
        else:
            needs = [x for x in outs if x.requires_grad]
            if needs:
                torch.autograd.backward(needs, self.inbox.pop((a.mb, a.chunk)))
        self.inbox[("grads", a.mb, a.chunk)] = [
            x.grad if x.grad is not None else torch.zeros_like(x) for x in inputs if x.requires_grad
        ]

    def send_b(self, a: Action, _: bool) -> None:
        grads = self.inbox.pop(("grads", a.mb, a.chunk))
        self.posting += [("send", g, self._peer(a.chunk - 1)) for g in grads]

    # -- end of the step -----------------------------------------------------------

    def _sum_shared(self, shared: list[tuple[int, str]], final: bool) -> None:
        """Grads of weights held by several chunks: once the last backward of the update
        is in (accumulate may run the schedule several times), summed over the pp ranks
        (each rank joins every sum in the plan's order; those that hold none add zeros)
        and released as final."""
        if not final:
            return
        mine = {name: i for i, name in shared}
        for name in self.t._plan.shared():
            i = mine.get(name)
            if i is not None and self.gp.leaves[i].grad is None:
                self.gp.leaves[i].grad = torch.zeros_like(self.gp.leaves[i])
            if len({k % self.t.stages for k in self.t._plan.holders[name]}) > 1:
                like = self.t._like[name]
                grad = self.gp.leaves[i].grad if i is not None else torch.zeros(like.shape, dtype=like.dtype, device=self.device)
                comm.all_reduce(grad, group=self.group)
            if i is not None:
                self.gp.release(i)

    def _value(self) -> Any:
        """The mean of the micro-batch values, from the last chunk's rank to every rank.

        The value's structure (a pytree of tensors: loss, metrics) goes once, as an
        object; from then on only its tensors move, by broadcast, with no host sync. So a
        step must return the same metrics (names, shapes, dtypes) every time."""
        last = self.ranks[(self.t.chunks - 1) % self.t.stages]
        mine = mean_floats(self.values) if self.values else None
        if self.t.stages == 1:
            return mine
        if self.t._value_spec is None:
            like = None
            if mine is not None:
                leaves, spec = optree.tree_flatten(mine, namespace="sharded")
                if all(isinstance(x, torch.Tensor) for x in leaves):
                    like = (spec, [(x.shape, x.dtype) for x in leaves])
            self.t._value_spec = comm.broadcast_object(like, src=last, group=self.group) or "objects"
        if self.t._value_spec == "objects":  # Python values among the metrics: pickled every step
            cpu = T.map(lambda x: x.cpu() if isinstance(x, torch.Tensor) else x, mine)
            value = comm.broadcast_object(cpu, src=last, group=self.group)
            return T.map(lambda x: x.to(self.device) if isinstance(x, torch.Tensor) else x, value)
        spec, metas = self.t._value_spec
        leaves = T.leaves(mine) if mine is not None else [torch.empty(sh, dtype=dt, device=self.device) for sh, dt in metas]
        for x in leaves:
            comm.broadcast(x, src=last, group=self.group)
        return spec.unflatten(leaves)


def _detach(tree: Any) -> Any:
    return T.map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


def _params_dicts(opt_state: Any, names: frozenset) -> Any:
    """The opt state's structure with every dict keyed by the params' names as a leaf."""
    return optree.tree_structure(opt_state, is_leaf=lambda x: isinstance(x, dict) and frozenset(x) == names, namespace="sharded")


def _select(opt_state: Any, spec: Any, keep: set[str]) -> Any:
    leaves = spec.flatten_up_to(opt_state)
    return spec.unflatten([{n: v for n, v in x.items() if n in keep} if isinstance(x, dict) else x for x in leaves])


def _merge(dicts: list[dict], order: list[str]) -> dict:
    """One dict from the stages' parts (a shared weight from its first holder), in `order`."""
    merged: dict = {}
    for d in dicts:
        for n, v in d.items():
            merged.setdefault(n, v)
    return {n: merged[n] for n in order}


pipeline = transform(Pipeline)
