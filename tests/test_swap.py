"""`sharded.swap`: slots roundtrip bit for bit in both I/O modes, aligned or not, several at
once; each error a user can fix is a clear ValueError before anything is written, and a
failure mid-run is a RuntimeError from `wait()` naming the slot."""
from __future__ import annotations

import errno
import gc
import os
import threading
import time
import types

import pytest
import torch

from sharded import swap
from sharded.swap import ALIGN, IOMode, SwapStore, aligned_empty

DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.int64]
SIZES = [1, 1000, 4097]


@pytest.fixture(params=[IOMode.DIRECT, IOMode.BUFFERED], ids=lambda m: m.value)
def mode(request, tmp_path):
    if request.param is IOMode.DIRECT and not swap.probe_direct(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} does not accept O_DIRECT")
    return request.param


def _open(tmp_path, slots, mode=IOMode.BUFFERED, **kwargs) -> SwapStore:
    return SwapStore(tmp_path, slots, direct=mode is IOMode.DIRECT, **kwargs)


def _random(numel: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(numel, generator=g).to(dtype)
    return torch.randint(-(2**62), 2**62, (numel,), generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roundtrip(tmp_path, mode, dtype):
    slots = {f"s{n}": (n, dtype) for n in SIZES}
    with _open(tmp_path, slots, mode) as store:
        assert store.mode is mode
        srcs = {}
        for i, n in enumerate(SIZES):
            srcs[f"s{n}"] = aligned_empty(n, dtype, pin=False).copy_(_random(n, dtype, seed=i))
        for handle in [store.write(name, src) for name, src in srcs.items()]:
            handle.wait()
        for name, src in srcs.items():
            dst = aligned_empty(src.numel(), dtype, pin=False).zero_()
            store.read(name, dst).wait()
            assert torch.equal(dst, src), name


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "odd-offset"])
def test_unaligned_tensors_and_many_chunks(tmp_path, mode, monkeypatch, offset):
    monkeypatch.setattr(swap, "CHUNK_BYTES", 2 * ALIGN)  # 4097 float64s: 5 chunks
    n = 4097
    base = aligned_empty(n + 8, torch.float64, pin=False)
    src = base[offset : offset + n].copy_(_random(n, torch.float64))
    with _open(tmp_path, {"x": (n, torch.float64)}, mode) as store:
        store.write("x", src).wait()
        out = aligned_empty(n + 8, torch.float64, pin=False).fill_(-7.0)
        dst = out[3 : 3 + n]  # unaligned, and the neighbours must stay untouched
        store.read("x", dst).wait()
    assert torch.equal(dst, src)
    assert torch.all(out[:3] == -7.0) and torch.all(out[3 + n :] == -7.0)


def test_concurrent_transfers_of_different_slots(tmp_path, mode, monkeypatch):
    monkeypatch.setattr(swap, "CHUNK_BYTES", ALIGN)
    real = {"pwritev": os.pwritev, "preadv": os.preadv}
    lock, busy, peak = threading.Lock(), [0], [0]

    def tracked(name):
        def call(*args):
            with lock:
                busy[0] += 1
                peak[0] = max(peak[0], busy[0])
            time.sleep(0.002)
            try:
                return real[name](*args)
            finally:
                with lock:
                    busy[0] -= 1
        return call

    n = 3000
    srcs = {f"s{i}": _random(n, torch.float32, seed=i) for i in range(8)}
    with _open(tmp_path, {k: (n, torch.float32) for k in srcs}, mode, threads=4) as store:
        for h in [store.write(f"s{i}", srcs[f"s{i}"]) for i in range(4)]:
            h.wait()
        monkeypatch.setattr(swap.os, "pwritev", tracked("pwritev"))
        monkeypatch.setattr(swap.os, "preadv", tracked("preadv"))
        dsts = {k: torch.zeros(n) for k in srcs}
        handles = [store.read(f"s{i}", dsts[f"s{i}"]) for i in range(4)]
        handles += [store.write(f"s{i}", srcs[f"s{i}"]) for i in range(4, 8)]
        for h in handles:
            h.wait()
        for h in [store.read(f"s{i}", dsts[f"s{i}"]) for i in range(4, 8)]:
            h.wait()
    assert peak[0] >= 2, "no two chunks were ever in flight together"
    for k in srcs:
        assert torch.equal(dsts[k], srcs[k]), k


