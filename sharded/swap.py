"""`SwapStore`: named host tensors kept in one file per rank on local disk, the tier
under `offload(tier="nvme")` (ZeRO-Infinity's NVMe swap).

    with SwapStore(path, {"exp_avg": (n, torch.float32)}, rank=rank) as store:
        store.write("exp_avg", host_tensor).wait()   # host -> disk
        store.read("exp_avg", host_tensor).wait()    # disk -> host, the same bytes

The layout is fixed up front: each slot starts at a 4096-aligned offset of the file
`{path}/sharded-swap-rank{rank}.bin`, which is allocated whole when the store opens, so
a full disk is an error at the start rather than in the middle of a run. Transfers are
cut into chunks run by a pool of threads with `os.preadv`/`os.pwritev` (which release
the GIL), so several transfers, on different slots, can be in flight at once; the
caller overlaps them with compute (double-buffering is the caller's job). The file is
opened with O_DIRECT where its filesystem allows it, so the page cache neither holds a
second copy of the state nor hides the disk's real bandwidth.

`disk_bandwidth` measures a directory's sequential write and read bandwidth with this
same machinery, for benchmarks to compare against.
"""
from __future__ import annotations

import atexit
import collections
import concurrent.futures
import contextlib
import dataclasses
import enum
import errno
import os
import queue
import shutil
import threading
import time
import warnings
import weakref
from typing import NamedTuple

import numpy
import torch

__all__ = [
    "ALIGN",
    "IOMode",
    "Direction",
    "Traffic",
    "SwapStats",
    "Transfer",
    "SwapStore",
    "aligned_empty",
    "probe_direct",
    "Bandwidth",
    "disk_bandwidth",
]

#: O_DIRECT's alignment for buffer addresses, file offsets and lengths (bytes).
ALIGN = 4096
#: The most bytes one `preadv`/`pwritev` call moves; a transfer is cut into such chunks.
CHUNK_BYTES = 16 * 2**20
#: Host memory offload's nvme tier stages a swapped state through by default (its two buffer sets together).
DEFAULT_HOST_BUFFER_GB = 2.0


class IOMode(enum.Enum):
    """How the store's file is opened."""

    DIRECT = "direct"  # O_DIRECT: disk <-> our buffers, no page cache
    BUFFERED = "buffered"  # through the page cache (filesystems without O_DIRECT)


class Direction(enum.Enum):
    READ = "read"  # disk -> host
    WRITE = "write"  # host -> disk


class _SlotState(enum.Enum):
    """[Note: slot states] A slot is EMPTY until a write of it completes (then HELD);
    while a transfer of it is in flight it is BUSY, and a second transfer of the same
    slot is refused until the first completes. A write that fails leaves it EMPTY, so
    a later read of half-written bytes is an error, not garbage. A failed read leaves
    it HELD: the file still holds the last write."""

    EMPTY = "empty"
    BUSY = "busy"
    HELD = "held"


