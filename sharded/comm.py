"""Collectives: the one module that calls torch.distributed's communication ops.

    pending = comm.all_reduce(flat, group=mesh.group("dp"), async_op=True)
    ...                                  # overlap: compute while the bytes move
    pending.wait()                       # CollectiveTimeout, not a hang, if a rank never joins

Every collective takes a tensor, a group (None: the whole world) and `async_op`, and
returns a `Pending`; without `async_op` it has already completed. When the group has
one rank, or torch.distributed is not initialized, each call returns at once without
touching c10d, so a single process needs no process group. `broadcast` and `barrier`
are synchronous.

Keeping every c10d call here gives one place for the version shim (see [Note: gather
and scatter names]), for turning torch's timeout errors into `CollectiveTimeout`, and
for `recording()`, which lets a test see which collectives a step issued.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "CollectiveTimeout",
    "Op",
    "Pending",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "broadcast_object",
    "done",
    "exchange",
    "recording",
    "reduce_scatter_tensor",
    "tagged",
]

# [Note: gather and scatter names] torch 2.13 renamed `all_gather_into_tensor` and
# `reduce_scatter_tensor` to `all_gather_single` and `reduce_scatter_single` and made the
# old names warn (FutureWarning); torch 2.11 has only the old names. Resolve once, here,
# to the newest name this torch has, so no version ever warns.
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)

# torch.func.functional_call's own context manager (private, stable since torch 2.0):
# swaps a module's params for given tensors without calling the module.
from torch.nn.utils.stateless import _reparametrize_module as reparametrize  # noqa: E402

# Whether a tensor is a torch.func transform's wrapper (grad, vmap, jvp), whose storage
# cannot be touched: code that resizes or refills storage must leave such tensors alone.
is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor

_REDUCE_OPS = ("sum", "avg", "product", "min", "max")  # names of torch.distributed.ReduceOp, lower-cased


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within the process group's timeout (or its group was aborted)."""


@dataclasses.dataclass(frozen=True)
class Op:
    """One collective call, as `recording()` sees it (group_size 1: a no-op in this process)."""

    name: str  # "all_reduce" | "all_gather" | "reduce_scatter" | "all_to_all" | "broadcast" | "barrier" | "send" | "recv"
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    group_size: int
    async_op: bool = False
    reduce: str = ""  # "sum", "avg", ... for reductions
    tag: str = ""  # what the caller said it was moving (`tagged`): "reduce_grads", "compress_grads", ...

    @property
    def nbytes(self) -> int:
        """Bytes of this rank's input to the collective."""
        n = 1
        for d in self.shape:
            n *= d
        return n * (self.dtype.itemsize if self.dtype is not None else 0)


_recorders: list[list[Op]] = []

_What = tuple  # (name, the tensor sent or None, group size): what a CollectiveTimeout names


@contextlib.contextmanager
def recording() -> Iterator[list[Op]]:
    """Collect an `Op` for every collective this process calls inside the block.

        with comm.recording() as ops:
            state, _ = step(state, batch)
        assert [op.name for op in ops] == ["all_reduce"] * n_buckets + ["all_reduce"]

    Process-wide rather than context-local on purpose: data_parallel issues its
    all-reduces from autograd hooks, which run on autograd's own threads on GPU.
    Calls on one-rank groups are recorded too (with group_size 1), so single-process
    tests see what a step would communicate.
    """
    ops: list[Op] = []
    _recorders.append(ops)
    try:
        yield ops
    finally:
        _recorders.remove(ops)


_tag: contextvars.ContextVar[str] = contextvars.ContextVar("sharded_comm_tag", default="")


@contextlib.contextmanager
def tagged(tag: str) -> Iterator[None]:
    """Collectives issued inside are recorded with `tag` (what they move), so a test or
    `explain` can count, say, the bytes of the grads' exchange apart from the params'."""
    token = _tag.set(tag)
    try:
        yield
    finally:
        _tag.reset(token)


def _record(name: str, t: torch.Tensor | None, size: int, async_op: bool, reduce: str = "") -> None:
    op = Op(name, tuple(t.shape) if t is not None else (), t.dtype if t is not None else None, size, async_op, reduce, _tag.get())
    for ops in _recorders:
        ops.append(op)