def test_slot_states(tmp_path, monkeypatch):
    gate = threading.Event()
    real = os.pwritev
    with _open(tmp_path, {"a": (10, torch.float32), "b": (10, torch.float32)}) as store:
        with pytest.raises(ValueError, match="'a' holds no data: it was never written"):
            store.read("a", torch.zeros(10))
        monkeypatch.setattr(swap.os, "pwritev", lambda *a: gate.wait(10) and real(*a))
        try:
            handle = store.write("a", torch.ones(10))
            with pytest.raises(ValueError, match="'a' has a transfer in flight"):
                store.write("a", torch.ones(10))
            other = store.write("b", torch.ones(10))  # another slot is free to go
        finally:
            gate.set()
        handle.wait()
        other.wait()
        dst = torch.zeros(10)
        store.read("a", dst).wait()
    assert torch.equal(dst, torch.ones(10))


def test_wrong_tensors(tmp_path):
    with _open(tmp_path, {"a": (12, torch.float32)}) as store:
        with pytest.raises(ValueError, match=r"'a' holds 12 x torch.float32, got a tensor of 12 x torch.float64"):
            store.write("a", torch.zeros(12, dtype=torch.float64))
        with pytest.raises(ValueError, match="holds 12 x torch.float32, got a tensor of 11 x"):
            store.write("a", torch.zeros(11))
        with pytest.raises(ValueError, match="needs a contiguous tensor"):
            store.read("a", torch.zeros(3, 4).t())
        with pytest.raises(KeyError, match="no slot 'b'"):
            store.write("b", torch.zeros(12))
        store.write("a", torch.zeros(3, 4)).wait()  # any shape of the slot's numel


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match=r"swap directory .*nope does not exist; create it"):
        SwapStore(tmp_path / "nope", {"a": (1, torch.float32)})


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match=r"swap path .*f is not a directory"):
        SwapStore(tmp_path / "f", {"a": (1, torch.float32)})


def test_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("this user (root?) can write a 0o500 directory")
        with pytest.raises(ValueError, match=r"swap directory .*ro is not writable"):
            SwapStore(ro, {"a": (1, torch.float32)})
    finally:
        ro.chmod(0o700)


def test_not_enough_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(swap.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=100))
    with pytest.raises(ValueError, match=r"has 100 bytes free, the swap file needs 8192; free 8092 bytes"):
        SwapStore(tmp_path, {"a": (1, torch.float32), "b": (1000, torch.float32)})
    assert os.listdir(tmp_path) == []


def test_existing_file_is_not_clobbered(tmp_path):
    with SwapStore(tmp_path, {"a": (1, torch.float32)}, rank=3):
        with pytest.raises(ValueError, match="sharded-swap-rank3.bin exists"):
            SwapStore(tmp_path, {"a": (1, torch.float32)}, rank=3)


def test_enospc_mid_run(tmp_path, mode, monkeypatch):
    monkeypatch.setattr(swap, "CHUNK_BYTES", ALIGN)
    real, calls = os.pwritev, [0]

    def pwritev(*args):  # the third chunk finds the disk full
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)

    with _open(tmp_path, {"m": (4 * 1024, torch.float32)}, mode) as store:
        monkeypatch.setattr(swap.os, "pwritev", pwritev)
        handle = store.write("m", torch.ones(4 * 1024))
        with pytest.raises(RuntimeError, match=r"swap write of slot 'm' in .*sharded-swap-rank0.bin failed: \[ENOSPC\]"):
            handle.wait()
        with pytest.raises(ValueError, match="its last write failed"):
            store.read("m", torch.zeros(4 * 1024))
        assert store.stats().write.bytes == 0


def test_short_write(tmp_path, monkeypatch):
    with _open(tmp_path, {"m": (100, torch.float32)}) as store:
        monkeypatch.setattr(swap.os, "pwritev", lambda fd, bufs, off: 1)
        with pytest.raises(RuntimeError, match=r"slot 'm' .*short write: 1 of 400 bytes"):
            store.write("m", torch.ones(100)).wait()


def test_short_read(tmp_path, monkeypatch):
    with _open(tmp_path, {"m": (100, torch.float32)}) as store:
        store.write("m", torch.ones(100)).wait()
        monkeypatch.setattr(swap.os, "preadv", lambda fd, bufs, off: 0)
        with pytest.raises(RuntimeError, match=r"swap read of slot 'm' .*short read: 0 of 400 bytes"):
            store.read("m", torch.zeros(100)).wait()


