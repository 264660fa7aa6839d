"""Queueing work on a side CUDA stream, or running it in place where there is none."""
from __future__ import annotations

import contextlib

import torch

__all__ = ["on_stream"]


def on_stream(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    """Queue on `stream`; where there is none (off CUDA), run here."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
