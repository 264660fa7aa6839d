"""Where each leaf of a state lives, as data in the state: `state.placements`.

[Note: placements] `state.placements` maps a leaf's path in the state (as checkpoints
name it: "params['wte.weight']", "opt_state[1][0].mu['wte.weight']", "extra['ef']") to
its `Placement`: the whole leaf's shape, the cuts that give this rank its piece
(outermost first: each cuts the piece the previous one left, over one mesh axis, as
its flattened chunk ([Note: chunk layout] in sharding.py) or a slice along a dim), the tier that holds it, its storage
dtype, and whether it is this rank's own (a per-rank buffer, such as error feedback,
that no other rank has a part of). A leaf without an entry is whole, the same on every
rank of its group, on the compute device. Transforms write the entries of the leaves
they cut, move or add (`init`) and remove them (`gather`); checkpoints, `gather` and
`sharding.as_dtensors` read them, without knowing which transform wrote them.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Any, Callable, Iterator, Mapping

import optree
import torch

from sharded import tree as T

__all__ = ["Tier", "Cut", "Placement", "Placements", "state_leaves", "map_state"]

PARTS = ("params", "opt_state", "step", "extra")  # a TrainState's pytree children


class Tier(enum.Enum):
    DEVICE = "device"  # the compute device's memory
    HOST = "host"  # pinned CPU memory
    DISK = "disk"  # files on local disk


@dataclasses.dataclass(frozen=True, eq=False)
class Cut:
    """One cut over a mesh axis: rank `rank` of `ranks` in `group` keeps its chunk: of
    the flattened piece (`dim` None: ZeRO's [Note: chunk layout]), or its even slice
    along `dim` of each of `blocks` equal parts of that dim (tensor parallelism: a
    fused q, k, v weight is 3 blocks along dim 0)."""

    axis: str
    group: Any
    ranks: int
    rank: int
    dim: int | None = None
    blocks: int = 1


@dataclasses.dataclass(frozen=True, eq=False)
class Placement:
    shape: torch.Size  # the whole leaf's
    cuts: tuple[Cut, ...] = ()
    tier: Tier = Tier.DEVICE
    dtype: torch.dtype | None = None  # storage dtype, where a transform stores it in another
    per_rank: bool = False  # this rank's own value: saved and restored per rank, never resharded

    def cut(self, cut: Cut) -> Placement:
        return dataclasses.replace(self, cuts=self.cuts + (cut,))

    def uncut(self, axis: str) -> Placement:
        return dataclasses.replace(self, cuts=tuple(c for c in self.cuts if c.axis != axis))

    @property
    def trivial(self) -> bool:
        """Whole, on device, in its own dtype, shared: what a missing entry means."""
        return not self.cuts and self.tier is Tier.DEVICE and self.dtype is None and not self.per_rank


@dataclasses.dataclass(frozen=True, eq=False)
class Placements:
    """{leaf path: Placement}, immutable (it is static data of the state's pytree)."""

    entries: tuple[tuple[str, Placement], ...] = ()

    def get(self, path: str) -> Placement | None:
        return self._by_path.get(path)

    @functools.cached_property
    def _by_path(self) -> dict[str, Placement]:
        return dict(self.entries)

    def items(self) -> Iterator[tuple[str, Placement]]:
        return iter(self.entries)

    def update(self, changes: Mapping[str, Placement]) -> Placements:
        """These entries set (a trivial placement removes its entry)."""
        merged = {**dict(self.entries), **changes}
        return Placements(tuple((p, pl) for p, pl in merged.items() if not pl.trivial))

    def map(self, fn: Callable[[Placement], Placement]) -> Placements:
        return Placements(tuple((p, fn(pl)) for p, pl in self.entries if not fn(pl).trivial))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __deepcopy__(self, memo: dict) -> Placements:
        return self  # immutable, and its cuts hold process groups, which are handles, not values

    def __repr__(self) -> str:
        return f"Placements({len(self.entries)} leaves)"


def state_leaves(state: Any) -> list[tuple[str, Any]]:
    """[(path, leaf)] of a TrainState's params, optimizer state, step and extra."""
    out = []
    for part in PARTS:
        tree = getattr(state, part)
        if part == "step":
            out.append((part, tree))
            continue
        out += [(part + path, x) for path, x in T.leaves_with_paths(tree)]
    return out


def map_state(state: Any, fn: Callable[[str, Any], Any]) -> Any:
    """`state` with each leaf x of params, opt_state and extra replaced by fn(path, x)."""
    changes = {}
    for part in ("params", "opt_state", "extra"):
        tree = getattr(state, part)
        changes[part] = optree.tree_map_with_path(
            lambda p, x, part=part: fn(part + T.path_str(p), x), tree, none_is_leaf=False, namespace="sharded"
        )
    return state.replace(**changes)
