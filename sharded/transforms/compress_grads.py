"""`compress_grads(method="onebit")`: after a warmup, 1-bit Adam's momentum travels
as signs and scales, with error feedback, on data_parallel and under ZeRO alike.

    step = sharded.compress_grads(method="onebit")(sharded.shard_zero(stage=2)(train_step))
    state = step.init(sharded.TrainState.create(params, sharded.optim.onebit_adam(1e-3, warmup_steps=100)))

Reference semantics. During the optimizer's warmup (`onebit_adam(warmup_steps=k)`: the
first k updates, while Adam's variance still moves) nothing changes: the step is the
plain step. After it, every bucket that `data_parallel` or `shard_zero` reduces (a
"reduce_grads" primitive) is exchanged as DeepSpeed's 1-bit Adam exchanges Adam's
momentum m (decay b1) over N workers, in units of the frozen d = sqrt(v) + eps ([Note:
the exchange in Adam's units]), leaving out elements with v = 0 ([Note: elements that
never had a grad]). Each leaf is cut into N chunks ([Note: chunk layout]),
each chunk into blocks of `block` elements, one scale each; for every block, worker i
holds a carry c_i (its error plus b1·u/N, u = m/d) and sends

    x   = c_i + (1 - b1)·g_i/(N·d)                 (g_i: its grad; the sum over i is (b1·m + (1-b1)·ḡ)/d)
    s   = ||x|| / sqrt(len(x));   s·sign(x)        (sign(0) = +1; the carry keeps x - s·sign(x))
to the chunk's server, rank r, which sums, adds its own error f, and compresses again:
    y   = Σ_i s_i·sign(x_i) + f;   t = ||y|| / sqrt(len);   u' = t·sign(y);   f = y - u'
and every rank receives u' (an all-gather), the new momentum m' = u'·d: c_i += b1·u'/N.
The first compressed exchange starts from the momentum warmup built: the carries are
zero and the server adds b1·m/d from the optimizer's state. The optimizer is then
handed g = (m' - b1·m) / (1 - b1), the grad that makes its momentum m', so
`onebit_adam` stays an ordinary optimizer ([Note: momentum through the grads]).

Signs go 32 to an int32 (sharded.kernels.pack_signs_), with a float scale per block of
256: about 1/32 + 1/64 of fp32's bytes in an all-to-all, and as much again over N in
the all-gather. The carries and server errors are state (`extra["compress_grads"]`),
each rank's own (`per_rank` placements), so checkpoints restore each rank's own. Why
the momentum and not the grads, and why every rank gets the momentum under ZeRO too:
docs/decisions.md, decision 35.

[Note: the exchange in Adam's units] What travels is the momentum divided by the frozen
denominator d = sqrt(v) + eps, i.e. Adam's own update direction, whose elements are
all of a size, so one scale per block fits them all; the raw momentum's elements differ
by orders of magnitude within a block, and a sign code gives the small ones the
block's scale, which the optimizer then divides by their small sqrt(v) (on the tiny
GPT, one seed in three went unstable after the switch: val loss 0.88 against 0.71).
Every worker divides its grads by d for every chunk it sends, so each rank keeps the
frozen variance v whole (`extra["compress_grads"]["variance"]`, all-gathered once when it
freezes under ZeRO) and makes d from it for each exchange.

[Note: elements that never had a grad] An element whose grad was exactly 0 through the
whole warmup (an embedding row no batch used, a position past every sequence) has v = 0
and d = eps. A sign code cannot send 0: sign(0) = +1 gives it its block's scale, and
the optimizer's update is then that scale over its own tiny denominator, many times
lr (80-95x on a small GPT, 4-8x where such a row shares a block with a used one), on
every compressed step. Plain Adam leaves it alone. So elements with v = 0 do not
travel: they are zero in every message, count in no block's scale, and keep a zero
carry, error and momentum (only weight decay moves them), as DeepSpeed's `exp_avg_mask`
does by hand. v is whole and the same on every rank, so every rank leaves out the same
elements. A grad such an element gets later is dropped, as that mask drops it.

[Note: momentum through the grads] The exchange yields the new momentum m', but the
optimizer takes grads. Handing it g = (m' - b1·m)/(1 - b1), with m its own momentum,
makes its update b1·m + (1-b1)·g = m' (to rounding), with nothing special in the
optimizer. m is what this rank holds: the whole leaves under data_parallel, its chunk
under ZeRO, which is all the grads that rank's update reads. A loss scale is divided
out before the exchange and multiplied back into g (`Transform.grad_scale`), so fp16's
overflow check and unscaling see what they expect; an exchange whose momentum is not
finite (an overflow on some rank) leaves the carries and errors as they were, and the
step is skipped as any overflowing step.

Under shard_zero(stage=1|2) every rank then holds the whole new momentum and the whole
frozen variance, so every rank can update every param alike and ZeRO need not gather
the params after the update ([Note: an update every rank runs whole] in shard_zero.py).
Each exchange also keeps its bucket's grads whole for that (g = m'/(1 - b1), from a zero
momentum: `whole_update`), where nothing else in the stack rewrites the update.

[Note: a skipped step undoes its exchanges] An overflow often reaches only some buckets:
the last layers' grads, reduced first in backward, can be finite while the first layers'
are not. The finite buckets' exchanges then moved their carries and errors, yet the
loss scaler skips the whole step. So, beside a loss scaler, each exchange keeps what it
replaced (the old carries, server errors and flags: one carry-sized copy at most) until
the update; if the scaler skipped it (`Transform.skipped_update`), they are put back.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable

import optree
import torch

from sharded import comm, kernels, primitives
from sharded import tree as T
from sharded.mesh import Mesh
from sharded.optim import ScaleByFrozenAdamState, states_of
from sharded.placement import Placement
from sharded.reduce import GradBucket, Reduction
from sharded.sharding import chunk_size
from sharded.step import Capability, Level, Op, ProgramInfo, Transform, transform
from sharded.transforms._flat import FlatGroup

__all__ = ["compress_grads"]


@dataclasses.dataclass(frozen=True)
class _Rows:
    """A bucket's leaves laid out as N rows of blocks: row r holds chunk r of each leaf,
    each chunk starting on a block boundary and padded to whole blocks (`layout`, a
    FlatGroup), the row padded to whole int32 words. One scale per block, so a row's
    scales are a reduction over a (blocks, block) view."""

    layout: FlatGroup
    block: int
    device: torch.device

    @staticmethod
    def plan(numels: tuple[int, ...], ranks: int, block: int, dtype: torch.dtype, device: torch.device) -> _Rows:
        chunks = tuple(chunk_size(n, ranks) for n in numels)
        widths = tuple(-(-c // block) * block for c in chunks)
        offsets = tuple(sum(widths[:k]) for k in range(len(widths)))
        unit = math.lcm(32, block)
        columns = -(-sum(widths) // unit) * unit
        layout = FlatGroup("compressed", tuple(range(len(numels))), numels, chunks, offsets, columns, ranks, dtype, device)
        return _Rows(layout, block, device)

    @property
    def words(self) -> int:
        return self.layout.size // 32

    def gather(self, flats: list[torch.Tensor]) -> torch.Tensor:
        """(N, S) from each leaf's whole flat tensor, zero padded."""
        rows = torch.zeros(self.layout.ranks * self.layout.size, dtype=self.layout.dtype, device=self.device)
        self.layout.write_all(rows, flats)
        return rows.view(self.layout.ranks, -1)

    def scatter(self, rows: torch.Tensor, flats: list[torch.Tensor]) -> None:
        """Each leaf's whole flat tensor from (N, S), the padding dropped."""
        self.layout.read_all(rows.view(-1), flats)

    def regroup(self, src: torch.Tensor, src_offsets: tuple[int, ...], dst: torch.Tensor, dst_offsets: tuple[int, ...]) -> None:
        """Each leaf's chunk columns from `src` (rows, its offsets) into `dst` (as many
        rows, its offsets), in one copy kernel."""
        n, width, flat = src.numel() // src.shape[-1], src.shape[-1], dst.view(-1)
        pieces = [(r * width + a, flat[r * dst.shape[-1] + b : r * dst.shape[-1] + b + c])
                  for r in range(n) for a, b, c in zip(src_offsets, dst_offsets, self.layout.chunks)]
        kernels.copy_out(src.reshape(-1), [x for _, x in pieces], [o for o, _ in pieces])

    def server_row(self, server: list[torch.Tensor]) -> torch.Tensor:
        """This rank's server errors (one chunk per leaf) as a row (S,), zero padded."""
        row = torch.zeros(self.layout.size, dtype=self.layout.dtype, device=self.device)
        kernels.copy_in(row, server, self.layout.offsets)
        return row

    def live(self, variance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which elements of the (N, S) rows travel, those whose frozen variance is not 0
        ([Note: elements that never had a grad]; the padding's is 0), and how many of
        them each block holds: (N, S) bool and (N, S / block)."""
        live = variance > 0
        return live, live.view(live.shape[0], -1, self.block).sum(-1).to(variance.dtype)

    def scales(self, rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """||block|| / sqrt(its live elements) (the RMS) of each block in each row:
        (rows, blocks), blocks with none 0. s·sign(x) then keeps x's norm."""
        norms = torch.linalg.vector_norm(rows.view(rows.shape[0], -1, self.block), dim=-1)
        return norms / lengths.clamp(min=1).sqrt()


class CompressGrads(Transform):
    name = "compress_grads"
    level = Level.PARALLEL
    capabilities = Capability.REWRITES_GRADS  # the optimizer gets the grads that make its momentum the exchanged one

    def __init__(self, method: str = "onebit", warmup_steps: int | None = None, block: int = 256):
        if method == "zeroone":
            raise ValueError("compress_grads(method='zeroone'), 0/1 Adam, is not built (docs/decisions.md, decision 35); use method='onebit'")
        if method != "onebit":
            raise ValueError(f"compress_grads(method={method!r}): the method is 'onebit' (1-bit Adam's compressed exchange)")
        if warmup_steps is not None and (not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 1):
            raise ValueError(f"compress_grads(warmup_steps=...) must be an int >= 1 (Adam's variance needs warmup); got {warmup_steps!r}")
        if not isinstance(block, int) or isinstance(block, bool) or block < 1:
            raise ValueError(f"compress_grads(block=...) is how many elements share a scale (an int >= 1); got {block!r}")
        self.method, self.warmup_steps, self.block = method, warmup_steps, block
        self.handlers = {"reduce_grads": self._reduce_grads, "update": self._update}
        self._rows: dict[Any, _Rows] = {}
        self._warmup = warmup_steps
        self._scalers: list[Transform] = []
        self._undo: list[tuple] = []  # this step's replaced exchange state ([Note: a skipped step undoes its exchanges])
        self._undo_step = -1
        self._b1 = 0.9  # the optimizer's, once `init` has read it
        self._count: Any = None  # the optimizer's count tensor this transform's last update returned
        self._lag = 0  # state.step minus that count: the steps a loss scaler skipped
        self._keeps_whole = False  # set by `require`: offer ZeRO-1/2 this step's grads whole
        self._whole: dict[int, torch.Tensor] = {}  # this step's whole grads by leaf index, for `whole_update`

    def describe(self) -> str:
        return f"compress_grads({self.method!r}, after {self._warmup} warmup steps)"

    axis = "dp"  # the reducing transform's axis, once `require` has found it

    def check(self, stack: Any) -> None:
        fp16 = any(Capability.CASTS_PARAMS in t.capabilities and t.param_dtype == torch.float16 for t in stack)
        if fp16 and not any(Capability.SCALES_LOSS in t.capabilities for t in stack):
            raise ValueError("compress_grads with fp16 compute needs dynamic loss scaling: use mixed_precision('fp16') (scaling is its default), not loss_scale=False")

    def require(self, stack: Any) -> None:
        reducers = [t for t in stack if Capability.REDUCES_GRADS in t.capabilities]
        if not reducers:
            raise ValueError(
                "compress_grads compresses the grads' reduction over dp, and nothing in this step reduces them; "
                "write compress_grads(method='onebit')(shard_zero(stage=2)(train_step)) or with data_parallel"
            )
        if any(Capability.REDUCES_EACH_MICROBATCH in t.capabilities for t in stack):
            raise ValueError(
                "compress_grads exchanges 1-bit Adam's momentum once per update, but this step reduces the grads after every micro-batch: "
                "leave shard_zero's reduce_every_microbatch off with compress_grads"
            )
        self.axis = reducers[0].axis
        self._scalers = [t for t in stack if Capability.SCALES_LOSS in t.capabilities]
        # ZeRO-1/2 may run the update whole on every rank (whole_update) where every other
        # update handler is the reducer's or a loss scaler's (offload, pipeline and
        # tensor_parallel lay the update out themselves)
        others = [t for t in stack if t is not self and "update" in t.handlers and not t.capabilities & (Capability.REDUCES_GRADS | Capability.SCALES_LOSS)]
        self._keeps_whole = not others and Capability.SHARDS_PARAMS not in reducers[0].capabilities

    def init(self, state: Any) -> Any:
        adam = _frozen_adam(state.opt_state)
        freeze = int(adam.freeze_after)
        if self.warmup_steps is not None and self.warmup_steps != freeze:
            raise ValueError(f"compress_grads(warmup_steps={self.warmup_steps}) but the optimizer freezes its variance after {freeze}; give both the same, or leave compress_grads's out")
        self._warmup, self._b1, self._eps = freeze, float(adam.b1), float(adam.eps)
        size = Mesh.current().size(self.axis)
        if size == 1:
            warnings.warn(f"compress_grads: the {self.axis!r} axis has one rank, so there is nothing to compress; the step runs uncompressed", stacklevel=3)
        carry, server, started, variance, placements = [], [], [], [], {}
        for k, (path, x) in enumerate(T.leaves_with_paths(state.params)):
            placed = state.placements.get("params" + path)
            numel = (placed.shape if placed is not None else x.shape).numel() if x.is_floating_point() else 0
            dtype = torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32
            carry.append(torch.zeros(numel, dtype=dtype, device=x.device))
            started.append(torch.zeros((), dtype=torch.bool, device=x.device))  # has an exchange carried its momentum yet
            variance.append(torch.zeros(numel, dtype=dtype, device=x.device))  # v whole, once it is frozen
            placements[f"extra['compress_grads']['variance'][{k}]"] = Placement(variance[-1].shape)
            server.append(torch.zeros(chunk_size(numel, size), dtype=dtype, device=x.device))
            for name, buffers in (("carry", carry), ("server", server)):
                placements[f"extra['compress_grads']['{name}'][{k}]"] = Placement(buffers[-1].shape, per_rank=True)
        extra = {**state.extra, "compress_grads": {"carry": carry, "server": server, "started": started, "variance": variance}}
        return state.replace(extra=extra, placements=state.placements.update(placements))

    # -- the exchange ------------------------------------------------------------------

    def _reduce_grads(self, next_: Callable, bucket: GradBucket) -> comm.Pending:
        state = primitives.step_state()
        if bucket.layout is None or state is None or self._updates(state) < self._warmup or torch.distributed.get_world_size(bucket.group) == 1:
            return next_(bucket)
        if torch.distributed.get_world_size(bucket.group) != Mesh.current().size(self.axis):
            raise ValueError(
                f"compress_grads exchanges 1-bit Adam's momentum over all of {self.axis!r}, but this reduction spans part of it "
                "(hybrid sharding: shard_zero(hybrid=...)); drop hybrid, or compress_grads"
            )
        mine = state.extra["compress_grads"]
        scales = [t.grad_scale(state) for t in self._scalers]  # the state's own tensors: [Note: what the side stream reads]
        adam = _frozen_adam(state.opt_state)
        if self._undo_step != int(state.step):  # a new step: nothing of an earlier one is undone or updated whole
            self._undo, self._whole, self._undo_step = [], {}, int(state.step)
        with comm.tagged("compress_grads"):  # its two dependent phases overlap the rest of backward
            first = self._updates(state) == self._warmup  # the variance has just frozen: it is gathered whole here
            whole = None
            if self._keeps_whole and bucket.reduction is Reduction.REDUCE_SCATTER:  # for `whole_update`; made on this stream, which reads them
                whole = [torch.empty(n, dtype=mine["carry"][i].dtype, device=bucket.grads.device) for i, n in zip(bucket.layout.leaves, bucket.layout.numels)]
                self._whole.update(zip(bucket.layout.leaves, whole))
            return comm.on_side_stream(lambda: self._exchange(bucket, adam, mine, scales, first, whole), bucket.grads.device, "compress_grads")

    def _exchange(self, bucket: GradBucket, adam: ScaleByFrozenAdamState, mine: dict, scales: list, first: bool, whole: list | None) -> None:
        fg, group = bucket.layout, bucket.group
        ranks, me = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
        carry, server = [mine["carry"][i] for i in fg.leaves], [mine["server"][i] for i in fg.leaves]
        key = (fg.name, fg.numels, ranks)
        if key not in self._rows:
            self._rows[key] = _Rows.plan(fg.numels, ranks, self.block, carry[0].dtype, bucket.grads.device)
        rows = self._rows[key]
        dtype, b1, block, words = rows.layout.dtype, self._b1, self.block, rows.words
        scale = torch.ones((), dtype=dtype, device=bucket.grads.device)  # the loss scale, in the exchange's precision
        for factor in scales:
            scale = scale * factor
        held = rows.gather(carry)
        variance = [mine["variance"][i] for i in fg.leaves]
        if first:
            self._freeze_variance(bucket, rows, T.leaves(adam.nu), variance)
        v = rows.gather(variance)
        live, lengths = rows.live(v)
        d = torch.where(live, v.sqrt_().add_(self._eps), 1.0)  # [Note: the exchange in Adam's units]
        x = self._bucket_rows(bucket, rows).mul_((1 - b1) / scale).div_(d).add_(held).mul_(live)
        block_scales = rows.scales(x, lengths)
        error = torch.empty_like(x)
        packed = kernels.pack_signs_(x.view(-1), block_scales.view(-1), error.view(-1), block)
        # phase 1: chunk r of every worker to rank r, which sums them (the server); scales
        # then signs, in one message of int32s
        head = block_scales.shape[1] * dtype.itemsize // 4
        got = torch.empty(ranks, _width(head + words, dtype), dtype=torch.int32, device=x.device)
        comm.all_to_all_single(got, _message(block_scales, packed.view(ranks, words), got.shape[1]), group=group)
        y = torch.zeros(rows.layout.size, dtype=dtype, device=x.device)
        for row in got:
            kernels.unpack_signs_(row[head:], row[:head].view(dtype), y, block, accumulate=True)
        momentum = self._momentum_rows(bucket, rows, T.leaves(adam.mu), me)
        started = mine["started"][fg.leaves[0]]  # the same for all the bucket's leaves
        y.add_(momentum[me] / d[me] * b1 * ~started)  # the first exchange: the momentum warmup built
        held_server = rows.server_row(server)
        y.add_(held_server).mul_(live[me])
        # phase 2: the server's sum, compressed again with its own error, to every rank
        server_scales = rows.scales(y[None], lengths[me][None])[0]
        server_error = torch.empty_like(y)
        server_packed = kernels.pack_signs_(y, server_scales, server_error, block)
        sent = _message(server_scales[None], server_packed[None], got.shape[1])[0]
        everyone = torch.empty(ranks * sent.numel(), dtype=torch.int32, device=y.device)
        comm.all_gather_into_tensor(everyone, sent, group=group)
        everyone = everyone.view(ranks, -1)
        new = torch.empty(ranks, rows.layout.size, dtype=dtype, device=y.device)
        for r, row in enumerate(everyone):
            kernels.unpack_signs_(row[head:], row[:head].view(dtype), new[r], block)
        new *= live
        # the state moves only if the momentum is finite on every rank (it is the same everywhere)
        finite = torch.isfinite(new).all()
        rows.scatter(torch.where(finite, error.mul_(live).add_(new, alpha=b1 / ranks), held), carry)
        kernels.copy_out(torch.where(finite, server_error.mul_(live[me]), held_server), server, rows.layout.offsets)
        flags = [mine["started"][i] for i in fg.leaves]
        if self._scalers:
            self._undo.append((rows, held, held_server, carry, server, flags, started.clone()))
        torch._foreach_copy_(flags, [started | finite] * len(fg.leaves))
        new.mul_(d)  # m'
        if whole is not None:  # the grads from a zero momentum, for `whole_update`
            rows.scatter(new * (scale / (1 - b1)), whole)
        grads = new.sub_(momentum, alpha=b1).mul_(scale / (1 - b1))  # [Note: momentum through the grads]
        if bucket.reduction is Reduction.REDUCE_SCATTER:  # ZeRO (every stage, decision 39)
            rows.regroup(grads[me], rows.layout.offsets, bucket.out, fg.offsets)
        else:  # data_parallel: whole leaves
            rows.scatter(grads, [bucket.grads[o : o + k] for o, k in zip(fg.offsets, fg.numels)])

    def whole_update(self, opt_state: Any) -> tuple[Any, Any] | None:
        """This step's grads whole, from a zero momentum (g = m'/(1 - b1)), and the
        optimizer state with whole moments: zero and the frozen variance. None unless every
        leaf was exchanged this step and 1-bit Adam's moments are the only state that
        mirrors the params."""
        state = primitives.step_state()
        params = T.leaves(state.params)
        if not self._whole or len(self._whole) != len(params) or self._undo_step != int(state.step):
            return None
        adam = _frozen_adam(opt_state)
        mirrored = sum(x.dim() > 0 for x in T.leaves(opt_state) if isinstance(x, torch.Tensor))
        if mirrored != 2 * len(params):  # another member keeps per-param state: it stays chunked, gathered
            return None
        spec = T.structure(adam.mu)
        grads = T.unflatten(spec, [self._whole[i].view(p.shape) for i, p in enumerate(params)])
        mu = T.unflatten(spec, [torch.zeros(p.shape, dtype=m.dtype, device=m.device) for p, m in zip(params, T.leaves(adam.mu))])
        variance = state.extra["compress_grads"]["variance"]
        nu = T.unflatten(spec, [v.view(p.shape).to(n.dtype) for v, p, n in zip(variance, params, T.leaves(adam.nu))])
        stand_in = optree.tree_map(
            lambda x: x._replace(mu=mu, nu=nu) if isinstance(x, ScaleByFrozenAdamState) else x,
            opt_state, is_leaf=lambda x: isinstance(x, ScaleByFrozenAdamState), none_is_leaf=True, namespace="sharded",
        )
        return grads, stand_in

    def _updates(self, state: Any) -> int:
        """The optimizer's updates before this step, which decide when its variance
        freezes. A step a loss scaler skipped (fp16 overflow, frequent in the first
        steps) counts in state.step but not there, as in DeepSpeed's 1-bit Adam. Read
        from the device once (a first step, a loaded checkpoint), then followed on the
        host from the skips, so backward never waits on it."""
        count = _frozen_adam(state.opt_state).count
        if count is not self._count:
            self._count, self._lag = count, int(state.step) - int(count)
        return int(state.step) - self._lag

    def _update(self, next_: Callable, tx: Any, grads: Any, opt_state: Any, params: Any) -> Any:
        out = next_(tx, grads, opt_state, params)
        self._whole = {}
        skipped = any(t.skipped_update() for t in self._scalers)
        if self._count is not None:
            self._count, self._lag = _frozen_adam(out[1]).count, self._lag + skipped
        if skipped:
            for rows, held, held_server, carry, server, flags, started in self._undo:
                rows.scatter(held, carry)
                kernels.copy_out(held_server, server, rows.layout.offsets)
                torch._foreach_copy_(flags, [started] * len(flags))
        self._undo = []
        return out

    def _freeze_variance(self, bucket: GradBucket, rows: _Rows, nu: list[torch.Tensor], out: list[torch.Tensor]) -> None:
        """The frozen v of the bucket's leaves, whole on every rank: copied under
        data_parallel; under ZeRO each rank holds its chunks and all-gathers them (once,
        when the variance freezes)."""
        fg = bucket.layout
        if fg.ranks == 1:
            for v, o in zip((nu[i] for i in fg.leaves), out):
                o.copy_(v.reshape(-1))
            return
        mine = torch.zeros(rows.layout.size, dtype=rows.layout.dtype, device=bucket.grads.device)
        rows.layout.write_chunks(mine, [nu[i] for i in fg.leaves])
        everyone = torch.empty(rows.layout.ranks * rows.layout.size, dtype=mine.dtype, device=mine.device)
        comm.all_gather_into_tensor(everyone, mine, group=bucket.group)
        rows.scatter(everyone.view(rows.layout.ranks, -1), out)

    @staticmethod
    def _momentum_rows(bucket: GradBucket, rows: _Rows, mu: list[torch.Tensor], me: int) -> torch.Tensor:
        """The optimizer's momentum laid out as the bucket's (N, S) rows, where this rank
        holds it: every row under data_parallel (whole leaves), row `me` under ZeRO (its
        chunks; the other rows zero, as their grads are not this rank's to update)."""
        fg = bucket.layout
        if fg.ranks == 1:
            return rows.gather([mu[i].reshape(-1) for i in fg.leaves])
        out = torch.zeros(rows.layout.ranks, rows.layout.size, dtype=rows.layout.dtype, device=bucket.grads.device)
        rows.layout.write_chunks(out[me], [mu[i] for i in fg.leaves])
        return out

    @staticmethod
    def _bucket_rows(bucket: GradBucket, rows: _Rows) -> torch.Tensor:
        """The bucket's grads as (N, S) rows: ZeRO's groups of N ranks hold them as rows
        already (at their own offsets); data_parallel's groups of one rank hold whole
        leaves, cut here."""
        fg, n = bucket.layout, rows.layout.ranks
        if fg.ranks == n:
            x = torch.zeros(n, rows.layout.size, dtype=rows.layout.dtype, device=bucket.grads.device)
            rows.regroup(bucket.grads.view(n, fg.size), fg.offsets, x, rows.layout.offsets)
            return x
        return rows.gather([bucket.grads[o : o + k] for o, k in zip(fg.offsets, fg.numels)])

    def explain(self, program: list[Op], info: ProgramInfo) -> list[Op]:
        numel = sum(x.numel() for x in T.leaves(info.params) if x.is_floating_point())
        size = max(1, Mesh.current().size(self.axis)) if self.axis else 1
        signs = numel // 8  # bytes of packed signs
        note = Op(
            "collective", "compressed exchange (after warmup)",
            f"signs 32 per int32 and a scale per {self.block} elements, error feedback; ~{signs * (1 + 1 / size) / 2**20:.2f} MiB instead of "
            f"{4 * numel / 2**20:.2f} MiB of fp32 grads, over {self.axis}={size}",
            nbytes=int(signs * (1 + 1 / size)),
        )
        if self._keeps_whole:  # [Note: an update every rank runs whole]
            return program + [note, Op("compute", "whole update (after warmup)", "every rank updates every param alike; ZeRO-1/2's all-gather of the params is skipped")]
        return program + [note]


def _width(n: int, dtype: torch.dtype) -> int:
    """int32s per message row: n, rounded up so every row's scales view as `dtype`."""
    k = max(1, dtype.itemsize // 4)
    return -(-n // k) * k


def _message(scales: torch.Tensor, signs: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, width) int32: each row's scales (their bits), then its packed signs."""
    head = scales.shape[1] * scales.dtype.itemsize // 4
    out = torch.zeros(scales.shape[0], width, dtype=torch.int32, device=scales.device)
    out[:, :head] = scales.view(torch.int32)
    out[:, head : head + signs.shape[1]] = signs
    return out


def _frozen_adam(opt_state: Any) -> ScaleByFrozenAdamState:
    """The optimizer's 1-bit Adam state (its momentum, b1 and warmup)."""
    found = states_of(opt_state, ScaleByFrozenAdamState)
    if len(found) != 1:
        raise ValueError(
            "compress_grads(method='onebit') needs one Adam whose variance freezes after a warmup (1-bit Adam): "
            f"create the state with sharded.optim.onebit_adam(lr, warmup_steps=k) (found {len(found)} such states)"
        )
    return found[0]


compress_grads = transform(CompressGrads)
