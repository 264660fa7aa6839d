"""1-bit compression: signs packed 32 to an int32, with the scale and the error update
fused (the compressed exchange of `sharded.compress_grads`).

    pack_signs_(x, scales, error, per) -> words
                                   error = x - s * sign(x), s = scales[i // per] for x[i];
                                   bit j of word w is 1 where x[32w + j] >= 0 (padding: 1)
    unpack_signs_(words, scales, out, per, accumulate)
                                   out (+)= s * (bit ? +1 : -1)

One scale per `per` consecutive elements (a block), so one launch covers every block
of a bucket. float64 (the property tests) and non-Triton devices run
the torch references, which compute the same.
"""
from __future__ import annotations

import torch

from sharded.kernels._launch import jit, tl

__all__ = ["pack_signs_", "unpack_signs_", "reference_pack_signs_", "reference_unpack_signs_", "words_for"]

WORDS = 64  # int32 words per program of the pack kernel
BLOCK = 1024  # elements per program of the unpack kernel


def words_for(n: int) -> int:
    return -(-n // 32)


@jit
def pack_kernel(x_ptr, scale_ptr, error_ptr, words_ptr, n, per, WORDS: tl.constexpr):
    word = tl.program_id(0) * WORDS + tl.arange(0, WORDS)
    bit = tl.arange(0, 32)
    idx = word[:, None] * 32 + bit[None, :]
    mask = idx < n
    x = tl.load(x_ptr + idx, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + idx // per, mask=mask, other=0.0)
    positive = x >= 0
    tl.store(error_ptr + idx, x - tl.where(positive, scale, -scale), mask=mask)
    bits = tl.where(positive, 1, 0).to(tl.int64) << bit[None, :].to(tl.int64)
    tl.store(words_ptr + word, tl.sum(bits, axis=1).to(tl.int32), mask=word * 32 < n)


@jit
def unpack_kernel(words_ptr, scale_ptr, out_ptr, n, per, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    word = tl.load(words_ptr + idx // 32, mask=mask, other=0)
    positive = ((word >> (idx % 32)) & 1) == 1
    scale = tl.load(scale_ptr + idx // per, mask=mask, other=0.0)
    value = tl.where(positive, scale, -scale)
    if ACCUMULATE:
        value += tl.load(out_ptr + idx, mask=mask, other=0.0)
    tl.store(out_ptr + idx, value, mask=mask)


def pack_signs_(x: torch.Tensor, scales: torch.Tensor, error: torch.Tensor, per: int) -> torch.Tensor:
    words = torch.empty(words_for(x.numel()), dtype=torch.int32, device=x.device)
    pack_kernel[(triton_grid(words.numel(), WORDS),)](x, scales, error, words, x.numel(), per, WORDS=WORDS)
    return words


def unpack_signs_(words: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, per: int, accumulate: bool) -> torch.Tensor:
    unpack_kernel[(triton_grid(out.numel(), BLOCK),)](words, scales, out, out.numel(), per, ACCUMULATE=accumulate, BLOCK=BLOCK)
    return out


def triton_grid(n: int, per_program: int) -> int:
    return max(1, -(-n // per_program))


_SHIFTS = torch.arange(32, dtype=torch.int64)


def _per_element(scales: torch.Tensor, per: int, n: int) -> torch.Tensor:
    return scales.repeat_interleave(per)[:n]


def reference_pack_signs_(x: torch.Tensor, scales: torch.Tensor, error: torch.Tensor, per: int) -> torch.Tensor:
    """The same in torch: bits in int64, then wrapped to int32."""
    scale = _per_element(scales, per, x.numel())
    positive = x >= 0
    error.copy_(x - torch.where(positive, scale, -scale))
    padded = torch.ones(words_for(x.numel()) * 32, dtype=torch.int64, device=x.device)
    padded[: x.numel()] = positive.to(torch.int64)
    words = (padded.view(-1, 32) << _SHIFTS.to(x.device)).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def reference_unpack_signs_(words: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, per: int, accumulate: bool) -> torch.Tensor:
    scale = _per_element(scales, per, out.numel())
    bits = (words.to(torch.int64).unsqueeze(1) >> _SHIFTS.to(words.device)) & 1
    positive = bits.view(-1)[: out.numel()] == 1
    value = torch.where(positive, scale, -scale).to(out.dtype)
    return out.add_(value) if accumulate else out.copy_(value)
