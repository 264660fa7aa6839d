"""An embedded corpus, generated from a seed: no downloads, the same bytes everywhere.

The text is a small synthetic language (a fixed lexicon of invented words with Zipfian
frequencies, a grammar, and per-noun verb preferences), tokenized by character. It
has structure at every scale a small model can learn (spelling, word order,
agreement between words), so held-out loss falling below the unigram entropy is a
meaningful sign that training works.
"""
from __future__ import annotations

import random
import string
from typing import Iterator

import torch

__all__ = ["CharTokenizer", "Corpus"]

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


class CharTokenizer:
    """Characters to ids and back, over a fixed alphabet."""

    def __init__(self, alphabet: str):
        self.alphabet = alphabet
        self._ids = {c: i for i, c in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> torch.Tensor:
        try:
            return torch.tensor([self._ids[c] for c in text], dtype=torch.long)
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer's alphabet {self.alphabet!r}") from None

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.alphabet[i] for i in ids.tolist())


class Corpus:
    """Train and validation token streams of the synthetic language for `seed`."""

    def __init__(self, seed: int = 0, train_chars: int = 600_000, val_chars: int = 60_000):
        rng = random.Random(seed)
        lexicon = _Lexicon(rng)
        self.tokenizer = CharTokenizer(" .\n" + string.ascii_lowercase)
        self.splits = {
            "train": self.tokenizer.encode(lexicon.text(rng, train_chars)),
            "val": self.tokenizer.encode(lexicon.text(rng, val_chars)),
        }

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def tokens(self, split: str) -> torch.Tensor:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; choose 'train' or 'val'")
        return self.splits[split]

    def batches(self, split: str, batch_size: int, seq_len: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless (inputs, targets) of shape (batch_size, seq_len) at random offsets;
        the same `seed` gives the same batches on every rank and machine."""
        data = self.tokens(split)
        if seq_len + 1 > len(data):
            raise ValueError(f"seq_len={seq_len} is longer than the {split} split ({len(data)} tokens)")
        g = torch.Generator().manual_seed(seed)
        offsets = torch.arange(seq_len + 1)
        while True:
            starts = torch.randint(0, len(data) - seq_len, (batch_size, 1), generator=g)
            window = data[starts + offsets]
            yield window[:, :-1], window[:, 1:]

    def unigram_entropy(self, split: str) -> float:
        """Entropy (nats/char) of the split's character frequencies: the loss of the
        best model that ignores context."""
        counts = torch.bincount(self.tokens(split), minlength=self.tokenizer.vocab_size).double()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * p.log()).sum())


class _Lexicon:
    """Invented word classes and the grammar that strings them into sentences."""

    def __init__(self, rng: random.Random):
        def word(syllables: int) -> str:
            return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))

        self.nouns = [word(rng.randint(1, 3)) for _ in range(120)]
        self.verbs = [word(rng.randint(1, 2)) + "s" for _ in range(60)]
        self.adjs = [word(rng.randint(1, 2)) + "n" for _ in range(40)]
        self.dets = ["the", "a", "every", "no"]
        self.preps = ["on", "under", "with", "near"]
        zipf = lambda n: [1 / (k + 1) for k in range(n)]  # noqa: E731
        self.noun_w, self.adj_w = zipf(len(self.nouns)), zipf(len(self.adjs))
        self.likes = {n: rng.sample(self.verbs, 4) for n in self.nouns}  # each noun's usual verbs

    def phrase(self, rng: random.Random) -> tuple[str, str]:
        noun = rng.choices(self.nouns, self.noun_w)[0]
        words = [rng.choice(self.dets)]
        if rng.random() < 0.4:
            words.append(rng.choices(self.adjs, self.adj_w)[0])
        return " ".join(words + [noun]), noun

    def sentence(self, rng: random.Random) -> str:
        subject, noun = self.phrase(rng)
        verb = rng.choice(self.likes[noun]) if rng.random() < 0.9 else rng.choice(self.verbs)
        out = [subject, verb, self.phrase(rng)[0]]
        if rng.random() < 0.3:
            out += [rng.choice(self.preps), self.phrase(rng)[0]]
        return " ".join(out) + "."

    def text(self, rng: random.Random, chars: int) -> str:
        parts, n = [], 0
        while n < chars:
            s = self.sentence(rng) + ("\n" if rng.random() < 0.2 else " ")
            parts.append(s)
            n += len(s)
        return "".join(parts)[:chars]