def _group_size(group: Any) -> int:
    """Ranks in `group`; 1 when there is no process group (a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _check_op(op: str, who: str) -> None:
    if op not in _REDUCE_OPS:
        raise ValueError(f"{who}(op={op!r}): op must be one of {', '.join(map(repr, _REDUCE_OPS))}")


def _reduce_op(op: str) -> Any:
    return getattr(dist.ReduceOp, op.upper())


def _describe(what: _What) -> str:
    """'all_reduce of (1024,) float32 (0.00 MiB) over 4 ranks', for errors: built only when one occurs."""
    name, t, size = what
    if t is None:
        return f"{name} over {size} ranks"
    dtype = str(t.dtype).removeprefix("torch.")
    return f"{name} of {tuple(t.shape)} {dtype} ({t.numel() * t.element_size() / 2**20:.2f} MiB) over {size} ranks"


def _timeout_error(what: _What, err: BaseException) -> CollectiveTimeout | None:
    """The CollectiveTimeout for `err` if it is torch's timeout or abort error, else None.

    gloo raises RuntimeError("... Timed out waiting ...ms ..."); NCCL raises
    DistBackendError (a RuntimeError) when its watchdog times out or aborts a collective.
    """
    backend_error = getattr(dist, "DistBackendError", ())
    if not (isinstance(err, backend_error) or "timed out" in str(err).lower()):
        return None
    return CollectiveTimeout(
        f"{_describe(what)} did not complete: {str(err).strip()}\n"
        "Usually another rank never reached this collective (it raised, returned early, or issued "
        "collectives in a different order): look at the other ranks' errors. If it is only slow, "
        "raise the process group's timeout: sharded.distributed.init(timeout=...) or "
        "launch(..., collective_timeout=...)."
    )


class Pending:
    """A collective in flight; `wait()` until it is done.

    On GPU (NCCL), `wait()` makes the current CUDA stream wait for the collective and
    returns without blocking the host, as torch's `Work.wait()` does; on CPU (gloo) it
    blocks. Where torch reports a timeout or an aborted group (gloo; NCCL after its
    watchdog fired, or with TORCH_NCCL_BLOCKING_WAIT=1), this raises CollectiveTimeout
    naming the collective and its size; see [Note: NCCL connects at init] in
    sharded/distributed.py for what NCCL does otherwise.
    """

    __slots__ = ("_work", "_what", "_then")

    def __init__(self, work: Any, what: _What, then: Callable[[], None] | None = None):
        self._work, self._what, self._then = work, what, then

    def wait(self) -> None:
        if self._work is None:
            return
        try:
            self._work.wait()
        except RuntimeError as err:
            timeout = _timeout_error(self._what, err)
            if timeout is None:
                raise
            raise timeout from err
        self._work = None
        if self._then is not None:
            self._then()

    def then(self, fn: Callable[[], None]) -> Pending:
        """This collective, with `fn` run once it has been waited (after what `wait()`
        already runs): a handler's follow-up to a reduction it did not start."""
        return Pending(self, self._what, fn)


_DONE = Pending(None, ("", None, 1))


def _start(
    what: _What,
    issue: Callable[[], Any],
    async_op: bool,
    then: Callable[[], None] | None = None,
) -> Pending:
    """Issue a collective asynchronously; wait here unless `async_op`. Maps timeouts."""
    try:
        work = issue()
    except RuntimeError as err:
        timeout = _timeout_error(what, err)
        if timeout is None:
            raise
        raise timeout from err
    pending = Pending(work, what, then)
    if not async_op:
        pending.wait()
    return pending


def _backend_device(group: Any) -> torch.device | None:
    """The device a group's collectives need their tensors on (NCCL's: this rank's GPU),
    or None where the backend takes tensors where they are (gloo)."""
    if dist.get_backend(group) != "nccl" or not torch.cuda.is_available():
        return None
    return torch.device("cuda", torch.cuda.current_device())


def _averaging(op: str, out: torch.Tensor, size: int) -> tuple[Any, Callable[[], None] | None]:
    """The c10d op to issue for `op` on `out`, and what to run on `out` once it completes.

    "avg" is native only on CUDA tensors (NCCL). On CPU (gloo) it is a sum followed by a
    division by the group size here: gloo's own AVG is recent and has had silent
    wrong-divisor bugs. Integer averages round toward zero.
    """
    if op != "avg" or out.is_cuda:
        return _reduce_op(op), None
    if out.is_floating_point() or out.is_complex():
        return dist.ReduceOp.SUM, lambda: out.div_(size)
    return dist.ReduceOp.SUM, lambda: out.div_(size, rounding_mode="trunc")


