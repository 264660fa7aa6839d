"""Cutting a traced model into pipeline chunks: which blocks, params and buffers each holds.

The model's blocks (`model.blocks` without the "<embed>" and "<head>" units) are cut
into `n` contiguous chunks; the "<embed>" params join chunk 0 and the "<head>" params
the last chunk. A weight tied under two names (embedding and head) is held by the
chunks of both names: each computes its share of the grad, and the holders sum them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from sharded.trace import Model, _group_params

__all__ = ["ChunkPlan", "plan_chunks"]


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    chunks: int
    blocks: tuple[str, ...]  # module paths of the hooked blocks, in order
    first_block: tuple[int, ...]  # index (into blocks) of each chunk's first block
    holders: dict[str, frozenset[int]]  # param name -> the chunks that hold it
    name_chunk: dict[str, int]  # every param name, tied aliases too -> the chunk that uses it
    buffer_chunk: dict[str, int]  # buffer name -> its chunk (absent: a root buffer, real everywhere)

    def held_by(self, chunks: Sequence[int]) -> list[str]:
        """The params any of `chunks` holds, in the model's order."""
        return [n for n, hs in self.holders.items() if hs & set(chunks)]

    def shared(self) -> list[str]:
        return [n for n, hs in self.holders.items() if len(hs) > 1]


def plan_chunks(model: Model, chunks: int, partition: Any, who: str) -> ChunkPlan:
    units = [b for b in model.blocks if not b.name.startswith("<")]
    if len(units) < chunks:
        raise ValueError(f"{who} needs at least {chunks} blocks (one per chunk); the model has {len(units)}")
    all_names = [n for n, _ in model.module.named_parameters(remove_duplicate=False)]
    owner = {n: b.name for b in _group_params(all_names, [u.name for u in units]) for n in b.params}
    head = sum(model.params[model.tied.get(n, n)].numel() for n in all_names if owner[n] == "<head>")
    sizes = _chunk_sizes([sum(model.params[n].numel() for n in b.params) for b in units], head, chunks, partition, who)
    first = tuple(sum(sizes[:c]) for c in range(chunks))
    chunk_of_unit = {"<embed>": 0, "<head>": chunks - 1}
    for c in range(chunks):
        for b in units[first[c] : first[c] + sizes[c]]:
            chunk_of_unit[b.name] = c
    name_chunk = {name: chunk_of_unit[owner[name]] for name in all_names}
    holders: dict[str, set[int]] = {n: set() for n in model.params}
    for name in all_names:
        holders[model.tied.get(name, name)].add(name_chunk[name])
    buffer_chunk = {
        n: chunk_of_unit[b.name] for n in model.buffers for b in units if n.startswith(b.name + ".")
    }
    holders_ = {n: frozenset(h) for n, h in holders.items()}
    return ChunkPlan(chunks, tuple(u.name for u in units), first, holders_, name_chunk, buffer_chunk)


def _chunk_sizes(weights: list[int], head: int, chunks: int, partition: Any, who: str) -> list[int]:
    """Blocks per chunk: equal counts ("uniform"), balanced block params ("params"),
    balanced matmul work ("compute": block params, plus the head's on the last chunk,
    tied or not, since its matmul runs there), or given."""
    n = len(weights)
    if partition == "uniform":
        return [n // chunks + (c < n % chunks) for c in range(chunks)]
    if partition in ("params", "compute"):
        return _balanced(weights, chunks, head if partition == "compute" else 0)
    if isinstance(partition, (list, tuple)) and all(isinstance(k, int) and k >= 1 for k in partition):
        if len(partition) != chunks or sum(partition) != n:
            raise ValueError(
                f"{who}: partition={list(partition)} must give {chunks} chunk sizes that sum to the model's {n} blocks"
            )
        return list(partition)
    raise ValueError(f"{who}: partition must be 'params', 'compute', 'uniform' or a list of blocks per chunk; got {partition!r}")


def _balanced(weights: list[int], chunks: int, tail: int = 0) -> list[int]:
    """Contiguous sizes that minimise the heaviest chunk, the last one carrying `tail`
    besides its blocks (dynamic programming)."""
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(chunks + 1)]  # best[c][i]: first i blocks in c chunks
    cut = [[0] * (n + 1) for _ in range(chunks + 1)]
    best[0][0] = 0
    for c in range(1, chunks + 1):
        for i in range(c, n + 1):
            for j in range(c - 1, i):
                cost = max(best[c - 1][j], prefix[i] - prefix[j] + (tail if c == chunks else 0))
                if cost < best[c][i]:
                    best[c][i], cut[c][i] = cost, j
    sizes, i = [], n
    for c in range(chunks, 0, -1):
        sizes.append(i - cut[c][i])
        i = cut[c][i]
    return sizes[::-1]