@dataclasses.dataclass(frozen=True)
class _Slot:
    offset: int  # in the file; a multiple of ALIGN
    numel: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Bytes moved in one direction and the seconds during which at least one transfer in
    that direction was in flight (so overlapping transfers are not counted twice)."""

    bytes: int = 0
    seconds: float = 0.0

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(self.bytes - other.bytes, self.seconds - other.seconds)


@dataclasses.dataclass(frozen=True)
class SwapStats:
    """A snapshot of a store's counters; `after - before` gives one step's traffic."""

    read: Traffic = Traffic()
    write: Traffic = Traffic()

    def __sub__(self, other: SwapStats) -> SwapStats:
        return SwapStats(self.read - other.read, self.write - other.write)


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def aligned_empty(numel: int, dtype: torch.dtype = torch.uint8, *, pin: bool | None = None) -> torch.Tensor:
    """An uninitialised 1-D CPU tensor whose first byte is ALIGN-aligned, so O_DIRECT can
    move it without a staging copy. Pinned (for fast copies to the GPU) when `pin`, which
    defaults to whether CUDA is available. It over-allocates by ALIGN bytes and slices."""
    pin = torch.cuda.is_available() if pin is None else pin
    nbytes = numel * dtype.itemsize
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    shift = -raw.data_ptr() % ALIGN
    return raw[shift : shift + nbytes].view(dtype)


def probe_direct(path: str | os.PathLike) -> bool:
    """Whether the filesystem of directory `path` accepts O_DIRECT: opens a probe file
    with it and writes one aligned block (tmpfs before Linux 6.6 refuses with EINVAL)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = os.path.join(path, f".sharded-swap-probe-{os.getpid()}-{threading.get_ident()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    try:
        os.pwritev(fd, [aligned_empty(ALIGN, pin=False).numpy()], 0)
        return True
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    finally:
        os.close(fd)
        os.unlink(probe)


class _ShortTransfer(Exception):
    pass


class Transfer:
    """One `read` or `write` in flight: `wait()` blocks until all of its chunks are done
    and raises a RuntimeError naming the file, the slot and the OS's error if any failed."""

    def __init__(self, store: SwapStore, name: str, direction: Direction, tensor: torch.Tensor, pieces: int):
        self._store, self.name, self.direction = store, name, direction
        self._tensor = tensor  # kept alive until the chunks are done
        self._remaining = pieces
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise self._describe(self._error) from self._error

    def _piece_done(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._error = self._error or future.exception()
            self._remaining -= 1
            last = self._remaining == 0
        if last:
            self._finish()

    def _finish(self) -> None:
        self._tensor = None
        self._store._finished(self, ok=self._error is None)
        self._done.set()

    def _describe(self, exc: BaseException) -> RuntimeError:
        if isinstance(exc, OSError) and exc.errno is not None:
            detail = f"[{errno.errorcode.get(exc.errno, exc.errno)}] {exc.strerror}"
        else:
            detail = str(exc) or type(exc).__name__
        after = (
            "the slot holds no data until it is written again"
            if self.direction is Direction.WRITE
            else "the destination tensor holds partial data"
        )
        return RuntimeError(
            f"swap {self.direction.value} of slot {self.name!r} in {self._store.file} failed: {detail}; {after}"
        )


class SwapStore:
    """Named slots of a fixed layout in one preallocated file per rank under `path`.

    `slots` maps each name to (numel, dtype). `direct=None` uses O_DIRECT when the
    filesystem accepts it and otherwise falls back to buffered I/O with a warning;
    `direct=True` requires it, `direct=False` never uses it. `mode` says which it runs
    in. `close()` (or leaving the `with` block) waits for transfers in flight, closes
    the file and deletes it (and its directory, with `owns_directory`). A store left to
    the garbage collector is closed the same way when the next store opens or closes, or
    at exit ([Note: closing from a finalizer]).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        slots: dict[str, tuple[int, torch.dtype]],
        *,
        rank: int = 0,
        threads: int = 4,
        direct: bool | None = None,
        owns_directory: bool = False,
    ):
        close_retired()  # a dead store's file at this path and rank is gone before this one opens
        path = os.fspath(path)
        self.file = os.path.join(path, f"sharded-swap-rank{rank}.bin")
        self._slots: dict[str, _Slot] = {}
        end = 0
        for name, (numel, dtype) in slots.items():
            if not isinstance(dtype, torch.dtype) or int(numel) != numel or numel < 0:
                raise ValueError(f"slot {name!r}: expected (numel >= 0, torch.dtype), got ({numel!r}, {dtype!r})")
            self._slots[name] = _Slot(end, int(numel), dtype)
            end += _round_up(self._slots[name].nbytes)
        self.size = end  # bytes of the file

        _check_directory(path, self.size)
        self.mode = _choose_mode(path, direct)

        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        if self.mode is IOMode.DIRECT:
            flags |= os.O_DIRECT
        try:
            self._fd = os.open(self.file, flags, 0o600)
        except FileExistsError:
            raise ValueError(
                f"{self.file} exists: another store of rank {rank} uses it, or an earlier run left it; "
                f"delete it or pass another path or rank"
            ) from None
        try:
            if self.size:
                _allocate(self._fd, self.size)
        except OSError as exc:
            os.close(self._fd)
            os.unlink(self.file)
            raise ValueError(
                f"could not allocate {self.size} bytes for {self.file}: {exc.strerror}; free disk space under {path}"
            ) from exc

        self._state = {name: _SlotState.EMPTY for name in self._slots}
        self._lock = threading.Lock()
        self._closed = False
        self._in_flight = {d: 0 for d in Direction}
        self._since = {d: 0.0 for d in Direction}
        self._traffic = {d: Traffic() for d in Direction}
        # [Note: O_DIRECT alignment] O_DIRECT needs the buffer address, the file offset
        # and the length all multiples of ALIGN. Slot offsets are, and so are chunk
        # starts. A caller's tensor that starts unaligned, or the last partial block of
        # one that ends unaligned, goes through one of these staging buffers instead:
        # one per thread, so a worker never waits for one.
        self._chunk = CHUNK_BYTES
        self._staging: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        self._stage_bytes = 0
        if self.mode is IOMode.DIRECT:
            largest = max((s.nbytes for s in self._slots.values()), default=0)
            self._stage_bytes = min(self._chunk, _round_up(largest))
            for _ in range(threads):
                self._staging.put(aligned_empty(self._stage_bytes, pin=False))
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="sharded-swap")
        # [Note: closing from a finalizer]
        self._cleanup = weakref.finalize(self, _retire, _Retired(self._pool, self._fd, self.file, owns_directory))

    def write(self, name: str, src: torch.Tensor) -> Transfer:
        """Start copying `src` (a contiguous CPU tensor of the slot's numel and dtype) to
        slot `name`. Do not change `src` until `wait()` returns."""
        return self._start(name, src, Direction.WRITE)

    def read(self, name: str, dst: torch.Tensor) -> Transfer:
        """Start copying slot `name` into `dst` (a contiguous CPU tensor of the slot's numel
        and dtype); its values are valid once `wait()` returns."""
        return self._start(name, dst, Direction.READ)

    def mapped(self, *names: str) -> torch.Tensor:
        """Slots `names` as one CPU tensor mapped from the file (its pages read from disk
        when touched, not held in memory): how a state holds what lives on disk, so that
        checkpoints, `gather` and a user's reads see its values. Several slots must be
        adjacent in the file and of one dtype (each but the last a whole number of ALIGN
        bytes): the pieces of one tensor. The kernel keeps the mapping coherent with this
        store's reads and writes (a direct read first writes back pages changed through
        the mapping). Call it only while no transfer of these slots is in flight."""
        slots = [self._slots[n] for n in names]
        for (a, x), (b, y) in zip(zip(names, slots), zip(names[1:], slots[1:])):
            if y.offset != x.offset + x.nbytes or y.dtype != x.dtype:
                raise ValueError(f"slots {a!r} and {b!r} are not adjacent pieces of one tensor in {self.file}")
        nbytes = sum(s.nbytes for s in slots)
        if not nbytes:
            return torch.empty(0, dtype=slots[0].dtype)
        pages = numpy.memmap(self.file, dtype=numpy.uint8, mode="r+", offset=slots[0].offset, shape=(nbytes,))
        return torch.from_numpy(pages).view(slots[0].dtype)

    def stats(self) -> SwapStats:
        """Bytes moved and seconds spent per direction since the store opened (transfers
        still in flight are counted once they complete)."""
        with self._lock:
            return SwapStats(self._traffic[Direction.READ], self._traffic[Direction.WRITE])

    def close(self) -> None:
        """Wait for transfers in flight, close the file and delete it. Idempotent."""
        with self._lock:
            self._closed = True
        self._cleanup()
        close_retired()

    def __enter__(self) -> SwapStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self, name: str, tensor: torch.Tensor, direction: Direction) -> Transfer:
        slot = self._slots.get(name)
        if slot is None:
            raise KeyError(f"no slot {name!r} in {self.file}; slots: {sorted(self._slots)}")
        if tensor.device.type != "cpu":
            raise ValueError(f"slot {name!r}: {direction.value} needs a CPU tensor, got one on {tensor.device}")
        if not tensor.is_contiguous():
            raise ValueError(f"slot {name!r}: {direction.value} needs a contiguous tensor; pass a contiguous one "
                             f"(for a write, `t.contiguous()`)")
        if tensor.numel() != slot.numel or tensor.dtype != slot.dtype:
            raise ValueError(f"slot {name!r} holds {slot.numel} x {slot.dtype}, got a tensor of "
                             f"{tensor.numel()} x {tensor.dtype}")
        with self._lock:
            if self._closed:
                raise ValueError(f"{self.file} is closed")
            state = self._state[name]
            if state is _SlotState.BUSY:
                raise ValueError(f"slot {name!r} has a transfer in flight; wait() for it first")
            if direction is Direction.READ and state is _SlotState.EMPTY:
                raise ValueError(f"slot {name!r} holds no data: it was never written, or its last write failed")
            self._state[name] = _SlotState.BUSY
            if self._in_flight[direction] == 0:
                self._since[direction] = time.perf_counter()
            self._in_flight[direction] += 1

        data = tensor.detach().reshape(-1).view(torch.uint8).numpy()  # zero-copy
        pieces = self._pieces(slot, tensor.data_ptr())
        transfer = Transfer(self, name, direction, tensor, len(pieces))
        if not pieces:
            transfer._finish()
        for start, stop, staged in pieces:
            future = self._pool.submit(self._move, direction, data, slot.offset + start, start, stop, staged)
            future.add_done_callback(transfer._piece_done)
        return transfer

    def _pieces(self, slot: _Slot, address: int) -> list[tuple[int, int, bool]]:
        """(start, stop, staged): byte ranges of the caller's tensor, one I/O call each.
        See [Note: O_DIRECT alignment]: the aligned body goes directly, the rest staged."""
        n = slot.nbytes
        if self.mode is IOMode.BUFFERED:
            body = n
        else:
            body = n // ALIGN * ALIGN if address % ALIGN == 0 else 0
        direct = [(s, min(s + self._chunk, body), False) for s in range(0, body, self._chunk)]
        return direct + [(s, min(s + self._stage_bytes, n), True) for s in range(body, n, self._stage_bytes or 1)]

    def _move(self, direction: Direction, data, offset: int, start: int, stop: int, staged: bool) -> None:
        """One chunk (runs on the pool). A short transfer is an error, never a partial slot."""
        if not staged:
            buf, expected = data[start:stop], stop - start
            n = self._io(direction, buf, offset)
        else:
            stage = self._staging.get()
            try:
                length = stop - start
                expected = _round_up(length)
                buf = stage[:expected].numpy()
                if direction is Direction.WRITE:
                    buf[:length] = data[start:stop]
                n = self._io(direction, buf, offset)
                if direction is Direction.READ and n == expected:
                    data[start:stop] = buf[:length]
            finally:
                self._staging.put(stage)
        if n != expected:
            raise _ShortTransfer(f"short {direction.value}: {n} of {expected} bytes at offset {offset}")

    def _io(self, direction: Direction, buf, offset: int) -> int:
        if direction is Direction.WRITE:
            return os.pwritev(self._fd, [buf], offset)
        return os.preadv(self._fd, [buf], offset)

    def _finished(self, transfer: Transfer, ok: bool) -> None:
        d = transfer.direction
        with self._lock:
            if ok:
                self._state[transfer.name] = _SlotState.HELD
                moved = self._slots[transfer.name].nbytes
            else:
                self._state[transfer.name] = _SlotState.EMPTY if d is Direction.WRITE else _SlotState.HELD
                moved = 0
            self._in_flight[d] -= 1
            seconds = time.perf_counter() - self._since[d] if self._in_flight[d] == 0 else 0.0
            t = self._traffic[d]
            self._traffic[d] = Traffic(t.bytes + moved, t.seconds + seconds)


def _check_directory(path: str, nbytes: int) -> None:
    """The errors a user can fix, before anything is written."""
    if not os.path.exists(path):
        raise ValueError(f"swap directory {path} does not exist; create it (on a local NVMe disk) first")
    if not os.path.isdir(path):
        raise ValueError(f"swap path {path} is not a directory; pass the directory to hold the swap files")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"swap directory {path} is not writable by this process; chmod it or pass another")
    free = shutil.disk_usage(path).free
    if nbytes > free:
        raise ValueError(
            f"swap directory {path} has {free} bytes free, the swap file needs {nbytes}; "
            f"free {nbytes - free} bytes or pass a directory on a larger disk"
        )


def _choose_mode(path: str, direct: bool | None) -> IOMode:
    if direct is False:
        return IOMode.BUFFERED
    if probe_direct(path):
        return IOMode.DIRECT
    if direct:
        raise ValueError(
            f"the filesystem of {path} does not accept O_DIRECT (tmpfs before Linux 6.6 does not); "
            f"pass a directory on a local disk, or direct=None to fall back to buffered I/O"
        )
    warnings.warn(
        f"the filesystem of {path} does not accept O_DIRECT; the swap store uses buffered I/O "
        f"through the page cache (pass direct=False to choose it without this warning)",
        stacklevel=3,
    )
    return IOMode.BUFFERED


def _allocate(fd: int, nbytes: int) -> None:
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, nbytes)
    else:
        os.ftruncate(fd, nbytes)


# [Note: closing from a finalizer] A store left to the garbage collector is closed by its
# finalizer, which runs wherever a collection happens: in any thread, even inside
# threading's bootstrap of a new thread, while that thread holds the lock that joining a
# thread takes. Joining the store's workers there deadlocks: a rank in CI hung starting
# a swap worker, because a collection inside that worker's bootstrap joined the workers
# of an earlier, dead store. So the finalizer only queues what to close. The queue is
# closed (workers joined, file closed and deleted) at safe points: when a store opens or
# is closed, and at exit.
class _Retired(NamedTuple):
    pool: concurrent.futures.ThreadPoolExecutor
    fd: int
    file: str
    owns_directory: bool  # the store's directory was made for it: remove it too


_retired: collections.deque[_Retired] = collections.deque()
_exiting = False


def _retire(store: _Retired) -> None:
    """A store's finalizer: queue it, or close it at once once the interpreter exits."""
    if _exiting:
        _close(store)
    else:
        _retired.append(store)  # no lock: a collection may interrupt this thread anywhere


def close_retired() -> None:
    """Close the stores that finalizers queued ([Note: closing from a finalizer])."""
    while _retired:
        _close(_retired.popleft())


@atexit.register
def _close_at_exit() -> None:
    global _exiting
    _exiting = True
    close_retired()


def _close(store: _Retired) -> None:
    store.pool.shutdown(wait=True)
    os.close(store.fd)
    with contextlib.suppress(FileNotFoundError):  # its directory may be gone first (a temporary one, at exit)
        os.unlink(store.file)
    if store.owns_directory:
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(store.file))


@dataclasses.dataclass(frozen=True)
class Bandwidth:
    write_gbps: float
    read_gbps: float
    mode: IOMode

    def __str__(self) -> str:
        return f"write {self.write_gbps:.2f} GB/s, read {self.read_gbps:.2f} GB/s ({self.mode.value})"


def disk_bandwidth(
    path: str | os.PathLike,
    nbytes: int = 512 * 2**20,
    *,
    rank: int = 0,
    threads: int = 4,
    direct: bool | None = None,
) -> Bandwidth:
    """Sequential write then read bandwidth (GB/s) of `nbytes` through a `SwapStore` in
    `path`. The write includes an fsync; in buffered mode the file's pages are dropped
    from the page cache before the read, so both measure the disk, not memory."""
    src = aligned_empty(nbytes, pin=False).random_(0, 256)
    dst = aligned_empty(nbytes, pin=False)
    with SwapStore(path, {"bench": (nbytes, torch.uint8)}, rank=rank, threads=threads, direct=direct) as store:
        t0 = time.perf_counter()
        store.write("bench", src).wait()
        os.fsync(store._fd)
        t1 = time.perf_counter()
        if store.mode is IOMode.BUFFERED and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(store._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t2 = time.perf_counter()
        store.read("bench", dst).wait()
        t3 = time.perf_counter()
        if not torch.equal(src, dst):
            raise RuntimeError(f"disk_bandwidth: the bytes read back from {store.file} differ from those written")
        return Bandwidth(nbytes / (t1 - t0) / 1e9, nbytes / (t3 - t2) / 1e9, store.mode)
