"""Pinned host memory carved from large slabs.

[Note: pinned slabs] torch's caching host allocator rounds every pinned allocation up
to a power of two (to reuse blocks), so pinning a model leaf by leaf wastes up to half
of each: a 50k x 5120 fp32 embedding (1.03 GB) takes 2 GiB. Offloading a 13B model to
one GPU pins 52 GB of params and 52 GB of grad buffers, and the rounding adds tens of
GB to a host that has none to spare. `PinnedSlabs` allocates pinned slabs of a power of
two (1 GiB, or the next power of two above a larger request) and hands out aligned
views of them, first fit; a slab lives as long as any view of it or the `PinnedSlabs`
that carved it.
"""
from __future__ import annotations

import math

import torch

__all__ = ["PinnedSlabs"]

SLAB_BYTES = 1 << 30
ALIGN = 512  # bytes: every dtype's views start aligned, and copies take the fast path


class PinnedSlabs:
    """Aligned views of pinned (where a GPU is present) host slabs, for host buffers that
    cross PCIe."""

    def __init__(self, pin: bool | None = None, slab_bytes: int = SLAB_BYTES):
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.slab_bytes = slab_bytes
        self.slabs: list[tuple[torch.Tensor, list[int]]] = []  # (a slab of bytes, [bytes handed out])

    def empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of `shape` and `dtype` in one of the slabs."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        need = -(-nbytes // ALIGN) * ALIGN
        slab, used = next(((s, u) for s, u in self.slabs if u[0] + need <= s.numel()), (None, None))
        if slab is None:
            slab, used = self._slab(max(self.slab_bytes, 1 << (need - 1).bit_length()))
            if used[0] + need > slab.numel():  # an unaligned start (pageable memory is 64-byte aligned)
                slab, used = self._slab(1 << (need + ALIGN - 1).bit_length())
            self.slabs.append((slab, used))
        view = slab[used[0] : used[0] + nbytes].view(dtype).view(shape)
        used[0] += need
        return view

    def _slab(self, size: int) -> tuple[torch.Tensor, list[int]]:
        """A new slab of `size` bytes, and where its first ALIGN-aligned byte is (0 for
        pinned memory, which starts on a page)."""
        slab = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
        return slab, [-slab.data_ptr() % ALIGN]

    def copy(self, x: torch.Tensor) -> torch.Tensor:
        """`x` copied into a view of the slabs."""
        return self.empty(x.shape, x.dtype).copy_(x)

    @property
    def nbytes(self) -> int:
        """Bytes of the slabs (what they hold of host memory)."""
        return sum(s.numel() for s, _ in self.slabs)
