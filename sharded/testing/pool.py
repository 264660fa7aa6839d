"""`get_pool(nprocs)`: one live `RankPool` of CPU ranks per world size, for the whole test session.

    results = get_pool(4).run(check_on_rank, x)     # ranks start once, then serve every call

Spawning a rank costs seconds (it imports torch); a session of hundreds of hypothesis
examples over world sizes 1..4 pays that once per size. The pools are closed when the
process exits. A failing job tears its pool down; the next `run` starts fresh ranks.
"""
from __future__ import annotations

import atexit

from sharded.launch import RankPool

__all__ = ["RankPool", "get_pool"]

_pools: dict[int, RankPool] = {}


def get_pool(nprocs: int) -> RankPool:
    """This process's pool of `nprocs` gloo ranks (created on first use)."""
    if nprocs not in _pools:
        if not _pools:
            atexit.register(_close_all)
        _pools[nprocs] = RankPool(nprocs, device="cpu")
    return _pools[nprocs]


def _close_all() -> None:
    for pool in _pools.values():
        pool.close()
    _pools.clear()
