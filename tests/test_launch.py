"""launch and RankPool: results come back, failures surface as RankError at once, nothing hangs."""
import os
import sys
import time

import pytest
import torch

from sharded import comm, distributed
from sharded.launch import RankError, RankPool, launch
from sharded.testing import get_pool


def test_launch_returns_rank_0_result_of_a_closure():
    offset = 10  # a closure: cloudpickle ships it by value, as it would a notebook cell's function

    def fn(x, scale=1):
        t = torch.tensor([float(distributed.rank() + 1)])
        comm.all_reduce(t)
        return distributed.rank(), distributed.world_size(), x * scale + offset, t.item()

    assert launch(fn, 2, nprocs=2, device="cpu", scale=3) == (0, 2, 16, 3.0)


def _pid_and_count(i):
    return os.getpid(), i, torch.get_num_threads()


def test_pool_runs_many_jobs_on_the_same_workers():
    pool = get_pool(2)
    first = pool.run(_pid_and_count, 0)
    for i in range(1, 20):
        got = pool.run(_pid_and_count, i)
        assert [pid for pid, _, _ in got] == [pid for pid, _, _ in first]
        assert [count for _, count, _ in got] == [i, i]
    assert len({pid for pid, _, _ in first}) == 2
    if "OMP_NUM_THREADS" not in os.environ:
        assert [threads for _, _, threads in first] == [1, 1]  # CPU ranks share the cores


def _talk(word):
    import sys

    print(f"{word} from {distributed.rank()}")
    print(f"{word} to stderr", file=sys.stderr)
    print("no newline at the end", end="")
    return distributed.rank()


def test_output_is_streamed_with_the_rank_prefix(capfd):
    assert get_pool(2).run(_talk, "hello") == [0, 1]
    out, err = capfd.readouterr()
    assert "[rank 0] hello from 0\n" in out and "[rank 1] hello from 1\n" in out
    assert "[rank 0] hello to stderr\n" in err and "[rank 1] hello to stderr\n" in err


def _raise_on_last_rank():
    if distributed.rank() == distributed.world_size() - 1:
        raise ValueError(f"bad value on rank {distributed.rank()}")
    comm.barrier()  # the others wait on the failed rank; they must be killed, not waited for


@pytest.mark.parametrize("world", [2, 3, 4])
def test_a_rank_that_raises_is_named_with_its_traceback(world):
    pool = get_pool(world)
    pool.run(os.getpid)  # started: time only the failure
    start = time.monotonic()
    with pytest.raises(RankError, match=rf"(?s)rank {world - 1} of {world} raised.*_raise_on_last_rank.*"
                       rf"ValueError: bad value on rank {world - 1}") as info:
        pool.run(_raise_on_last_rank)
    assert time.monotonic() - start < 5
    assert info.value.rank == world - 1 and info.value.exitcode is None
    assert "Traceback (most recent call last)" in str(info.value)
    if world == 2:
        assert pool.run(distributed.rank) == [0, 1]  # a later run respawns the ranks


def _exit_on_rank_1():
    if distributed.rank() == 1:
        print("[rank1]:[E1122 15:45:35.962 ProcessGroupNCCL.cpp:689] Watchdog caught collective operation timeout",
              file=sys.stderr)  # what torch logs before NCCL's watchdog takes a rank down
        print("last words", file=sys.stderr, flush=True)
        os._exit(3)
    time.sleep(60)


def test_a_rank_that_dies_without_exception_reports_its_exit_code():
    pool = get_pool(2)
    pool.run(os.getpid)
    start = time.monotonic()
    with pytest.raises(RankError, match=r"rank 1 of 2 exited with code 3 while running _exit_on_rank_1") as info:
        pool.run(_exit_on_rank_1)
    assert time.monotonic() - start < 5
    assert info.value.rank == 1 and info.value.exitcode == 3
    assert "torch logged:\n[rank1]:[E1122 15:45:35.962 ProcessGroupNCCL.cpp:689] Watchdog caught" in str(info.value)
    assert "the last lines of its stderr:\n" in str(info.value) and str(info.value).endswith("last words")


def _rank_1_skips_all_reduce():
    if distributed.rank() == 0:
        comm.all_reduce(torch.ones(8))
    return distributed.rank()


def test_a_skipped_collective_raises_collective_timeout_not_a_hang():
    with RankPool(2, timeout=60, collective_timeout=3) as pool:
        start = time.monotonic()
        with pytest.raises(RankError, match=r"(?s)rank 0 of 2 raised.*CollectiveTimeout: all_reduce of \(8,\) float32"
                           r".*over 2 ranks did not complete.*never reached this collective") as info:
            pool.run(_rank_1_skips_all_reduce)
        assert info.value.rank == 0
        assert time.monotonic() - start < 30


def test_the_whole_call_is_bounded_by_timeout():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"on 1 rank\(s\) did not finish within timeout=4 s"):
        launch(time.sleep, 60, nprocs=1, device="cpu", timeout=4)
    assert time.monotonic() - start < 10


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"RankPool\(nprocs=0\): nprocs must be a positive int"):
        RankPool(0)
    with pytest.raises(ValueError, match=r"device must be 'cpu' or 'cuda'"):
        RankPool(2, device="tpu")
    with pytest.raises(ValueError, match=r"RankPool\(collective_timeout=0\): give a positive number of seconds"):
        RankPool(2, collective_timeout=0)
