"""`Mesh`: the world's ranks laid out on named axes (pp, dp, ep, tp) over torch's DeviceMesh.

    mesh = sharded.Mesh(pp=2)            # on 8 ranks: pp=2, dp=4, ep=1, tp=1
    mesh.size("dp"), mesh.rank("dp")     # 4, and this rank's coordinate on dp
    mesh.group("dp")                     # the ProcessGroup of this rank's dp peers

Transforms ask a mesh for their axis's size, coordinate and group; `Mesh.current()` is
the mesh they use unless given one (`sharded.distributed.init` sets it to dp = world).
In a single process with no process group, every axis has size 1 and no groups exist.
Building a mesh of more than one rank creates process groups: every rank must build it.

[Note: axis order] Ranks are numbered row-major over (pp, dp, ep, tp), so tp varies
fastest: rank = ((pp * DP + dp) * EP + ep) * TP + tp. Neighbouring ranks share a host
and its fastest links, so the axis that communicates most often goes innermost:
  - tp: an all-reduce or all-gather inside every layer, forward and backward: innermost,
    within NVLink;
  - ep: an all-to-all of tokens in every MoE layer, carved out of the data-parallel ranks
    (experts are sharded over replicas), so it sits just outside tp, inside dp;
  - dp: one bucketed all-reduce / reduce-scatter of grads per step, overlapped with
    backward: it tolerates slower links;
  - pp: point-to-point activations between neighbouring stages only, the least traffic:
    outermost, so stages may span hosts.
This is Megatron's and torchtitan's order (pp, dp, cp, tp), with ep placed as in their
MoE meshes.
"""
from __future__ import annotations

import math
from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from sharded import distributed

__all__ = ["Mesh", "AXES"]

AXES = ("pp", "dp", "ep", "tp")  # outermost to innermost: see [Note: axis order]

_current: Mesh | None = None


class Mesh:
    """Named axes over the world's ranks; `dp=None` takes the ranks the other axes leave."""

    def __init__(self, dp: int | None = None, pp: int = 1, tp: int = 1, ep: int = 1):
        spelled = _spelled(dp=dp, pp=pp, tp=tp, ep=ep)
        for name, value in (("dp", dp), ("pp", pp), ("tp", tp), ("ep", ep)):
            if value is None and name == "dp":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{spelled}: axis {name}={value!r} must be a positive int")
        world = distributed.world_size()
        others = pp * tp * ep
        if dp is None:
            if world % others:
                raise ValueError(
                    f"{spelled} needs a world size divisible by pp*tp*ep = {others}, but the world has "
                    f"{world}; pick pp, tp and ep whose product divides {world}"
                )
            dp = world // others
        elif dp * others != world:
            raise ValueError(
                f"{spelled} has {dp * others} ranks but the world has {world}; pick sizes whose product is {world}"
            )
        self._sizes = {"pp": pp, "dp": dp, "ep": ep, "tp": tp}
        self._global_rank = distributed.rank()
        self._coords = _unravel(self._global_rank, [self._sizes[a] for a in AXES])
        self._device_mesh = _build_device_mesh(self._sizes) if distributed.is_initialized() else None
        self._links: dict[str, dict[tuple[int, int], Any]] = {}

    @staticmethod
    def current() -> Mesh:
        """The default mesh: set by `sharded.distributed.init` (or `set_current`).

        Under a process group that sharded did not create (the user called
        `init_process_group` directly), it is dp = world, built on first use. Without
        a process group it is a one-rank mesh.
        """
        global _current
        if _current is None and distributed.is_initialized():
            _current = Mesh()
        return _current if _current is not None else Mesh()

    @staticmethod
    def set_current(mesh: Mesh | None) -> None:
        """Make `mesh` the default for transforms that are not given one (None: forget it)."""
        global _current
        if mesh is not None and not isinstance(mesh, Mesh):
            raise TypeError(f"Mesh.set_current expects a Mesh or None; got {type(mesh).__name__}")
        _current = mesh

    @property
    def axes(self) -> dict[str, int]:
        """{axis name: size}, outermost first."""
        return dict(self._sizes)

    @property
    def world_size(self) -> int:
        return math.prod(self._sizes.values())

    @property
    def device_mesh(self) -> Any:
        """torch's DeviceMesh over the axes of size > 1 (just "dp" when all are 1); None without a process group.

        Axes of size 1 are left out, as torchtitan does: each would cost a process
        group per rank to create and none would ever communicate.
        """
        return self._device_mesh

    def size(self, axis: str) -> int:
        self._check(axis)
        return self._sizes[axis]

    def rank(self, axis: str) -> int:
        """This rank's coordinate on `axis` (0 .. size(axis) - 1)."""
        self._check(axis)
        return self._coords[AXES.index(axis)]

    def group(self, axis: str) -> Any:
        """The ProcessGroup of the ranks that differ from this one only on `axis`; None if size(axis) == 1."""
        self._check(axis)
        if self._sizes[axis] == 1:
            return None
        return self._device_mesh.get_group(axis)

    def links(self, axis: str) -> dict[tuple[int, int], Any]:
        """This rank's directed links to its ring neighbours on `axis`: {(sender, receiver)
        global ranks: a two-rank ProcessGroup of its own}. A group per direction gives each
        direction its own communicator (and NCCL stream), so a send waiting for its
        receiver never holds up a message going the other way. Creating a group is
        collective: every rank creates every link of every `axis` group, in one order."""
        self._check(axis)
        if axis not in self._links:
            size = self._sizes[axis]
            device_mesh = self._device_mesh
            lines = [] if size == 1 else device_mesh.mesh.movedim(device_mesh.mesh_dim_names.index(axis), -1).reshape(-1, size).tolist()
            mine = {}
            for ranks in lines:
                ring = {(ranks[i], ranks[(i + 1) % size]) for i in range(size)}
                for pair in sorted(ring | {(b, a) for a, b in ring}):
                    group = dist.new_group(list(pair))
                    if self._global_rank in pair:
                        mine[pair] = group
            self._links[axis] = mine
        return self._links[axis]

    def _check(self, axis: str) -> None:
        if axis not in self._sizes:
            raise KeyError(f"no mesh axis {axis!r}; the axes are {', '.join(AXES)}")

    def __repr__(self) -> str:
        sizes = ", ".join(f"{a}={self._sizes[a]}" for a in AXES)
        return f"Mesh({sizes}; rank {self._global_rank} of {self.world_size})"


def _spelled(**sizes: Any) -> str:
    """How the user wrote the call: Mesh(dp=3, pp=2), defaults left out."""
    defaults = {"dp": None, "pp": 1, "tp": 1, "ep": 1}
    args = ", ".join(f"{k}={v!r}" for k, v in sizes.items() if v != defaults[k])
    return f"Mesh({args})"


def _unravel(index: int, shape: list[int]) -> tuple[int, ...]:
    coords = []
    for size in reversed(shape):
        index, c = divmod(index, size)
        coords.append(c)
    return tuple(reversed(coords))


def _build_device_mesh(sizes: dict[str, int]) -> Any:
    names = tuple(a for a in AXES if sizes[a] > 1) or ("dp",)
    return init_device_mesh(distributed.device().type, tuple(sizes[a] for a in names), mesh_dim_names=names)
