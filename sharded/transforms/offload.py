"""`offload(tier="cpu")`: the optimizer state in host memory, and the update run there.

Reference semantics: the plain step, exactly. The update is the same optimizer on the
same values; it runs on the CPU (the fused AdamW path: torch's fused CPU kernel).

    step = sharded.offload("cpu")(sharded.shard_zero(stage=2)(train_step))

Between steps every tensor of this rank's optimizer state (its chunks under ZeRO)
lives in host memory, pinned where there is a GPU. `state.placements` marks it with
`Tier.HOST`, so checkpoints and `gather` know where it is. The device keeps the params,
the grads and the activations. At the update, this rank's grads and params are copied
to the host. The optimizer runs there, on the host's copies, with this rank's share of
the host's cores as torch's threads, and the updated params are copied back into the
device's tensors.

[Note: offload's two places in the order] Its `level` is outermost (STORAGE). Its
`init` runs after every other transform's, since `init` runs innermost first: ZeRO
cuts its chunks on the device, with its collectives, before they move. Its `gather`
runs first, putting the state back on the device before ZeRO's all-gathers. Its update
handler runs innermost (`levels`). By then ZeRO has cut the params into this rank's
chunks, and a loss scaler has unscaled and checked the grads on the device; a skipped
step never reaches it.

Not built yet (issue 14), each a clear error:
- tier="nvme";
- params=True (ZeRO-Infinity's params off the device);
- fp32 masters on the host under mixed_precision: the params stay on the device in
  their own dtype.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Iterator

import torch

from sharded import tree as T
from sharded.placement import Placement, Tier, map_state, state_leaves
from sharded.step import Level, Op, ProgramInfo, Transform, transform

__all__ = ["offload"]

_TIERS = {"cpu": Tier.HOST}
_NOT_BUILT = {"nvme": "tier='nvme' (the state in files on local disk)"}


class Offload(Transform):
    name = "offload"
    level = Level.STORAGE
    levels = {"update": Level.HOST}

    def __init__(self, tier: str = "cpu", params: bool = False):
        if tier in _NOT_BUILT:
            raise ValueError(f"offload({_NOT_BUILT[tier]}) is not built yet (issue 14); use offload(tier='cpu')")
        if tier not in _TIERS:
            raise ValueError(f"offload(tier={tier!r}): unknown tier; use tier='cpu' (host memory)")
        if params is not False:
            raise ValueError("offload(params=True), the params off the device (ZeRO-Infinity), is not built yet (issue 14); use offload(tier='cpu')")
        self.tier = tier
        self.handlers = {"update": self._update}
        self._buffers: dict[tuple, list[torch.Tensor]] = {}  # host copies of grads and params, per layout

    def describe(self) -> str:
        return f"offload({self.tier!r})"

    def init(self, state: Any) -> Any:
        _check_host_memory(sum(x.numel() * x.element_size() for path, x in state_leaves(state) if _offloaded(path, x)))
        pin = torch.cuda.is_available()
        moved = map_state(state, lambda path, x: _to_host(x, pin) if _offloaded(path, x) else x)
        placements = {
            path: dataclasses.replace(state.placements.get(path) or Placement(x.shape), tier=_TIERS[self.tier])
            for path, x in state_leaves(moved)
            if _offloaded(path, x)
        }
        return moved.replace(placements=moved.placements.update(placements))

    def gather(self, state: Any) -> Any:
        device = next((x.device for x in T.leaves(state.params) if isinstance(x, torch.Tensor)), torch.device("cpu"))
        moved = map_state(state, lambda path, x: x.to(device) if _offloaded(path, x) else x)
        return moved.replace(placements=moved.placements.map(lambda p: dataclasses.replace(p, tier=Tier.DEVICE)))

    def _update(self, next_: Callable, tx: Any, grads: Any, opt_state: Any, params: Any) -> Any:
        """The optimizer on host copies of this rank's grads and params; the updated params
        copied back into the device's tensors (which the transforms outside hold views of).
        The copies go through host buffers kept from step to step (pinned beside a GPU):
        one batch of asynchronous copies each way and one wait, not a wait per tensor."""
        on_device, device_grads = T.leaves(params), T.leaves(grads)
        host_params, host_grads = self._staging("params", on_device), self._staging("grads", device_grads)
        torch._foreach_copy_(host_params + host_grads, on_device + device_grads, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # the host reads them next
        with _threads(_host_threads()):
            updated, opt_state = next_(tx, T.unflatten(T.structure(grads), host_grads), opt_state, T.unflatten(T.structure(params), host_params))
        torch._foreach_copy_(on_device, T.leaves(updated), non_blocking=True)  # stream-ordered before the next step's copies
        return params, opt_state

    def _staging(self, what: str, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """Host buffers shaped like `like`, made once per layout."""
        key = (what, tuple((x.shape, x.dtype) for x in like))
        if key not in self._buffers:
            pin = torch.cuda.is_available()
            self._buffers[key] = [torch.empty(x.shape, dtype=x.dtype, pin_memory=pin) for x in like]
        return self._buffers[key]

    def explain(self, program: list[Op], info: ProgramInfo) -> list[Op]:
        nbytes = sum(x.numel() * x.element_size() for x in T.leaves(info.params) if x.is_floating_point())
        out = []
        for op in program:
            if op.name == "update":
                out.append(Op("data", "grads and params to the host", "this rank's part of them", nbytes=2 * nbytes))
                out.append(Op("compute", "update on the host", f"{op.detail}, with its state in {self.tier} memory"))
                out.append(Op("data", "params to the device", "the updated values, in place", nbytes=nbytes))
            else:
                out.append(op)
        return out


def _offloaded(path: str, x: Any) -> bool:
    """The leaves offload keeps on the host: every tensor of the optimizer state."""
    return path.startswith("opt_state") and isinstance(x, torch.Tensor)


def _host_threads() -> int:
    """This rank's share of the cores it may run on: the ranks on one host update at once."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


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
            f"offload('cpu'): this rank's optimizer state needs {needed / 2**30:.2f} GiB of host memory, and its share of "
            f"the host's available memory is {share / 2**30:.2f} GiB ({available / 2**30:.2f} GiB over {ranks} rank(s) on this host); "
            "cut the state over more ranks with shard_zero(stage=1|2|3), run fewer ranks per host, or use a larger host"
        )


def _to_host(x: torch.Tensor, pin: bool) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=pin)
    return out.copy_(x)


offload = transform(Offload)
