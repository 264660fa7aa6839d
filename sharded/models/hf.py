"""Hugging Face causal LMs from a local directory, and back: what `sharded train --model DIR` uses.

    module = load_causal_lm("my-llama/")      # config.json (+ *.safetensors, else a fresh init)
    model = sharded.trace(module)               # blocks: the decoder layers, found as usual
    logits = logits_of(model.apply(params, x))
    export(module, params, "out/hf")            # AutoModelForCausalLM.from_pretrained loads it

transformers is optional: these raise an ImportError naming it when it is missing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["load_causal_lm", "logits_of", "export", "max_positions", "vocab_size"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ImportError("--model DIR loads a Hugging Face model: pip install transformers") from None
    return transformers


def _config(path: Path) -> Any:
    if not (path / "config.json").exists():
        raise ValueError(f"--model {path}: no config.json there; give a directory written by save_pretrained (config.json + *.safetensors)")
    return _transformers().AutoConfig.from_pretrained(path)


def vocab_size(path: str | Path) -> int:
    return _config(Path(path)).vocab_size


def load_causal_lm(path: str | Path) -> nn.Module:
    """The causal LM in `path`: its weights if the directory has safetensors files, else
    a fresh init from its config; in training mode (dropout as the config says), which
    `from_pretrained` alone would leave off."""
    transformers, path = _transformers(), Path(path)
    config = _config(path)
    if any(path.glob("*.safetensors")):
        return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).train()
    return transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).train()


def training_kwargs(module: nn.Module) -> dict:
    """Keyword arguments for a training forward: a Hugging Face model's KV cache off, as
    its Trainer does (the cache would change between a block's forward and its
    recomputation under remat); nothing for other models."""
    return {"use_cache": False} if hasattr(getattr(module, "config", None), "use_cache") else {}


def logits_of(output: Any) -> torch.Tensor:
    """A model's logits: the tensor itself, or a Hugging Face output's `.logits`."""
    return output if isinstance(output, torch.Tensor) else output.logits


def max_positions(module: nn.Module) -> int | None:
    config = getattr(module, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def export(module: nn.Module, params: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write `params` (whole, by state_dict names) with the module's config as a directory
    that `AutoModelForCausalLM.from_pretrained` loads (config.json + model.safetensors)."""
    module.save_pretrained(str(path), state_dict={k: v.detach().contiguous().cpu() for k, v in params.items()}, safe_serialization=True)