def all_reduce(t: torch.Tensor, group: Any = None, op: str = "sum", async_op: bool = False) -> Pending:
    """Reduce `t` in place over the group's ranks with `op` ("sum", "avg", "product", "min", "max").
    A host tensor over a group whose backend takes device tensors only (NCCL: a norm
    summed inside an optimizer that offload runs on the host) travels through a device
    copy, and the call completes before it returns."""
    _check_op(op, "all_reduce")
    size = _group_size(group)
    staging = _backend_device(group) if size > 1 else None
    if staging is not None and t.device != staging:
        on_device = t.to(staging)
        all_reduce(on_device, group=group, op=op)  # recorded there
        t.copy_(on_device)
        return _DONE
    if _recorders:
        _record("all_reduce", t, size, async_op, op)
    if size == 1:
        return _DONE
    reduce_op, then = _averaging(op, t, size)
    what = ("all_reduce", t, size)
    return _start(what, lambda: dist.all_reduce(t, op=reduce_op, group=group, async_op=True), async_op, then)


def summed(t: torch.Tensor, group: Any) -> torch.Tensor:
    """`t` summed over the group's ranks, as a new tensor, through torch's functional
    collectives: what `torch.compile` traces inside a compiled block without a graph
    break (c10d's async handles it cannot), for collectives between a block's own ops
    (tensor parallelism's)."""
    if _recorders:
        _record("all_reduce", t, _group_size(group), False, "sum")
    if _group_size(group) == 1:
        return t.clone()
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(t, "sum", group))


def gathered(t: torch.Tensor, group: Any) -> torch.Tensor:
    """Every rank's `t` stacked along a new first dim, through torch's functional
    collectives (traced by `torch.compile` as `summed` is)."""
    size = _group_size(group)
    if _recorders:
        _record("all_gather", t, size, False)
    if size == 1:
        return t.unsqueeze(0).clone()
    from torch.distributed import _functional_collectives as funcol

    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # renamed in torch 2.13
    flat = funcol.wait_tensor(gather(t.contiguous().reshape(-1), 0, group))
    return flat.view(size, *t.shape)


def summed_scattered(t: torch.Tensor, group: Any) -> torch.Tensor:
    """`t` summed over the group's ranks, this rank's 1/size of it along dim 0, through
    torch's functional collectives (traced by `torch.compile` as `summed` is)."""
    size = _group_size(group)
    if _recorders:
        _record("reduce_scatter", t, size, False, "sum")
    if size == 1:
        return t.clone()
    from torch.distributed import _functional_collectives as funcol

    scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor  # renamed in torch 2.13
    return funcol.wait_tensor(scatter(t.contiguous(), "sum", 0, group))


def done() -> Pending:
    """A collective that has already completed (what a handler that finished the work itself returns)."""
    return _DONE


class _StreamWork:
    """What `Pending` waits on for work issued on a side stream: an event on it."""

    def __init__(self, event: Any, device: torch.device):
        self._event, self._device = event, device

    def wait(self) -> None:
        torch.cuda.current_stream(self._device).wait_event(self._event)


_side_streams: dict[torch.device, Any] = {}


def on_side_stream(work: Callable[[], None], device: torch.device, what: str = "side stream") -> Pending:
    """Run `work` (kernels and collectives that depend on each other, such as a compressed
    exchange) on a side CUDA stream that first waits for the current one, so it
    overlaps what the current stream does next; the Pending's `wait()` makes the
    current stream wait for it. Off CUDA, `work` runs here and the Pending is done.

    [Note: what the side stream reads] Tensors `work` allocates belong to the side
    stream. A tensor made on the current stream that `work` reads must outlive the
    wait, held by the caller (the state, a bucket): the caching allocator hands a freed
    block to the current stream's next allocation at once, and the current stream's
    kernels then write it while the side stream may not have read it yet. A temporary
    made just to pass in (a product of loss scales, say) is made inside `work` instead:
    one passed in, freed when `work` returned, was overwritten by backward's next
    kernels, and 1-bit Adam's exchange read a wrong scale on 6-10 of 18 steps on two
    H200s (non-finite grads, skipped steps), where host syncs inside it hid it."""
    if device.type != "cuda":
        work()
        return _DONE
    side = _side_streams.get(device)
    if side is None:
        side = _side_streams[device] = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        work()
        event = torch.cuda.Event()
        event.record(side)
    return Pending(_StreamWork(event, device), (what, None, 1))


def all_to_all_single(out: torch.Tensor, inp: torch.Tensor, group: Any = None, async_op: bool = False) -> Pending:
    """Row r of `inp` (its first dimension cut in `size` equal parts) goes to rank r; row
    i of `out` comes from rank i."""
    size = _group_size(group)
    if _recorders:
        _record("all_to_all", inp, size, async_op)
    if size == 1:
        if out.data_ptr() != inp.data_ptr():
            out.copy_(inp)
        return _DONE
    what = ("all_to_all", inp, size)
    return _start(what, lambda: dist.all_to_all_single(out, inp, group=group, async_op=True), async_op)


