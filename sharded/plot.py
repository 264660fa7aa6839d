"""Pictures of what a step does: `schedule` draws a pipeline's timeline.

    fig = sharded.plot.schedule(step)                  # the schedule, simulated (B = 2 F)
    fig = sharded.plot.schedule(measured_spans)        # a run's own timings, per rank

One row per pp rank; a box per forward (light) and backward (dark) of a micro-batch,
labelled with its number (and chunk, when ranks hold several); the title gives the
bubble: the idle share of the ranks' time.
"""
from __future__ import annotations

from typing import Any, Sequence

from sharded.transforms._schedules import Action, Timeline, simulate

__all__ = ["schedule"]

Spans = Sequence[Sequence[tuple[Action, float, float]]]


def _spans(source: Any) -> tuple[Spans, str]:
    """(spans per rank, a title) from a Step with a pipeline, a Timeline, or spans."""
    if isinstance(source, Timeline):
        return source.spans, "simulated"
    pipes = [t for t in getattr(source, "transforms", ()) if t.name == "pipeline"]
    if pipes:
        p = pipes[0]
        return simulate(p.schedule, p.chunks).spans, p.describe()
    if isinstance(source, Sequence) and all(isinstance(rank, Sequence) for rank in source):
        return source, "measured"
    raise TypeError("plot.schedule takes a Step with a pipeline, a Timeline, or [[(Action, start, end), ...] per rank]")


def schedule(source: Any, ax: Any = None) -> Any:
    """Draw the timeline of `source`; returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    spans, title = _spans(source)
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 0.6 * len(spans) + 1.2))
    start = min((s for rank in spans for _, s, _ in rank), default=0.0)
    end = max((e for rank in spans for _, _, e in rank), default=1.0)
    chunks_per_rank = max((len({a.chunk for a, _, _ in rank}) for rank in spans), default=1)
    colors = plt.get_cmap("tab10")
    busy = 0.0
    for row, rank in enumerate(spans):
        for a, s, e in rank:
            busy += e - s
            ax.broken_barh(
                [(s - start, e - s)], (row - 0.4, 0.8),
                facecolors=colors(a.mb % 10), alpha=0.45 if a.kind == "F" else 0.95, edgecolor="black", linewidth=0.5,
            )
            label = f"{a.mb}" + (f".{a.chunk}" if chunks_per_rank > 1 else "")
            ax.text((s + e) / 2 - start, row, label, ha="center", va="center", fontsize=7)
    span = (end - start) * len(spans)
    bubble = 1.0 - busy / span if span else 0.0
    ax.set_yticks(range(len(spans)), [f"pp rank {r}" for r in range(len(spans))])
    ax.invert_yaxis()
    ax.set_xlabel("time")
    ax.set_title(f"{title}: bubble {bubble:.1%} (light: forward, dark: backward)")
    return ax.figure