def test_without_o_direct(tmp_path, monkeypatch):
    monkeypatch.setattr(swap, "probe_direct", lambda path: False)
    with pytest.raises(ValueError, match="does not accept O_DIRECT.*direct=None to fall back"):
        SwapStore(tmp_path, {"a": (1, torch.float32)}, direct=True)
    with pytest.warns(UserWarning, match="uses buffered I/O"):
        store = SwapStore(tmp_path, {"a": (1, torch.float32)})
    with store:
        assert store.mode is IOMode.BUFFERED


def test_probe_says_no_on_einval(tmp_path, monkeypatch):
    real = os.open

    def open_(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(path, flags, *args)

    monkeypatch.setattr(swap.os, "open", open_)
    assert swap.probe_direct(tmp_path) is False
    assert os.listdir(tmp_path) == []


def test_close_removes_file(tmp_path):
    store = SwapStore(tmp_path, {"a": (5, torch.float32)}, rank=2)
    store.write("a", torch.ones(5)).wait()
    assert os.listdir(tmp_path) == ["sharded-swap-rank2.bin"]
    assert os.path.getsize(store.file) == ALIGN  # preallocated, one aligned block
    store.close()
    store.close()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="is closed"):
        store.write("a", torch.ones(5))


def test_a_collected_store_closes_at_the_next_safe_point_not_in_the_collector(tmp_path):
    """[Note: closing from a finalizer]: the collector only queues a dead store (joining
    its workers there can deadlock a thread's start); the next store to open closes it
    and deletes its file, so a store at the same path and rank opens."""
    store = SwapStore(tmp_path, {"a": (5, torch.float32)}, rank=2)
    store.write("a", torch.ones(5)).wait()
    del store
    gc.collect()
    assert os.listdir(tmp_path) == ["sharded-swap-rank2.bin"]  # queued, not closed inside the collector
    with SwapStore(tmp_path, {"a": (5, torch.float32)}, rank=2) as again:
        again.write("a", torch.ones(5)).wait()
    assert os.listdir(tmp_path) == []


def test_a_store_that_owns_its_directory_removes_it(tmp_path):
    directory = tmp_path / "made-for-it"
    directory.mkdir()
    SwapStore(directory, {"a": (5, torch.float32)}, owns_directory=True).close()
    assert os.listdir(tmp_path) == []


def test_stats(tmp_path):
    with _open(tmp_path, {"a": (1000, torch.float32), "b": (10, torch.int64)}) as store:
        before = store.stats()
        store.write("a", torch.ones(1000)).wait()
        store.write("b", torch.ones(10, dtype=torch.int64)).wait()
        store.read("a", torch.zeros(1000)).wait()
        step = store.stats() - before
    assert step.write.bytes == 4080 and step.read.bytes == 4000
    assert step.write.seconds > 0 and step.read.seconds > 0 and step.read.gbps > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_aligned_empty(dtype):
    for n in SIZES:
        t = aligned_empty(n, dtype, pin=False)
        assert t.data_ptr() % ALIGN == 0 and t.numel() == n and t.dtype == dtype


def test_disk_bandwidth(tmp_path):
    bw = swap.disk_bandwidth(tmp_path, 2**20, direct=False)
    assert bw.mode is IOMode.BUFFERED and bw.write_gbps > 0 and bw.read_gbps > 0
    assert os.listdir(tmp_path) == []


def test_mapped_slots_show_what_the_store_wrote_and_write_through(tmp_path):
    """A state holds its disk-tier leaves as `mapped` views: they read what the store
    wrote (O_DIRECT or not), and a write through them is what the store reads next."""
    with SwapStore(tmp_path, {"a": (5000, torch.float32), "b": (3, torch.bfloat16), "empty": (0, torch.float32)}) as store:
        a = torch.randn(5000)
        store.write("a", a).wait()
        view = store.mapped("a")
        assert torch.equal(view, a)
        b = torch.randn(5000)
        store.write("a", b).wait()
        assert torch.equal(view, b)  # the same pages, refreshed by the store's write
        view.add_(1)
        back = torch.empty(5000)
        store.read("a", back).wait()
        assert torch.equal(back, b + 1)
        store.write("b", torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)).wait()
        assert store.mapped("b").tolist() == [1.0, 2.0, 3.0] and store.mapped("empty").numel() == 0
