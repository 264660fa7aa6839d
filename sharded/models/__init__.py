"""Reference models: what the main job trains and the benchmarks measure."""
from sharded.models.gpt import GPT, PRESETS, GPTConfig, flops_per_token, loss_fn

__all__ = ["GPT", "GPTConfig", "PRESETS", "flops_per_token", "loss_fn"]
