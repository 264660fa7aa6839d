"""`assert_step_equivalent`: a transformed step on N ranks == the plain step on one process.

    step = sharded.data_parallel(sharded.accumulate(steps=2)(train_step))
    sharded.testing.assert_step_equivalent(step, train_step, state, batches, world_size=2)

runs `reference_step` over `batches` in this process, runs `step` (after `step.init`) on
`world_size` gloo ranks from a pool kept for the session, and compares, after the
steps, the gathered params and optimizer state of every rank and the metrics of every
step on every rank with the reference (every metric the reference returns; transforms
may add their own, such as a loss scale). A mismatch names the rank, the pytree path and
the largest difference.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch

from sharded import tree as T
from sharded.testing.pool import get_pool

__all__ = ["assert_step_equivalent", "run_steps"]


def run_steps(step: Callable, state: Any, batches: Sequence[Any]) -> tuple[Any, list[Any]]:
    """Apply `step` to each batch in turn; (final state, [metrics of each step])."""
    metrics = []
    for batch in batches:
        state, m = step(state, batch)
        metrics.append(m)
    return state, metrics


def _run_on_rank(step: Any, state: Any, batches: Sequence[Any], mesh: dict | None = None) -> tuple[Any, Any, list[Any]]:
    # Compile afresh, as a new process would: the pool's ranks outlive a test, and
    # torch.compile's entries for the many test models' blocks would pile up past its
    # recompile limit (per code object: every ToyLM's blocks share one forward).
    torch.compiler.reset()
    if mesh is not None:
        from sharded.mesh import Mesh

        Mesh.set_current(Mesh(**mesh))
    state = step.init(state)
    state, metrics = run_steps(step, state, batches)
    full = step.gather(state)
    return full.params, full.opt_state, metrics


def _compare(what: str, got: Any, want: Any, rtol: float, atol: float) -> None:
    got_leaves, want_leaves = T.leaves_with_paths(got), T.leaves_with_paths(want)
    if [p for p, _ in got_leaves] != [p for p, _ in want_leaves]:
        raise AssertionError(f"{what}: structure differs: {[p for p, _ in got_leaves]} vs {[p for p, _ in want_leaves]}")
    for (path, g), (_, w) in zip(got_leaves, want_leaves):
        if isinstance(w, torch.Tensor):
            try:
                torch.testing.assert_close(g.cpu(), w.cpu(), rtol=rtol, atol=atol)
            except AssertionError as e:
                raise AssertionError(f"{what}{path} differs from the reference:\n{e}") from None
        elif g != w:
            raise AssertionError(f"{what}{path}: {g!r} != reference {w!r}")


def assert_step_equivalent(
    step: Any,
    reference_step: Callable,
    state: Any,
    batches: Sequence[Any],
    world_size: int = 2,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    mesh: dict | None = None,
) -> None:
    """Raise AssertionError unless `step` on `world_size` ranks matches `reference_step`.

    `state` is the full initial state (as `TrainState.create` makes it); each side gets
    its own copy, since steps may update their input in place. `mesh` gives the ranks'
    axes (e.g. ``dict(pp=2, dp=2)``); by default every rank is on dp.
    """
    ref_state = copy.deepcopy(state)
    if hasattr(reference_step, "init"):  # a Step (mixed_precision(train_step), say) lays out its state
        ref_state = reference_step.init(ref_state)
    ref_state, ref_metrics = run_steps(reference_step, ref_state, batches)
    results = get_pool(world_size).run(_run_on_rank, step, state, list(batches), mesh)
    for rank, (params, opt_state, metrics) in enumerate(results):
        _compare(f"rank {rank}: params", params, ref_state.params, rtol, atol)
        _compare(f"rank {rank}: opt_state", opt_state, ref_state.opt_state, rtol, atol)
        for i, (m, ref_m) in enumerate(zip(metrics, ref_metrics)):
            # Every metric of the reference; transforms may add their own (a loss scale).
            if isinstance(m, dict) and isinstance(ref_m, dict) and ref_m.keys() <= m.keys():
                m = {k: m[k] for k in ref_m}
            _compare(f"rank {rank}: metrics of step {i}", m, ref_m, rtol, atol)
