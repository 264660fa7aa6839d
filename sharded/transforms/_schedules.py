"""Pipeline schedules as plain data: for each pp rank, the ordered list of its actions.

    schedule = one_f_one_b(stages=4, microbatches=8)
    schedule[2]  ->  [Action("recv_f", 0, 2), Action("F", 0, 2), Action("send_f", 0, 2), ...]

A model is cut into `stages * virtual` chunks; chunk k runs on rank k % stages (with
`virtual` > 1 each rank holds several, Megatron's interleaving). Compute actions are
"F" (forward of micro-batch mb through chunk k) and "B" (its backward); `with_comm`
adds the point-to-point actions around them: "recv_f"/"send_f" carry a chunk's input
activations from the chunk before, "recv_b"/"send_b" the grads of those activations
back. The runtime in pipeline.py executes the list in order, so a new schedule
(zero-bubble, say) is a new function here, not a new code path there.

`simulate` runs the lists against each other (F costs 1, B costs 2 by default): it
proves a schedule cannot deadlock, that every link carries its messages in the same
order on both ends (NCCL matches point-to-point calls by order), and gives the
timeline that `sharded.plot.schedule` draws and the bubble fraction.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

__all__ = ["Action", "SCHEDULES", "gpipe", "one_f_one_b", "interleaved", "with_comm", "simulate", "Timeline"]


class Action(NamedTuple):
    kind: str  # "F" | "B" | "recv_f" | "send_f" | "recv_b" | "send_b"
    mb: int
    chunk: int

    def __str__(self) -> str:
        return f"{self.kind}{self.mb}" + (f"/c{self.chunk}" if self.kind in ("F", "B") else f"(c{self.chunk})")


Schedule = list[list[Action]]


def gpipe(stages: int, microbatches: int, virtual: int = 1) -> Schedule:
    """Every forward, then every backward: activations of all m micro-batches are held."""
    _plain(virtual, "gpipe")
    return [
        [Action("F", mb, r) for mb in range(microbatches)] + [Action("B", mb, r) for mb in range(microbatches)]
        for r in range(stages)
    ]


def one_f_one_b(stages: int, microbatches: int, virtual: int = 1) -> Schedule:
    """1F1B: stage s runs p - s - 1 warm-up forwards, then alternates one forward and one
    backward: at most p micro-batches' activations are held at once."""
    _plain(virtual, "1f1b")
    out = []
    for r in range(stages):
        warmup = min(stages - r - 1, microbatches)
        fwd = [Action("F", mb, r) for mb in range(microbatches)]
        bwd = [Action("B", mb, r) for mb in range(microbatches)]
        out.append(_interleave(fwd, bwd, warmup))
    return out


def interleaved(stages: int, microbatches: int, virtual: int = 2) -> Schedule:
    """Interleaved 1F1B (Megatron): each rank holds `virtual` chunks; micro-batches go
    through them in rounds of `stages`, which shrinks the bubble by a factor `virtual`."""
    if stages < 2:
        raise ValueError("pipeline(schedule='interleaved') interleaves chunks across stages; it needs stages >= 2 (use '1f1b' on one stage)")
    if microbatches % stages:
        raise ValueError(
            f"pipeline(schedule='interleaved') runs micro-batches in rounds of stages={stages}; "
            f"microbatches={microbatches} is not a multiple of {stages}"
        )
    out = []
    for r in range(stages):
        order = [
            (mb, j) for start in range(0, microbatches, stages) for j in range(virtual)
            for mb in range(start, start + stages)
        ]
        fwd = [Action("F", mb, j * stages + r) for mb, j in order]
        bwd = [Action("B", mb, (virtual - 1 - j) * stages + r) for mb, j in order]
        warmup = min((stages - r - 1) * 2 + (virtual - 1) * stages, len(fwd))
        out.append(_interleave(fwd, bwd, warmup))
    return out


SCHEDULES: dict[str, Callable[..., Schedule]] = {"gpipe": gpipe, "1f1b": one_f_one_b, "interleaved": interleaved}


