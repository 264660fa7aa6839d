"""How a sharded state is cut: each rank keeps a chunk of the flattened leaf.

[Note: chunk layout] A leaf of `n` elements is sharded over N ranks as its flattened
form cut into chunks of `c = ceil(n / N)`: rank r owns elements [r·c, (r+1)·c) clipped
to n, so the last ranks may own fewer (or none). This is exactly DTensor's Shard(0) of
the flattened leaf (`to_dtensor`), which is how checkpoints reshard across stages and
world sizes. Which leaves of a state are chunks, and over what, is data in the state
(`state.placements`, [Note: placements] in placement.py), so anything that reads a
state (checkpoints, `as_dtensors`) knows without knowing the transform that cut them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import optree
import torch

from sharded import tree as T
from sharded.placement import map_state

__all__ = [
    "ChunkLayout", "as_dtensors", "chunk_size", "bounds", "dim_slice", "flat_views", "gather_slices", "local_chunk", "map_chunked",
    "to_dtensor", "whole", "sum_over_shards",
]


def chunk_size(numel: int, ranks: int) -> int:
    return -(-numel // ranks)


def bounds(numel: int, ranks: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank's chunk of a flattened leaf of `numel` elements."""
    c = chunk_size(numel, ranks)
    start = min(rank * c, numel)
    return start, min(start + c, numel)


def local_chunk(x: torch.Tensor, ranks: int, rank: int) -> torch.Tensor:
    """This rank's chunk of `x`: a 1-D view of the flattened (contiguous) leaf."""
    start, end = bounds(x.numel(), ranks, rank)
    return x.view(-1)[start:end]


@dataclasses.dataclass(frozen=True, eq=False)
class ChunkLayout:
    """How a transform cut the params and their optimizer-state mirrors (its runtime
    record; what the state says of each leaf is in `state.placements`)."""

    group: Any  # the process group the chunks are spread over (None: one process)
    ranks: int
    rank: int
    params: bool  # the params themselves are chunked (ZeRO-3); else only their mirrors
    treespec: Any  # the params' structure: optimizer-state subtrees with it mirror them
    shapes: tuple[torch.Size, ...]  # each param leaf's full shape
    chunked: tuple[bool, ...]  # which param leaves are cut (floating, non-empty)


def map_chunked(tree: Any, treespec: Any, chunked: tuple[bool, ...], fn: Callable[[torch.Tensor, int], Any]) -> Any:
    """`fn(leaf, i)` on leaf i of every subtree of `tree` with the params' structure
    `treespec` (the params, or an optimizer moment that mirrors them) where
    `chunked[i]`; every other leaf is left as it is."""

    def mirrors(x: Any) -> bool:
        return not isinstance(x, torch.Tensor) and x is not None and T.structure(x) == treespec

    def rebuild(x: Any) -> Any:
        if not mirrors(x):
            return x
        return T.unflatten(treespec, [fn(leaf, i) if chunked[i] else leaf for i, leaf in enumerate(T.leaves(x))])

    return optree.tree_map(rebuild, tree, is_leaf=mirrors, none_is_leaf=True, namespace="sharded")