def all_gather_into_tensor(out: torch.Tensor, inp: torch.Tensor, group: Any = None, async_op: bool = False) -> Pending:
    """Gather every rank's `inp` into `out` (their concatenation, or a stack, in rank order)."""
    size = _group_size(group)
    if _recorders:
        _record("all_gather", inp, size, async_op)
    if size == 1:
        if out.data_ptr() != inp.data_ptr():
            out.copy_(inp.reshape(out.shape))
        return _DONE
    what = ("all_gather", inp, size)
    return _start(what, lambda: _all_gather_single(out, inp, group=group, async_op=True), async_op)


def reduce_scatter_tensor(
    out: torch.Tensor, inp: torch.Tensor, group: Any = None, op: str = "sum", async_op: bool = False
) -> Pending:
    """Reduce `inp` over the group's ranks and keep this rank's 1/size of it in `out`."""
    _check_op(op, "reduce_scatter_tensor")
    size = _group_size(group)
    if _recorders:
        _record("reduce_scatter", inp, size, async_op, op)
    if size == 1:
        if out.data_ptr() != inp.data_ptr():
            out.copy_(inp.reshape(out.shape))
        return _DONE
    reduce_op, then = _averaging(op, out, size)
    what = ("reduce_scatter", inp, size)
    issue = lambda: _reduce_scatter_single(out, inp, op=reduce_op, group=group, async_op=True)  # noqa: E731
    return _start(what, issue, async_op, then)


def broadcast(t: torch.Tensor, src: int, group: Any = None) -> None:
    """Overwrite `t` on every rank of the group with global rank `src`'s `t`."""
    size = _group_size(group)
    if _recorders:
        _record("broadcast", t, size, False)
    if size == 1:
        return
    what = (f"broadcast from rank {src}", t, size)
    # NCCL moves only CUDA tensors; a CPU leaf (TrainState.step, say) goes via the GPU.
    device = _backend_device(group)
    staged = t.to(device) if device is not None and t.device.type == "cpu" else t
    _start(what, lambda: dist.broadcast(staged, src=src, group=group, async_op=True), async_op=False)
    if staged is not t:
        t.copy_(staged)


def barrier(group: Any = None) -> None:
    """Return once every rank of the group has called `barrier`."""
    size = _group_size(group)
    if _recorders:
        _record("barrier", None, size, False)
    if size == 1:
        return
    _start(("barrier", None, size), lambda: dist.barrier(group=group, async_op=True), async_op=False)


class _Works:
    """Several works waited as one."""

    __slots__ = ("works",)

    def __init__(self, works: list[Any]):
        self.works = works

    def wait(self) -> None:
        for work in self.works:
            work.wait()


def exchange(ops: Sequence[tuple[str, torch.Tensor, int]], group: Any = None) -> Pending:
    """Post ("send" | "recv", tensor, global rank) point-to-point operations together,
    as one group, and return them as one Pending (keep sent tensors alive until waited).

    [Note: one path for point to point] Every send and receive goes through here, as a
    `batch_isend_irecv` group, even a lone one. Grouped, a rank's sends and receives
    progress side by side, so a large send never holds up a receive queued behind it
    (NCCL runs one pair's operations on one stream, in order). And one path means one
    communicator: torch runs a grouped operation on the group's communicator but a lone
    isend/irecv on a separate two-rank one, and a send posted on one never matches a
    receive posted on the other (a hang, over NCCL only). Messages between two ranks
    are matched in the order they were posted (NCCL's rule; gloo is given one tag so
    that it behaves the same and CPU tests catch misorders). NCCL creates a group's
    communicator collectively and opens each direction of a pair's link on first use,
    in a handshake that can block the host: exchange once in every direction a
    schedule will use, with every rank of the group, before relying on the host never
    blocking (the pipeline's `_connect`)."""
    p2p = []
    for kind, t, peer in ops:
        if _recorders:
            _record(kind, t, 2, True)
        p2p.append(dist.P2POp(dist.isend if kind == "send" else dist.irecv, t, peer, group=group, tag=0))
    peers = sorted({peer for _, _, peer in ops})
    what = (f"{len(ops)} sends/receives with ranks {peers}", ops[0][1], 2)
    return _start(what, lambda: _Works(dist.batch_isend_irecv(p2p)), async_op=True)


def broadcast_object(obj: Any, src: int, group: Any = None) -> Any:
    """Global rank `src`'s `obj` (picklable; small) on every rank of the group.

    Only for values this program made on another rank (a pytree's structure, say):
    it unpickles, so never point it at data from outside."""
    if _group_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's `obj` (picklable; small), in group rank order. Same caveat as
    `broadcast_object`: only for values this program made."""
    size = _group_size(group)
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj, group=group)
    return out
