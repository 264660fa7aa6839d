"""A clean GPT: pre-LN blocks, causal SDPA attention, GELU MLP, optional tied head.

Presets follow the GPT-3 paper's table (vocab padded to 50304, a multiple of 128);
`flops_per_token` is the count MFU is measured against.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPTConfig", "GPT", "flops_per_token", "loss_fn", "PRESETS"]


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50304
    seq_len: int = 2048
    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    dropout: float = 0.0
    bias: bool = True
    tied: bool = True

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"GPTConfig: d_model={self.d_model} must be divisible by n_heads={self.n_heads}")

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """`GPTConfig.preset("125m", seq_len=1024)`: a named size, fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; choose one of {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS = {
    "tiny": GPTConfig(seq_len=128, n_layers=4, d_model=128, n_heads=4),
    "125m": GPTConfig(n_layers=12, d_model=768, n_heads=12),
    "350m": GPTConfig(n_layers=24, d_model=1024, n_heads=16),
    "760m": GPTConfig(n_layers=24, d_model=1536, n_heads=16),
    "1.3b": GPTConfig(n_layers=24, d_model=2048, n_heads=16),
    "2.7b": GPTConfig(n_layers=32, d_model=2560, n_heads=32),
    "6.7b": GPTConfig(n_layers=32, d_model=4096, n_heads=32),
    "13b": GPTConfig(n_layers=40, d_model=5120, n_heads=40),  # LLaMA-13B's shape
    "20b": GPTConfig(n_layers=44, d_model=6144, n_heads=64),  # GPT-NeoX-20B's shape
}


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.d_model // cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape  # the heads counted from qkv's output: tensor_parallel gives each rank some of them
        q, k, v = self.qkv(x).view(b, t, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """`GPT(cfg)(idx) -> logits`; `blocks` is the ModuleList that transforms split on."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tied:
            self.head.weight = self.wte.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # residual projections, scaled as in GPT-2
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"GPT: sequence of {t} tokens is longer than seq_len={self.cfg.seq_len}")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(t, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def flops_per_token(cfg: GPTConfig) -> float:
    """Training FLOPs per token: 6 × (matmul params, head included) + attention scores
    (12 · layers · d_model · seq_len), as in PaLM's MFU accounting."""
    d, L = cfg.d_model, cfg.n_layers
    block_matmuls = L * 12 * d * d
    return 6 * (block_matmuls + cfg.vocab_size * d) + 12 * L * d * cfg.seq_len


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats, computed in fp32."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())