def to_dtensor(chunk: torch.Tensor, numel: int, group: Any) -> Any:
    """The chunk as the local shard of a DTensor of the flattened leaf over `group`
    (no copy). Replicas of the group (hybrid sharding) make equal DTensors."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = DeviceMesh.from_group(group, chunk.device.type)
    return DTensor.from_local(chunk, mesh, [Shard(0)], run_check=False, shape=torch.Size([numel]), stride=(1,))


def as_dtensors(state: Any) -> Any:
    """`state` with every cut leaf as a DTensor (no copy): a chunk as a shard of its
    flattened leaf, a slice along a dim as a shard of the leaf along that dim. Code over
    params or optimizer state outside the step sees global values, as on one device.

        view = sharded.sharding.as_dtensors(state)
        l2 = sum((p.float() ** 2).sum() for p in sharded.tree.leaves(view.params))
        l2.full_tensor()   # == the plain model's, on every rank

    Leaves that are whole (or this rank's own, `per_rank`) come back as they are."""
    placements = getattr(state, "placements", None)
    if not placements:
        return state

    def view(path: str, x: Any) -> Any:
        cut = _one_cut(placements, path, x)
        if cut is None:
            return x
        shape = placements.get(path).shape
        if cut.dim is None:
            return to_dtensor(x, shape.numel(), cut.group)
        if cut.blocks > 1:
            raise NotImplementedError(f"as_dtensors: {path} is cut in {cut.blocks} blocks along dim {cut.dim} (a fused q, k, v weight); DTensor has no such placement")
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(x, DeviceMesh.from_group(cut.group, x.device.type), [Shard(cut.dim)], run_check=False, shape=shape, stride=_contiguous_strides(shape))

    return map_state(state, view)


def flat_views(state: Any) -> tuple[Any, Callable[[], None]]:
    """`state` as checkpoints read and write it: every cut leaf as a DTensor of its
    flattened leaf, so any layout of a state reshards into any other. A chunk is a
    view. A leaf with a slice along a dim among its cuts (tensor parallelism, then
    perhaps ZeRO's chunk of that slice) is a copy: the whole leaf rebuilt, and this
    rank's chunk of it flattened over the first cut's ranks (the other axes' replicas
    write the same chunk, which the checkpoint keeps once). The function returned writes
    such copies back into this rank's pieces (after a load)."""
    placements = getattr(state, "placements", None)
    if not placements:
        return state, lambda: None
    copies: list[tuple[torch.Tensor, torch.Tensor, tuple, torch.Size]] = []

    def view(path: str, x: Any) -> Any:
        p = placements.get(path)
        cuts = tuple(c for c in (p.cuts if p is not None else ()) if c.ranks > 1)
        if not cuts or not isinstance(x, torch.Tensor):
            return x
        if all(c.dim is None for c in cuts):
            if len(cuts) > 1:
                raise NotImplementedError(f"{path} is chunked over {[c.axis for c in cuts]}; a checkpoint of a leaf chunked twice is not built yet")
            return to_dtensor(x, p.shape.numel(), cuts[0].group)
        first = cuts[0]
        whole = _whole_of(x, cuts, p.shape, path)
        chunk = local_chunk(whole.reshape(-1).contiguous(), first.ranks, first.rank).clone()
        copies.append((x, chunk, cuts, p.shape))
        return to_dtensor(chunk, p.shape.numel(), first.group)

    def write_back() -> None:
        from sharded.transforms._flat import gather_leaf

        for x, chunk, cuts, shape in copies:
            whole = gather_leaf(chunk, shape, cuts[0].group, cuts[0].ranks)
            x.copy_(_piece_of(whole, cuts).reshape(x.shape))

    return map_state(state, view), write_back


def _whole_of(x: torch.Tensor, cuts: tuple, shape: torch.Size, path: str) -> torch.Tensor:
    """The whole leaf from every rank's piece, the cuts undone from the last (slices
    along dims, then at most one chunk of the flattened piece, last)."""
    from sharded.transforms._flat import gather_leaf

    chunked = [k for k, c in enumerate(cuts) if c.dim is None]
    if chunked and chunked != [len(cuts) - 1]:
        raise NotImplementedError(f"{path} is cut {[c.axis for c in cuts]}: only the last cut may chunk the flattened piece")
    shapes = [torch.Size(shape)]
    for c in cuts:
        if c.dim is not None:
            shapes.append(torch.Size(n // c.ranks if d == c.dim else n for d, n in enumerate(shapes[-1])))
    y = x
    for k in reversed(range(len(cuts))):
        c = cuts[k]
        if c.dim is None:
            y = gather_leaf(y.reshape(-1), shapes[k], c.group, c.ranks)
        else:
            y = gather_slices(y.reshape(shapes[k + 1]), c.dim, c.blocks, c.ranks, c.group)
    return y


def _piece_of(whole: torch.Tensor, cuts: tuple) -> torch.Tensor:
    """This rank's piece of the whole leaf: each cut applied in order."""
    y = whole
    for c in cuts:
        y = dim_slice(y, c.dim, c.blocks, c.ranks, c.rank) if c.dim is not None else local_chunk(y.reshape(-1).contiguous(), c.ranks, c.rank)
    return y


def _one_cut(placements: Any, path: str, x: Any) -> Any:
    """The leaf's one cut over more than one rank, or None where it is whole here."""
    p = placements.get(path)
    if p is None or not p.cuts or not isinstance(x, torch.Tensor):
        return None
    if len(p.cuts) > 1:
        axes = [c.axis for c in p.cuts]
        raise NotImplementedError(f"{path} is cut over {axes}; a DTensor of a leaf cut over several axes is not built yet (one cut per leaf)")
    return p.cuts[0] if p.cuts[0].ranks > 1 else None


def dim_slice(x: torch.Tensor, dim: int, blocks: int, ranks: int, rank: int) -> torch.Tensor:
    """Rank's slice along `dim` of each of `blocks` equal parts of `x`, joined (a Cut
    with a dim: tensor parallelism's layout)."""
    return torch.cat([part.chunk(ranks, dim)[rank] for part in x.chunk(blocks, dim)], dim)


def gather_slices(x: torch.Tensor, dim: int, blocks: int, ranks: int, group: Any) -> torch.Tensor:
    """The whole tensor from every rank's `dim_slice` of it."""
    from sharded import comm

    per_rank = [s.chunk(blocks, dim) for s in comm.gathered(x, group).unbind(0)]
    return torch.cat([torch.cat([r[b] for r in per_rank], dim) for b in range(blocks)], dim)


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


class _Whole(torch.autograd.Function):
    """The whole leaf from every rank's chunk, differentiably: forward all-gathers, and the
    grad of the chunk is this rank's slice of the whole leaf's grad (every rank computes
    the same function of the whole leaf, so no sum over ranks). Works under torch.func
    (grad, vmap: the backward is plain slicing; jvp: the tangent is gathered too)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(chunk: torch.Tensor, shape: torch.Size, group: Any, ranks: int, rank: int) -> torch.Tensor:
        from sharded.transforms._flat import gather_leaf

        return gather_leaf(chunk.detach(), shape, group, ranks)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        _, shape, group, ranks, rank = inputs
        ctx.shape, ctx.group, ctx.ranks, ctx.rank = shape, group, ranks, rank

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        start, end = bounds(torch.Size(ctx.shape).numel(), ctx.ranks, ctx.rank)
        return grad.reshape(-1)[start:end], None, None, None, None

    @staticmethod
    def jvp(ctx: Any, tangent: torch.Tensor, *_: Any) -> torch.Tensor:
        from sharded.transforms._flat import gather_leaf

        return gather_leaf(tangent, ctx.shape, ctx.group, ctx.ranks)


def whole(chunk: torch.Tensor, shape: torch.Size, group: Any, ranks: int, rank: int) -> torch.Tensor:
    """The whole leaf of `shape` from this rank's `chunk` ([Note: chunk layout]), differentiable."""
    return _Whole.apply(chunk, torch.Size(shape), group, ranks, rank)


def sum_over_shards(x: torch.Tensor) -> torch.Tensor:
    """Inside a step whose params are this rank's chunks (ZeRO-3), `x` summed over the
    ranks that hold the other chunks; else `x` itself. For reductions over grads taken
    with respect to `state.params` in the step's own code:

        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(state.params, x, y)
        sq = sum(g.flatten(1).square().sum(1) for g in sharded.tree.leaves(per_sample))
        norms = sharded.sharding.sum_over_shards(sq).sqrt()   # as on one device
    """
    from sharded import comm, primitives

    for t in primitives.active():
        group = t.params_group()
        if group is not None:
            x = x.clone()
            comm.all_reduce(x, group=group)
    return x
