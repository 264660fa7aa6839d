"""Learning-rate schedules: torch functions of a 0-d float count tensor.

A schedule runs on the count's device and returns a 0-d tensor there, so an update
never syncs with the host to read its learning rate.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["Schedule", "constant", "linear", "warmup_cosine"]

Schedule = Callable[[torch.Tensor], torch.Tensor]


def constant(value: float) -> Schedule:
    return lambda count: torch.full_like(count, value, dtype=torch.float32)


def linear(init: float, end: float, steps: int) -> Schedule:
    """From `init` to `end` over `steps` updates, then `end`."""
    if steps <= 0:
        raise ValueError(f"linear schedule needs steps > 0, got {steps}")

    def schedule(count: torch.Tensor) -> torch.Tensor:
        frac = torch.clamp(count.float() / steps, 0.0, 1.0)
        return init + (end - init) * frac

    return schedule


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, end: float = 0.0, init: float = 0.0) -> Schedule:
    """Linear warmup from `init` to `peak` over `warmup_steps`, then cosine decay to
    `end` at `total_steps` (and `end` after)."""
    if not 0 <= warmup_steps <= total_steps or total_steps <= 0:
        raise ValueError(
            f"warmup_cosine needs 0 <= warmup_steps <= total_steps and total_steps > 0; "
            f"got warmup_steps={warmup_steps}, total_steps={total_steps}"
        )
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(count: torch.Tensor) -> torch.Tensor:
        count = count.float()
        warm = init + (peak - init) * count / max(warmup_steps, 1)
        frac = torch.clamp((count - warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = end + (peak - end) * 0.5 * (1.0 + torch.cos(math.pi * frac))
        return torch.where(count < warmup_steps, warm, cosine)

    return schedule
