"""Small models for property tests: uneven widths, optional tied weights and buffers."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ToyConfig", "ToyLM", "make_train_step"]


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab: int = 11
    width: int = 7
    hidden: int = 15
    depth: int = 2
    tied: bool = False
    seed: int = 0


class ToyBlock(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class ToyLM(nn.Module):
    """Embedding -> residual MLP blocks -> head; `tied` shares the embedding and head."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        torch.manual_seed(cfg.seed)
        self.embed = nn.Embedding(cfg.vocab, cfg.width)
        self.blocks = nn.ModuleList(ToyBlock(cfg.width, cfg.hidden) for _ in range(cfg.depth))
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)
        if cfg.tied:
            self.head.weight = self.embed.weight
        self.register_buffer("logit_scale", torch.tensor(0.5 + cfg.seed % 3))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(h) * self.logit_scale


def make_train_step(model):
    """The canonical user step over a traced ToyLM: mean cross entropy, AdamW-style update."""
    from sharded import value_and_grad

    def loss_fn(params, batch):
        tokens, targets = batch
        logits = model.apply(params, tokens)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return loss, {"accuracy": (logits.argmax(-1) == targets).to(logits.dtype).mean()}

    def train_step(state, batch):
        (loss, aux), grads = value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        return state.apply_gradients(grads), {"loss": loss, **aux}

    return train_step
