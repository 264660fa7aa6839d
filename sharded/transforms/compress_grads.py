"""`compress_grads(method="onebit")`: after a warmup, grads travel as signs and scales,
with error feedback: 1-bit Adam's communication, on data_parallel and on ZeRO's
reduce-scatter alike.

    step = sharded.compress_grads(method="onebit")(sharded.shard_zero(stage=2)(train_step))
    state = step.init(sharded.TrainState.create(params, sharded.optim.onebit_adam(1e-3, warmup_steps=100)))

Reference semantics. During the optimizer's warmup (`onebit_adam(warmup_steps=k)`: the
first k updates, while Adam's variance still moves) nothing changes: the step is the
plain step. After it, every bucket that `data_parallel` or `shard_zero` reduces (a
"reduce_grads" primitive) is exchanged compressed. For each grad leaf, cut into N chunks
([Note: chunk layout]), each chunk into blocks of `block` elements, on each worker i
and for each block b of chunk r:

    x      = g_i[b] / N + e_i[b]                  (the mean's 1/N, this worker's error)
    s      = ||x|| / sqrt(len(x));  e_i[b] = x - s·sign(x)        (sign(0) = +1)
    y[b]   = Σ_i s_i·sign(x_i)                      on rank r, the chunk's server
  reduce-scatter (ZeRO-2/3): rank r keeps y. all-reduce (data_parallel, ZeRO-1):
    y[b]  += f[b];  t = ||y[b]|| / sqrt(len);  f[b] = y[b] - t·sign(y[b])   (server error)
    every rank gets, for each block, t·sign(y[b])

Signs go 32 to an int32 (sharded.kernels.pack_signs_), with a float scale per block of
256: about 1/32 + 1/64 of fp32's bytes in an all-to-all, plus, for an all-reduce, as
much again over N in an all-gather. The errors are state (`extra["compress_grads"]`): each rank's own
(`per_rank` placements), a worker error the size of the grads and a server error the
size of this rank's chunks, so checkpoints restore each rank's own. Replicas of hybrid
sharding are still summed in full precision. We compress the grads, not Adam's
momentum as DeepSpeed's OnebitAdam does: with the variance frozen Adam is linear in its
grads, and grads are what ZeRO's reduce-scatter carries (decision 35).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import optree
import torch

from sharded import comm, kernels, primitives
from sharded import tree as T
from sharded.kernels.onebit import words_for
from sharded.mesh import Mesh
from sharded.optim import ScaleByFrozenAdamState
from sharded.placement import Placement
from sharded.reduce import GradBucket, Reduction
from sharded.sharding import chunk_size
from sharded.step import Capability, Level, Op, ProgramInfo, Transform, transform
from sharded.transforms._flat import FlatGroup

__all__ = ["compress_grads"]


@dataclasses.dataclass(frozen=True)
class _Rows:
    """A bucket's leaves laid out as N rows of S32 columns, ZeRO's flat layout (`layout`,
    a FlatGroup whose rows are padded to a multiple of 32): row r holds chunk r of each
    leaf. Each leaf's chunk columns are cut into blocks of at most `block`, one scale each."""

    layout: FlatGroup
    size: int  # S: the columns of the leaves' chunks (layout.size is S32)
    block_of_column: torch.Tensor  # (S32,) the scale block of each column; the last id for the padding
    valid: torch.Tensor  # (N, S32) bool: a real element of its leaf
    lengths: torch.Tensor  # (N, blocks) real elements of each block in each row

    @staticmethod
    def plan(numels: tuple[int, ...], ranks: int, block: int, dtype: torch.dtype, device: torch.device) -> _Rows:
        chunks = tuple(chunk_size(n, ranks) for n in numels)
        offsets = tuple(sum(chunks[:k]) for k in range(len(chunks)))
        size = sum(chunks)
        columns = words_for(size) * 32
        layout = FlatGroup("compressed", tuple(range(len(numels))), numels, chunks, offsets, columns, ranks, dtype, device)
        starts = [(o + j, min(j + block, c) - j) for o, c in zip(offsets, chunks) for j in range(0, c, block)]  # (first column, width)
        ids = torch.full((columns,), len(starts), dtype=torch.long)
        for b, (first, width) in enumerate(starts):
            ids[first : first + width] = b
        valid = torch.zeros(ranks, columns, dtype=torch.bool)
        for n, c, o in zip(numels, chunks, offsets):
            for r in range(ranks):
                valid[r, o : o + max(0, min(c, n - r * c))] = True
        lengths = torch.zeros(ranks, len(starts))
        lengths.index_add_(1, ids[ids < len(starts)], valid[:, ids < len(starts)].to(lengths.dtype))
        return _Rows(layout, size, ids.to(device), valid.to(device), lengths.to(device))

    def gather(self, flats: list[torch.Tensor]) -> torch.Tensor:
        """(N, S32) from each leaf's whole flat tensor, zero padded."""
        rows = torch.zeros(self.layout.ranks * self.layout.size, dtype=self.layout.dtype, device=self.valid.device)
        self.layout.write_all(rows, flats)
        return rows.view(self.layout.ranks, -1)

    def scatter(self, rows: torch.Tensor, flats: list[torch.Tensor]) -> None:
        """Each leaf's whole flat tensor from (N, S32), the padding dropped."""
        self.layout.read_all(rows.view(-1), flats)

    def scales(self, rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """||block|| / sqrt(its real elements) (the RMS) of each block in each row: (rows,
        blocks + 1), the padding's scale 0. s·sign(x) then keeps x's norm."""
        sums = torch.zeros(rows.shape[0], lengths.shape[1] + 1, dtype=rows.dtype, device=rows.device)
        sums.index_add_(1, self.block_of_column, rows.square())
        lengths = torch.cat([lengths, torch.zeros(lengths.shape[0], 1, device=lengths.device)], 1).to(rows.dtype)
        return sums.sqrt() / lengths.clamp(min=1).sqrt()


class CompressGrads(Transform):
    name = "compress_grads"
    level = Level.PARALLEL

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
        self.handlers = {"reduce_grads": self._reduce_grads}
        self._rows: dict[Any, _Rows] = {}
        self._warmup = warmup_steps

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
        self.axis = reducers[0].axis

    def init(self, state: Any) -> Any:
        adam = [x for x in optree.tree_leaves(state.opt_state, is_leaf=lambda x: isinstance(x, ScaleByFrozenAdamState), namespace="sharded") if isinstance(x, ScaleByFrozenAdamState)]
        if not adam:
            raise ValueError(
                "compress_grads(method='onebit') needs Adam whose variance freezes after a warmup (1-bit Adam): "
                "create the state with sharded.optim.onebit_adam(lr, warmup_steps=k)"
            )
        freeze = int(adam[0].freeze_after)
        if self.warmup_steps is not None and self.warmup_steps != freeze:
            raise ValueError(f"compress_grads(warmup_steps={self.warmup_steps}) but the optimizer freezes its variance after {freeze}; give both the same, or leave compress_grads's out")
        self._warmup = freeze
        size = Mesh.current().size(self.axis)
        if size == 1:
            warnings.warn(f"compress_grads: the {self.axis!r} axis has one rank, so there is nothing to compress; the step runs uncompressed", stacklevel=3)
        worker, server, placements = [], [], {}
        for k, (path, x) in enumerate(T.leaves_with_paths(state.params)):
            placed = state.placements.get("params" + path)
            numel = (placed.shape if placed is not None else x.shape).numel() if x.is_floating_point() else 0
            dtype = torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32
            worker.append(torch.zeros(numel, dtype=dtype, device=x.device))
            server.append(torch.zeros(chunk_size(numel, size), dtype=dtype, device=x.device))
            for name, buffers in (("worker", worker), ("server", server)):
                placements[f"extra['compress_grads']['{name}'][{k}]"] = Placement(buffers[-1].shape, per_rank=True)
        extra = {**state.extra, "compress_grads": {"worker": worker, "server": server}}
        return state.replace(extra=extra, placements=state.placements.update(placements))

    # -- the exchange ------------------------------------------------------------------

    def _reduce_grads(self, next_: Callable, bucket: GradBucket) -> comm.Pending:
        state = primitives.step_state()
        if bucket.layout is None or state is None or int(state.step) < self._warmup or torch.distributed.get_world_size(bucket.group) == 1:
            return next_(bucket)
        errors = state.extra["compress_grads"]
        with comm.tagged("compress_grads"):
            self._exchange(bucket, errors["worker"], errors["server"])
        return comm.done()

    def _exchange(self, bucket: GradBucket, worker: list[torch.Tensor], server: list[torch.Tensor]) -> None:
        fg, group = bucket.layout, bucket.group
        ranks, me = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
        key = (fg.name, fg.numels, ranks)
        if key not in self._rows:
            self._rows[key] = _Rows.plan(fg.numels, ranks, self.block, worker[fg.leaves[0]].dtype, bucket.grads.device)
        rows = self._rows[key]
        dtype = rows.layout.dtype
        mine = [worker[i] for i in fg.leaves]
        x = self._bucket_rows(bucket, rows) + rows.gather(mine)
        scale = rows.scales(x, rows.lengths)
        error = torch.empty_like(x)
        words = kernels.pack_signs_(x.view(-1), scale[:, rows.block_of_column].reshape(-1).contiguous(), error.view(-1))
        rows.scatter(error, mine)
        # phase 1: chunk r of every worker to rank r, which sums them (the server)
        got_words, got_scale = torch.empty_like(words), torch.empty_like(scale)
        comm.all_to_all_single(got_words, words, group=group)
        comm.all_to_all_single(got_scale, scale, group=group)
        y = torch.zeros(rows.layout.size, dtype=dtype, device=x.device)
        for i, (w, s) in enumerate(zip(got_words.view(ranks, -1), got_scale)):
            kernels.unpack_signs_(w, s[rows.block_of_column].contiguous(), y, accumulate=True)
        y *= rows.valid[me]
        if bucket.reduction is Reduction.REDUCE_SCATTER:
            bucket.out.copy_(y[: rows.size])
            return
        # phase 2: the server's sum, compressed again with its own error, to every rank
        own = [server[i] for i in fg.leaves]
        if any(x.numel() != c for x, c in zip(own, rows.layout.chunks)):  # an all-reduce over part of dp: ZeRO-1's hybrid groups
            raise ValueError("compress_grads: an all-reduce over a part of the dp ranks (shard_zero(stage=1, hybrid=k)) is not supported; use stage 2 or 3, or drop hybrid")
        offsets = [slice(o, o + c) for o, c in zip(rows.layout.offsets, rows.layout.chunks)]
        for s, sl in zip(own, offsets):
            y[sl] += s
        server_scale = rows.scales(y[None], rows.lengths[me][None])[0]
        server_error = torch.empty_like(y)
        server_words = kernels.pack_signs_(y, server_scale[rows.block_of_column].contiguous(), server_error)
        server_error *= rows.valid[me]
        for s, sl in zip(own, offsets):
            s.copy_(server_error[sl])
        all_words = torch.empty(ranks * server_words.numel(), dtype=server_words.dtype, device=y.device)
        all_scales = torch.empty(ranks * server_scale.numel(), dtype=dtype, device=y.device)
        comm.all_gather_into_tensor(all_words, server_words, group=group)
        comm.all_gather_into_tensor(all_scales, server_scale, group=group)
        all_words, all_scales = all_words.view(ranks, -1), all_scales.view(ranks, -1)
        z = torch.empty(ranks, rows.layout.size, dtype=dtype, device=y.device)
        for r in range(ranks):
            kernels.unpack_signs_(all_words[r], all_scales[r][rows.block_of_column].contiguous(), z[r])
        self._write_rows(bucket, rows, z)

    @staticmethod
    def _bucket_rows(bucket: GradBucket, rows: _Rows) -> torch.Tensor:
        """The bucket's grads as (N, S32) rows: already so laid out in ZeRO's groups of N
        ranks; data_parallel's groups of one rank hold whole leaves, cut here."""
        fg, n = bucket.layout, rows.layout.ranks
        if fg.ranks == n:
            x = torch.zeros(n, rows.layout.size, dtype=rows.layout.dtype, device=bucket.grads.device)
            x[:, : rows.size] = bucket.grads.view(n, rows.size)
            return x
        return rows.gather([bucket.grads[o : o + k] for o, k in zip(fg.offsets, fg.numels)])

    @staticmethod
    def _write_rows(bucket: GradBucket, rows: _Rows, z: torch.Tensor) -> None:
        fg, n = bucket.layout, rows.layout.ranks
        if fg.ranks == n:
            bucket.grads.view(n, rows.size).copy_(z[:, : rows.size])
        else:
            rows.scatter(z, [bucket.grads[o : o + k] for o, k in zip(fg.offsets, fg.numels)])

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
        return program + [note]


compress_grads = transform(CompressGrads)
