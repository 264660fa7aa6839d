"""`offload(tier="cpu"|"nvme", params=False)`: the optimizer state (and, with
params=True, the params) in host memory or files on local disk, and the update run on
the host.

Reference semantics: the plain step, exactly. The update is the same optimizer on the
same values; it runs on the CPU (the fused AdamW path: torch's fused CPU kernel).

    step = sharded.offload("cpu")(sharded.shard_zero(stage=2)(train_step))
    step = sharded.offload("cpu", params=True)(sharded.shard_zero(stage=3)(train_step))

Between steps every tensor of this rank's optimizer state (its chunks under ZeRO)
lives in host memory (not pinned: it never crosses to the device; the grads' and
params' host buffers are pinned). `state.placements` marks it with
`Tier.HOST`, so checkpoints and `gather` know where it is. The device keeps the params,
the grads and the activations. At the update, this rank's grads and params are copied
to the host. The optimizer runs there, on the host's copies, with this rank's share of
the host's cores as torch's threads, and the updated params are copied back into the
device's tensors.

With params=True (ZeRO-Infinity's params off the device; it needs shard_zero(stage=3),
which then gathers per block on one rank too: `Capability.HOSTS_PARAMS`), this rank's
param chunks live on the host too. ZeRO-3 fetches each block's chunks
to the device when it gathers the block, on a side stream ahead of use ([Note:
gathering from the host] in _flat.py), so the device holds only the blocks gathered
now. The update then runs on the host's params themselves: only the grads cross. It
starts during backward, each block's leaves updated on the host as soon as their
grads are reduced and copied over, where the optimizer is leafwise and nothing
rewrites the grads after their reduction ([Note: the host update in parts] in
_host_update.py).

[Note: offload's two places in the order] Its `level` is outermost (STORAGE). Its
`init` runs after every other transform's, since `init` runs innermost first: ZeRO
cuts its chunks on the device, with its collectives, before they move. Its `gather`
runs first, putting the state back on the device before ZeRO's all-gathers. Its update
handler runs innermost (`levels`). By then ZeRO has cut the params into this rank's
chunks, and a loss scaler has unscaled and checked the grads on the device; a skipped
step never reaches it.

With tier="nvme" (`path=`, `host_buffer_gb=`), the optimizer's moments live in a swap
file under `path` instead, `Tier.DISK` in the placements, and the update runs group by
group through two sets of host buffers that together take `host_buffer_gb` ([Note:
the disk tier] in _disk_update.py): a state larger than host memory trains. With
params=True too, ZeRO-3's param chunks (the fp32 masters) are in the file beside the
moments: the update reads and writes them there as it does the moments, and ZeRO-3
fetches each block's chunks through their mapping (the page cache), so neither the
device nor host memory holds the params between uses.

With update="device" (tier="cpu", params=True) the state still lives on the host between
steps, but each block's update runs on the GPU, its params and moments streamed up and
back as backward reduces its grads ([Note: the update streamed through the device] in
_host_update.py): faster where several GPUs share the host's cores (decision 54).

With where=(name, param) -> bool (tier="cpu", params=False), only the chosen params'
optimizer state moves; their update runs on the host while the rest runs on the device
at once ([Note: a split update] in _split_update.py).

Not built yet (issue 14), each a clear error:
- where= with params=True or tier="nvme";
- fp32 masters on the host under mixed_precision without params=True: the params
  stay on the device in their own dtype.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Iterator

import torch

from sharded import primitives
from sharded import tree as T
from sharded.optim import leafwise_tail
from sharded.pinned import PinnedSlabs
from sharded.placement import Placement, Tier, map_state, state_leaves
from sharded.reduce import GradBucket
from sharded.sharding import map_chunked
from sharded.swap import DEFAULT_HOST_BUFFER_GB
from sharded.step import Capability, Level, Op, ProgramInfo, Transform, transform
from sharded.transforms._disk_update import DiskTier
from sharded.transforms._host_update import HostUpdate, Refetches, UpdateSite
from sharded.transforms._split_update import update_split

__all__ = ["offload"]

_TIERS = ("cpu", "nvme")
_NEEDS_STAGE3 = (
    "offload(params=True) fetches each block's param chunks from the host as ZeRO-3 gathers them, so it needs "
    "shard_zero(stage=3) in the same step; add it, or use offload('cpu') to move only the optimizer state"
)


class Offload(Transform):
    name = "offload"
    level = Level.STORAGE
    levels = {"update": Level.HOST}

    def __init__(
        self,
        tier: str = "cpu",
        params: bool = False,
        path: str | os.PathLike | None = None,
        host_buffer_gb: float | None = None,
        where: Callable[[str, torch.Tensor], bool] | None = None,
        update: str = "host",
    ):
        if tier not in _TIERS:
            raise ValueError(f"offload(tier={tier!r}): unknown tier; use tier='cpu' (host memory) or tier='nvme' (files on local disk)")
        if not isinstance(params, bool):
            raise ValueError(f"offload(params=...) is True (the params on the host too, under shard_zero(stage=3)) or False; got {params!r}")
        if tier == "nvme":
            _check_swap_directory(path)
            if host_buffer_gb is not None and not (isinstance(host_buffer_gb, (int, float)) and host_buffer_gb > 0):
                raise ValueError(f"offload(host_buffer_gb=...) is the host memory (GB) the nvme tier stages the update through, a number > 0; got {host_buffer_gb!r}")
        elif path is not None or host_buffer_gb is not None:
            raise ValueError("offload(path=..., host_buffer_gb=...) set the nvme tier's swap files and buffers; tier='cpu' keeps the state in host memory and takes neither")
        if where is not None and not callable(where):
            raise ValueError(f"offload(where=...) is a predicate (name, param) -> bool choosing the params whose optimizer state moves; got {where!r}")
        if where is not None and (tier != "cpu" or params):
            raise ValueError("offload(where=...) is built for tier='cpu' without params=True so far (issue 14); drop where=, or use offload('cpu', where=...)")
        if update not in ("host", "device"):
            raise ValueError(f"offload(update={update!r}): the update runs on the 'host' (its cores) or the 'device' (the state streamed through the GPU)")
        if update == "device" and (tier != "cpu" or not params or where is not None):
            raise ValueError(
                "offload(update='device') streams the state through the GPU as backward reduces each block's grads, which is built for "
                "offload('cpu', params=True) under shard_zero(stage=3); use that, or update='host'"
            )
        self.tier, self.params, self.where = tier, params, where
        self.site = UpdateSite(update)
        self.capabilities = Capability.HOSTS_PARAMS if params else Capability.NONE
        self._chosen: list[int] | None = None  # with where=: the param leaves whose optimizer state moved (set by init)
        self._chosen_paths: frozenset[str] = frozenset()
        self.path, self.host_bytes = (os.fspath(path) if path is not None else None), int((host_buffer_gb or DEFAULT_HOST_BUFFER_GB) * 2**30)
        self._disk: DiskTier | None = None
        self.handlers = {"update": self._update, "reduce_grads": self._reduce_grads, "fetch": self._fetch}
        self._buffers: dict[tuple, list[torch.Tensor]] = {}  # host copies of grads and params, per layout
        self._pinned = PinnedSlabs()  # the host buffers of grads and params that cross PCIe ([Note: pinned slabs])
        self._streams = False  # whether the update may start during backward (set by require)
        self._keeps = False  # whether backward's copies of the param chunks are kept for the update (set by require)
        self._live: tuple[Any, HostUpdate] | None = None  # (the step's state, its update in parts)
        self._refetches = Refetches()  # update='device': backward's copies of the param chunks, for the update

    def describe(self) -> str:
        chosen = f", where={getattr(self.where, '__name__', 'a predicate')}" if self.where is not None else ""
        site = ", update='device'" if self.site is UpdateSite.DEVICE else ""
        return f"offload({self.tier!r}{', params=True' if self.params else ''}{f', path={self.path!r}' if self.path else ''}{chosen}{site})"

    def require(self, stack: Any) -> None:
        if self.params and not any(Capability.SHARDS_PARAMS in t.capabilities for t in stack):
            raise ValueError(_NEEDS_STAGE3)
        # [Note: the host update in parts] in _host_update.py: only where the params live
        # on the host and no transform changes the grads after their reduction
        rewrites = Capability.REWRITES_GRADS | Capability.RUNS_SCHEDULE
        self._streams = self.params and self.tier == "cpu" and not any(t is not self and rewrites & t.capabilities for t in stack)
        # one pass a step: a chunk's second fetch is its backward's ([Note: the param a regather already fetched])
        self._keeps = self.site is UpdateSite.DEVICE and not any(Capability.MICROBATCHES in t.capabilities for t in stack)
        if self.site is UpdateSite.DEVICE and not self._streams:
            raise ValueError(
                f"offload(update='device') runs each block's update as backward reduces its grads, so those grads must be final there; "
                f"{', '.join(t.describe() for t in stack if t is not self and rewrites & t.capabilities)} changes them after "
                "(a pipeline's schedule, a loss scale, exchanged momentum): use update='host' with it"
            )

    def _reduce_grads(self, next_: Callable, bucket: GradBucket) -> Any:
        """A final group of this rank's grads: once reduced, to the host, and its leaves'
        update started there (when the step qualifies)."""
        pending = next_(bucket)
        state = primitives.step_state()
        if not (self._streams and bucket.take is not None and state is not None):  # take: a final reduce-scatter of param grads
            return pending
        if self._live is None or self._live[0] is not state:
            if self._live is not None and self._live[1] is not None:
                self._live[1].abandon()
            self._live = (state, self._host_update(state))
        live = self._live[1]
        return pending if live is None else pending.then(lambda: live.reduced(bucket))

    def _fetch(self, next_: Callable, chunks: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """Param chunks to the device for ZeRO-3's gather; with update='device', a chunk's
        second copy in a step is kept for its update ([Note: the param a regather
        already fetched] in _host_update.py)."""
        copies = next_(chunks, device)
        if self._keeps:
            self._refetches.fetched(primitives.step_state(), chunks, copies)
        return copies

    def _host_update(self, state: Any) -> HostUpdate | None:
        """This step's update in parts, or None where the optimizer cannot run in parts."""
        try:
            rows = lambda b: self._host_buffer("rows", b.name, b.out)  # noqa: E731
            return HostUpdate(state.tx, state.opt_state, state.params, rows, lambda i, like: self._host_buffer("grad", i, like), _on_host_cores, self.site, self._refetches)
        except ValueError:  # not leafwise, not even after a head: the whole update, as before
            return None

    def _host_buffer(self, kind: str, i: Any, like: torch.Tensor) -> torch.Tensor:
        """Leaf (or bucket) i's host buffer for its `kind` ("grad", "param", "rows")
        shaped like `like` (pinned beside a GPU), made once."""
        key = (kind, i, like.shape, like.dtype)
        if key not in self._buffers:
            self._buffers[key] = [self._pinned.empty(like.shape, like.dtype)]
        return self._buffers[key][0]

    def _offloaded(self, path: str, x: Any) -> bool:
        """The leaves kept off the device: every tensor of the optimizer state (with
        where=, those that mirror the chosen params) and, with params=True, every param
        ZeRO-3 chunks (floating, non-empty)."""
        if not isinstance(x, torch.Tensor):
            return False
        if self.where is not None:
            return path in self._chosen_paths
        return path.startswith("opt_state") or (self.params and path.startswith("params") and x.is_floating_point() and x.numel() > 0)

    def init(self, state: Any) -> Any:
        if self.tier == "nvme":
            return self._init_disk(state)
        if self.where is not None:
            self._choose(state)
        if self.site is UpdateSite.DEVICE and not state.tx.leafwise:
            raise ValueError(
                "offload(update='device') runs each block's update as backward reduces its grads, which needs a leafwise optimizer; "
                "this one reads every grad first (a global-norm clip, e.g. --grad-clip): drop the clip (--grad-clip 0), or use update='host'"
            )
        _check_host_memory(sum(  # what moving allocates: the optimizer state made on the host already stays
            x.numel() * x.element_size() for path, x in state_leaves(state)
            if self._offloaded(path, x) and (x.device.type != "cpu" or path.startswith("params"))
        ))
        crossing = PinnedSlabs()  # what crosses PCIe every step (the params' chunks; streamed, the moments too): this state's alone, freed with it
        streamed = self.site is UpdateSite.DEVICE
        return self._moved(state, lambda path, x: _to_host(x, crossing if streamed or path.startswith("params") else None), lambda path: Tier.HOST)

    def _moved(self, state: Any, move: Callable[[str, torch.Tensor], torch.Tensor], tier: Callable[[str], Tier]) -> Any:
        """`state` with each offloaded leaf replaced by `move(path, x)` and placed on
        `tier(path)`; the device it came from is remembered for `gather`."""
        self._device = next((x.device for x in T.leaves(state.params) if isinstance(x, torch.Tensor)), torch.device("cpu"))
        moved = map_state(state, lambda path, x: move(path, x) if self._offloaded(path, x) else x)
        for (path, x), (_, y) in zip(state_leaves(state), state_leaves(moved)):
            if path.startswith("params") and y is not x and x.device.type != "cpu":
                # donated (decision 1): on one rank ZeRO-3 leaves the model's own device tensors in
                # the state, and the traced model would keep them alive beside their host copies
                x.untyped_storage().resize_(0)
        placements = {
            path: dataclasses.replace(state.placements.get(path) or Placement(x.shape), tier=tier(path))
            for path, x in state_leaves(moved)
            if self._offloaded(path, x)
        }
        return moved.replace(placements=moved.placements.update(placements))

    def _choose(self, state: Any) -> None:
        """where=: the params it picks (by name, on this rank's part of them) and the
        optimizer-state leaves that mirror them, which move; the counts stay."""
        try:
            leafwise_tail(state.tx, state.opt_state)
        except ValueError as err:
            raise ValueError(f"offload(where=...) updates the chosen leaves on the host and the rest on the device: {err}") from None
        leaves = T.leaves_with_paths(state.params)
        chosen = tuple(bool(self.where(_name(path), x)) for path, x in leaves)
        marked = map_chunked(state.opt_state, T.structure(state.params), chosen, lambda x, i: _Chosen())
        self._chosen = [i for i, c in enumerate(chosen) if c]
        self._chosen_paths = frozenset("opt_state" + path for path, x in T.leaves_with_paths(marked) if isinstance(x, _Chosen))
        device = next((x.device for x in T.leaves(state.params) if isinstance(x, torch.Tensor)), torch.device("cpu"))
        if any(x.device != device for path, x in state_leaves(state) if path.startswith("opt_state") and path not in self._chosen_paths and isinstance(x, torch.Tensor)):
            raise ValueError(
                f"offload(where=...) updates the params it does not choose on their device ({device}), so their optimizer state "
                "must be there too; make the state beside the params (TrainState.create without opt_device)"
            )

    def _init_disk(self, state: Any) -> Any:
        """[Note: the disk tier] in _disk_update.py: the moments (and with params=True the
        param chunks) to a swap file, the counts to host memory."""
        try:
            leafwise_tail(state.tx, state.opt_state)
        except ValueError as err:
            raise ValueError(f"offload(tier='nvme') updates the optimizer state group by group through host_buffer_gb of host memory: {err}") from None
        _check_host_memory(self.host_bytes)
        if self._disk is None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            self._disk = DiskTier(self.path, self.host_bytes, rank)  # its stores close themselves ([Note: closing from a finalizer])
        mapped = self._disk.place({path: x for path, x in state_leaves(state) if self._offloaded(path, x) and x.dim() > 0})
        return self._moved(state, lambda path, x: mapped[path] if path in mapped else _to_host(x, None), lambda path: Tier.DISK if path in mapped else Tier.HOST)

    def metrics(self, state: Any) -> dict:
        """The nvme tier's last update: GB read and written, their rate over the update, its seconds."""
        return dict(self._disk.last) if self._disk is not None else {}

    def gather(self, state: Any) -> Any:
        moved = map_state(state, lambda path, x: x.to(self._device) if self._offloaded(path, x) else x)
        return moved.replace(placements=moved.placements.map(lambda p: dataclasses.replace(p, tier=Tier.DEVICE)))

    def _update(self, next_: Callable, tx: Any, grads: Any, opt_state: Any, params: Any) -> Any:
        """The optimizer on the host's copies of this rank's grads and params (the params
        themselves where they live there); the updated params copied back into the
        device's tensors (which the transforms outside hold views of). The copies go
        through host buffers kept from step to step (pinned beside a GPU): one batch of
        asynchronous copies each way and one wait, not a wait per tensor. Where the
        update already started during backward, it is finished instead."""
        live, self._live = self._live, None
        if live is not None and live[1] is not None and live[0] is primitives.step_state():
            return live[1].finish(params, grads)
        if self.site is UpdateSite.DEVICE:
            raise ValueError(
                "offload(update='device'): no reduction in this step gave its grads final (shard_zero(reduce_every_microbatch=True) "
                "sums them after, hybrid sharding sums over replicas after), so the update could not start during backward; "
                "use update='host' with it"
            )
        if self._disk is not None:
            return self._disk.update(tx, grads, opt_state, params, _on_host_cores, params_stored=self.params)
        if self._chosen is not None:
            return update_split(tx, grads, opt_state, params, self._chosen, self._host_buffer, _on_host_cores)
        leaves, device_grads = T.leaves(params), T.leaves(grads)
        host_params, host_grads = self._on_host("params", leaves), self._on_host("grads", device_grads)
        staged = [(h, x) for h, x in zip(host_params + host_grads, leaves + device_grads) if h is not x]
        if staged:
            torch._foreach_copy_([h for h, _ in staged], [x for _, x in staged], non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # the host reads them next
        with _on_host_cores(), T.copies_of(zip(device_grads, host_grads)):  # a tied grad still counts once in a clip's norm
            updated, opt_state = next_(tx, T.unflatten(T.structure(grads), host_grads), opt_state, T.unflatten(T.structure(params), host_params))
        back = [(x, u) for x, h, u in zip(leaves, host_params, T.leaves(updated)) if x is not u]
        if back:  # stream-ordered before the next step's copies
            torch._foreach_copy_([x for x, _ in back], [u for _, u in back], non_blocking=True)
        return params, opt_state

    def _on_host(self, what: str, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor of `like` itself where it is in host memory, else its host buffer
        (made once per layout)."""
        key = (what, tuple((x.shape, x.dtype, x.device) for x in like))
        if key not in self._buffers:
            self._buffers[key] = [x if x.device.type == "cpu" else self._pinned.empty(x.shape, x.dtype) for x in like]
        return self._buffers[key]

    def explain(self, program: list[Op], info: ProgramInfo) -> list[Op]:
        nbytes = sum(x.numel() * x.element_size() for x in T.leaves(info.params) if x.is_floating_point())
        where = {"cpu": "host memory", "nvme": f"a swap file under {self.path}, in groups through {self.host_bytes / 2**30:g} GiB of host buffers"}[self.tier]
        out = []
        for op in program:
            if op.name != "update":
                out.append(op)
            elif self.site is UpdateSite.DEVICE:  # the state crosses, each block's as its reduction finishes
                moments = "the optimizer's moments beside them (Adam: twice these bytes)"
                out.append(Op("data", "params and moments to the device", f"each block's as its reduction finishes; {moments}", nbytes=nbytes, overlaps="backward"))
                out.append(Op("compute", "update on the device", f"{op.detail}, on the streamed copies"))
                out.append(Op("data", "params and moments back to the host", f"the updated values, in place; {moments}", nbytes=nbytes, overlaps="backward"))
            elif self.params:  # the params live on the host: only the grads cross, during backward where it can
                out.append(Op("data", "grads to the host", "each block's as its reduction finishes", nbytes=nbytes, overlaps="backward"))
                out.append(Op("compute", "update on the host", f"{op.detail}, on the host's params, with its state in {where}"))
            else:
                out.append(Op("data", "grads and params to the host", "this rank's part of them", nbytes=2 * nbytes))
                out.append(Op("compute", "update on the host", f"{op.detail}, with its state in {where}"))
                out.append(Op("data", "params to the device", "the updated values, in place", nbytes=nbytes))
        return out


class _Chosen:
    """A marker for an optimizer-state leaf that where= moves."""


def _name(path: str) -> str:
    """A param's name as where= gets it: the key of a dict of params ("blocks.0.attn.weight"),
    else its path in the tree."""
    return path[2:-2] if path.startswith("['") and path.endswith("']") else path


def _check_swap_directory(path: Any) -> None:
    """The nvme tier's directory: given, a directory, writable (free space is checked
    when init knows the state's size)."""
    if path is None:
        raise ValueError("offload(tier='nvme') needs path=...: a directory on local disk (NVMe) for this job's swap files")
    if not os.path.isdir(path):
        raise ValueError(f"offload(tier='nvme', path={os.fspath(path)!r}): no such directory; create it, or pass a directory on local disk")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"offload(tier='nvme', path={os.fspath(path)!r}): not writable by this process; pass a directory it may write")


def _on_host_cores() -> contextlib.AbstractContextManager:
    """torch's threads set to this rank's share of the host's cores, for a host update."""
    return _threads(_host_threads())


def _host_threads() -> int:
    """This rank's share of the cores it may run on (the ranks on one host update at
    once), less the one its own thread keeps launching the GPU's work and copies on:
    torch's CPU AdamW in parts from a worker ran 1.12-1.13x faster so on both GPU hosts
    (`benchmarks/host_adamw.py`, parts_worker_fewer_threads; docs/perf-notes.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) - 1)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the body (the host update), then as they were."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (what the kernel can give without swapping), or
    None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _check_host_memory(needed: int) -> None:
    """A clear error before the first step when this rank's share of the host's free
    memory (the ranks on one host share it) cannot hold what offload moves there."""
    available = _available_host_bytes()
    if available is None:
        return
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = available // max(ranks, 1)
    if needed > share:
        raise ValueError(
            f"offload('cpu'): moving this rank's state (optimizer state, params with params=True) needs {needed / 2**30:.2f} GiB of host memory, and its share of "
            f"the host's available memory is {share / 2**30:.2f} GiB ({available / 2**30:.2f} GiB over {ranks} rank(s) on this host); "
            "cut the state over more ranks with shard_zero(stage=1|2|3), run fewer ranks per host, or use a larger host"
        )


def _to_host(x: torch.Tensor, pinned: PinnedSlabs | None) -> torch.Tensor:
    """`x` in host memory: copied into `pinned` beside a GPU where it crosses PCIe every
    step (params fetched per block); the optimizer state never leaves the host, so it
    stays as it is if it is there already (`TrainState.create(..., opt_device="cpu")`
    made it there)."""
    if pinned is not None and torch.cuda.is_available():
        return pinned.copy(x)
    return x if x.device.type == "cpu" else x.to("cpu")


offload = transform(Offload)