def _plain(virtual: int, name: str) -> None:
    if virtual != 1:
        raise ValueError(f"pipeline(schedule={name!r}) runs one chunk per rank; virtual={virtual} needs schedule='interleaved'")


def _interleave(fwd: list[Action], bwd: list[Action], warmup: int) -> list[Action]:
    """`warmup` forwards, then one forward and one backward in turn, then the rest."""
    out = fwd[:warmup]
    f, b = warmup, 0
    while f < len(fwd):
        out += [fwd[f], bwd[b]]
        f, b = f + 1, b + 1
    return out + bwd[b:]


def with_comm(schedule: Schedule, chunks: int) -> Schedule:
    """Each rank's list with its sends and receives: a receive just before the compute
    that needs it, a send just after the compute that produced it."""
    out = []
    for actions in schedule:
        full = []
        for a in actions:
            if a.kind == "F":
                full += ([Action("recv_f", a.mb, a.chunk)] if a.chunk > 0 else []) + [a]
                full += [Action("send_f", a.mb, a.chunk)] if a.chunk < chunks - 1 else []
            else:
                full += ([Action("recv_b", a.mb, a.chunk)] if a.chunk < chunks - 1 else []) + [a]
                full += [Action("send_b", a.mb, a.chunk)] if a.chunk > 0 else []
        out.append(full)
    return out


class Timeline(NamedTuple):
    """Start and end of every compute action, per rank, and the bubble fraction."""

    spans: list[list[tuple[Action, float, float]]]
    makespan: float
    bubble: float  # idle share of the ranks' time between 0 and the makespan


def simulate(schedule: Schedule, chunks: int, f_cost: float = 1.0, b_cost: float = 2.0) -> Timeline:
    """Run the ranks' lists against each other with the given costs (sends are free and
    asynchronous, a receive waits for its send). Raises ValueError on a deadlock or on
    a link whose two ends order their messages differently."""
    stages = len(schedule)
    full = with_comm(schedule, chunks)
    pos = [0] * stages
    clock = [0.0] * stages
    sent: dict[tuple, float] = {}
    links: dict[tuple[int, int], list[tuple]] = {}
    spans: list[list[tuple[Action, float, float]]] = [[] for _ in range(stages)]

    def key(a: Action) -> tuple:
        """The message a send/recv moves: (direction, mb, the sending chunk)."""
        if a.kind in ("send_f", "send_b"):
            return (a.kind[-1], a.mb, a.chunk)
        return (a.kind[-1], a.mb, a.chunk - 1 if a.kind == "recv_f" else a.chunk + 1)

    def peer(a: Action, r: int) -> int:
        step = 1 if a.kind in ("send_f", "recv_b") else -1
        return (r + step) % stages

    while any(pos[r] < len(full[r]) for r in range(stages)):
        progressed = False
        for r in range(stages):
            while pos[r] < len(full[r]):
                a = full[r][pos[r]]
                if a.kind.startswith("send"):
                    sent[key(a)] = clock[r]
                    links.setdefault((r, peer(a, r)), []).append(key(a))
                elif a.kind.startswith("recv"):
                    if key(a) not in sent:
                        break
                    order = links.get((peer(a, r), r), [])
                    if not order or order[0] != key(a):
                        raise ValueError(f"rank {r} receives {key(a)} but rank {peer(a, r)}'s next message on that link is {order[:1]}")
                    order.pop(0)
                    clock[r] = max(clock[r], sent[key(a)])
                else:
                    cost = f_cost if a.kind == "F" else b_cost
                    spans[r].append((a, clock[r], clock[r] + cost))
                    clock[r] += cost
                pos[r] += 1
                progressed = True
        if not progressed:
            stuck = {r: str(full[r][pos[r]]) for r in range(stages) if pos[r] < len(full[r])}
            raise ValueError(f"the schedule deadlocks: ranks wait on {stuck}")
    makespan = max(clock)
    busy = sum(e - s for rank in spans for _, s, e in rank)
    return Timeline(spans, makespan, 1.0 - busy / (stages * makespan) if makespan else 0.0)
