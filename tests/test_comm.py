"""sharded.comm: collectives over gloo ranks == their definitions; no-ops in one process."""
import warnings

import pytest
import torch

from sharded import comm
from sharded.testing import get_pool


def _collectives(async_op):
    """Every collective on this rank, with warnings as errors (the version shim must not warn)."""
    import torch.distributed as dist

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r, n = dist.get_rank(), dist.get_world_size()
        out = {}

        x = torch.arange(5, dtype=torch.float32) * (r + 1)
        comm.all_reduce(x, async_op=async_op).wait()
        out["sum"] = x
        y = torch.full((3,), float(r))
        comm.all_reduce(y, op="avg", async_op=async_op).wait()
        out["avg"] = y
        m = torch.tensor([r, -r], dtype=torch.int64)
        comm.all_reduce(m, op="max", async_op=async_op).wait()
        out["max"] = m

        gathered = torch.empty(n * 2, 3)
        pending = comm.all_gather_into_tensor(gathered, torch.full((2, 3), float(r)), async_op=async_op)
        pending.wait()
        out["gather"] = gathered

        rows = torch.arange(n * 2 * 3, dtype=torch.float32).reshape(n * 2, 3) + r
        shard = torch.empty(2, 3)
        comm.reduce_scatter_tensor(shard, rows, async_op=async_op).wait()
        out["scatter"] = shard
        mean_shard = torch.empty(2, 3)
        comm.reduce_scatter_tensor(mean_shard, rows, op="avg", async_op=async_op).wait()
        out["scatter_avg"] = mean_shard

        b = torch.full((4,), float(r))
        comm.broadcast(b, src=n - 1)
        out["broadcast"] = b
        comm.barrier()
    return out


@pytest.mark.parametrize("async_op", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("world", [2, 3])
def test_collectives_match_their_definition(world, async_op):
    results = get_pool(world).run(_collectives, async_op)
    ranks = range(world)
    rows = [torch.arange(world * 2 * 3, dtype=torch.float32).reshape(world * 2, 3) + r for r in ranks]
    total_rows = sum(rows)
    for r, got in enumerate(results):
        torch.testing.assert_close(got["sum"], torch.arange(5.0) * sum(q + 1 for q in ranks))
        torch.testing.assert_close(got["avg"], torch.full((3,), sum(ranks) / world))
        torch.testing.assert_close(got["max"], torch.tensor([world - 1, 0]))
        torch.testing.assert_close(got["gather"], torch.cat([torch.full((2, 3), float(q)) for q in ranks]))
        torch.testing.assert_close(got["scatter"], total_rows[2 * r : 2 * r + 2])
        torch.testing.assert_close(got["scatter_avg"], total_rows[2 * r : 2 * r + 2] / world)
        torch.testing.assert_close(got["broadcast"], torch.full((4,), float(world - 1)))


def _recorded():
    x = torch.zeros(4)
    with comm.recording() as ops:
        comm.all_reduce(x, op="avg", async_op=True).wait()
        comm.broadcast(x, src=0)
    return ops


def test_recording_sees_the_collectives_on_every_rank():
    for ops in get_pool(2).run(_recorded):
        assert ops == [
            comm.Op("all_reduce", (4,), torch.float32, 2, async_op=True, reduce="avg"),
            comm.Op("broadcast", (4,), torch.float32, 2),
        ]


def test_one_process_without_process_group_is_a_cheap_no_op():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with comm.recording() as ops:
            x = torch.arange(3.0)
            comm.all_reduce(x, op="avg", async_op=True).wait()
            torch.testing.assert_close(x, torch.arange(3.0))
            out = torch.empty(1, 3)
            comm.all_gather_into_tensor(out, x).wait()
            torch.testing.assert_close(out, x[None])
            shard = torch.empty(3)
            comm.reduce_scatter_tensor(shard, x[None] * 2).wait()
            torch.testing.assert_close(shard, x * 2)
            comm.broadcast(x, src=0)
            comm.barrier()
    assert [(op.name, op.group_size) for op in ops] == [
        ("all_reduce", 1), ("all_gather", 1), ("reduce_scatter", 1), ("broadcast", 1), ("barrier", 1)
    ]


def test_unknown_reduce_op_is_named():
    with pytest.raises(ValueError, match=r"all_reduce\(op='mean'\): op must be one of 'sum', 'avg'"):
        comm.all_reduce(torch.zeros(1), op="mean")


class _TimedOutWork:
    def wait(self):
        raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation")


class _BrokenWork:
    def wait(self):
        raise RuntimeError("Connection closed by peer")


def test_torch_timeouts_become_collective_timeout_naming_the_collective():
    pending = comm.Pending(_TimedOutWork(), ("all_reduce", torch.zeros(1024), 4))
    with pytest.raises(comm.CollectiveTimeout, match=r"(?s)all_reduce of \(1024,\) float32 \(0.00 MiB\) over 4 ranks "
                       r"did not complete: .*Timed out waiting 3000ms.*never reached this collective.*timeout="):
        pending.wait()
    with pytest.raises(RuntimeError, match="closed by peer") as info:
        comm.Pending(_BrokenWork(), ("barrier", None, 2)).wait()
    assert not isinstance(info.value, comm.CollectiveTimeout)
