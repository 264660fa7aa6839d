"""This process's place in the world: joining the process group, rank and device.

    mesh = sharded.distributed.init()       # under torchrun, or inside a sharded.launch rank
    dev = sharded.distributed.device()      # cuda:LOCAL_RANK with NCCL, else cpu

Every query works before (or without) `init`: a plain process is rank 0 of 1, on
cuda:LOCAL_RANK when it sees a GPU, else on the CPU.

[Note: NCCL connects at init] Since NCCL 2.22 a communicator sets up its connections at
its first collective, on the host, waiting there for every rank; a rank that never
comes hangs its peers inside that call, out of reach of any timeout (seen on torch 2.11,
2 H200s: rank 0 stuck in the first all_reduce until killed). `init` therefore creates
the communicator at once (device_id) and asks NCCL to connect it fully then
(NCCL_RUNTIME_CONNECT=0, unless the user chose otherwise), while every rank is present.
A later collective that a rank skips is then caught by torch's NCCL watchdog after
`timeout`: it logs "Watchdog caught collective operation timeout", dumps debug
information and takes the rank down (SIGABRT, about a minute later), which `launch`
reports as a RankError quoting that line. `Pending.wait()` raises CollectiveTimeout
instead where torch raises (gloo; NCCL with TORCH_NCCL_BLOCKING_WAIT=1).
"""
from __future__ import annotations

import datetime
import os
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from sharded.mesh import Mesh

__all__ = ["init", "shutdown", "is_initialized", "rank", "world_size", "local_rank", "device"]

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets


def init(backend: str | None = None, timeout: datetime.timedelta | float = datetime.timedelta(minutes=5)) -> Mesh:
    """Join the process group that torchrun's environment describes; return the default `Mesh` (dp = world).

    backend: None picks "nccl" when CUDA is available, and then this rank's device is
    cuda:LOCAL_RANK; otherwise "gloo". timeout (a timedelta or seconds): a collective
    that waits longer raises `sharded.comm.CollectiveTimeout` instead of hanging.
    Idempotent: once a process group exists, this returns the current mesh. Without
    RANK and WORLD_SIZE in the environment this is a single process: no process group,
    and a one-rank mesh.
    """
    from sharded.mesh import Mesh  # mesh.py imports this module

    if is_initialized():
        return Mesh.current()
    present = [k for k in ENV if k in os.environ]
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return Mesh.current()
    missing = [k for k in ENV if k not in os.environ and k != "LOCAL_RANK"]
    if missing:
        raise RuntimeError(
            f"sharded.distributed.init: the environment sets {', '.join(present)} but not {', '.join(missing)}; "
            f"run under torchrun or sharded.launch, which set all of {', '.join(ENV)}"
        )
    if not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=timeout)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device_id = None
    if "nccl" in backend:
        local, visible = local_rank(), torch.cuda.device_count()
        if local >= visible:
            raise RuntimeError(
                f"LOCAL_RANK={local} needs GPU {local}, but {visible} CUDA device(s) are visible; "
                f"run at most {visible} ranks on this host, or use backend='gloo' on the CPU"
            )
        torch.cuda.set_device(local)
        device_id = torch.device("cuda", local)  # creates the communicator now, bound to this GPU
        os.environ.setdefault("NCCL_RUNTIME_CONNECT", "0")  # see [Note: NCCL connects at init]
    dist.init_process_group(
        backend,
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout,
        device_id=device_id,
    )
    mesh = Mesh()
    Mesh.set_current(mesh)
    return mesh


def shutdown() -> None:
    """Leave the process group, if any, and forget the default mesh."""
    from sharded.mesh import Mesh  # mesh.py imports this module

    if is_initialized():
        dist.destroy_process_group()
    Mesh.set_current(None)


def is_initialized() -> bool:
    """True once this process belongs to a process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the world (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Ranks in the world (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """This process's rank on its host: LOCAL_RANK, as torchrun and sharded.launch set it (else 0)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def device() -> torch.device:
    """Where this rank computes: cuda:LOCAL_RANK under NCCL, else cpu.

    Without a process group: cuda:LOCAL_RANK when a GPU is visible, else cpu.
    """
    if is_initialized():
        uses_cuda = "nccl" in dist.get_backend()
    else:
        uses_cuda = torch.cuda.is_available()
    return torch.device("cuda", local_rank()) if uses_cuda else torch.device("cpu")
