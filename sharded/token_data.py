"""Users' data: a text file or a pre-tokenized token file, with the embedded corpus's interface.

    data = TokenData.from_path("train.bin")            # nanoGPT's uint16 token file, memory-mapped
    data = TokenData.from_path("book.txt")             # bytes as tokens (vocab 256)
    data = TokenData.from_path("book.txt", tokenizer="my-tokenizer/")   # a local HF tokenizer
    for x, y in data.batches("train", batch_size=32, seq_len=256, seed=0): ...

The last `val_fraction` of the tokens is the validation split. A split is cut into
non-overlapping windows of seq_len + 1 tokens; each epoch of "train" visits every
window once, in an order drawn from (seed, epoch), `batch_size` windows a global batch
(decision 3: every rank takes the same global batch and the transforms take its rows,
so two ranks never see the same window in a step). The data's position is the number
of batches drawn, which a checkpoint's step count restores.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

__all__ = ["TokenData"]

_TOKEN_FILES = {".bin": np.uint16, ".npy": None}  # .npy says its own dtype


class TokenData:
    def __init__(self, tokens: np.ndarray, vocab_size: int, name: str, val_fraction: float = 0.1):
        if len(tokens) < 4:
            raise ValueError(f"--data {name}: {len(tokens)} tokens; a data file needs at least a few windows of text")
        top = int(tokens.max())
        if top >= vocab_size:
            raise ValueError(f"--data {name}: token id {top} is outside the vocab of {vocab_size}; tokenize it for this model")
        self.name, self.vocab_size = name, vocab_size
        cut = max(2, min(len(tokens) - 2, int(len(tokens) * (1 - val_fraction))))
        self.splits = {"train": tokens[:cut], "val": tokens[cut:]}

    @classmethod
    def from_path(cls, path: str | Path, tokenizer: str | Path | None = None, vocab_size: int | None = None, dtype: str | None = None) -> TokenData:
        """A token file (.bin: raw uint16, or `dtype="uint32"`; .npy), else a text file,
        as bytes or through a local Hugging Face tokenizer. `vocab_size` defaults to the
        tokenizer's (256 for bytes), or the largest id + 1 of a token file."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--data {path}: no such file")
        if path.stat().st_size == 0:
            raise ValueError(f"--data {path}: the file is empty")
        if path.suffix in _TOKEN_FILES:
            tokens = np.load(path, mmap_mode="r") if path.suffix == ".npy" else np.memmap(path, dtype=np.dtype(dtype or _TOKEN_FILES[path.suffix]), mode="r")
            return cls(tokens, vocab_size or int(tokens.max()) + 1, str(path))
        text = path.read_text(encoding="utf-8", errors="replace")
        if tokenizer is None:
            return cls(np.frombuffer(text.encode("utf-8"), dtype=np.uint8), vocab_size or 256, str(path))
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer))
        return cls(np.asarray(tok.encode(text), dtype=np.int64), vocab_size or len(tok), str(path))

    def tokens(self, split: str) -> torch.Tensor:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; choose 'train' or 'val'")
        return torch.from_numpy(np.array(self.splits[split], dtype=np.int64))  # a copy: a memory map is read-only

    def windows(self, split: str, seq_len: int) -> int:
        return (len(self.splits[split]) - 1) // seq_len

    def batches(self, split: str, batch_size: int, seq_len: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless global batches (inputs, targets) of (batch_size, seq_len): an epoch
        visits every window once ("train": in a seeded order; "val": in order)."""
        data, n = self.splits[split], self.windows(split, seq_len)
        if n < 1:
            raise ValueError(f"--data {self.name}: the {split} split has {len(data)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        offsets = np.arange(seq_len + 1)
        order, epoch = np.empty(0, dtype=np.int64), 0
        while True:
            while len(order) < batch_size:  # the next epoch's windows
                nxt = np.random.default_rng([seed, epoch]).permutation(n) if split == "train" else np.arange(n)
                order, epoch = np.concatenate([order, nxt]), epoch + 1
            take, order = order[:batch_size], order[batch_size:]
            window = torch.from_numpy(np.asarray(data[(take * seq_len)[:, None] + offsets], dtype=np.int64))
            yield window[:, :-1], window[:, 1:]

    def unigram_entropy(self, split: str) -> float:
        counts = torch.bincount(self.tokens(split), minlength=self.vocab_size).double()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * p.log()).sum())
