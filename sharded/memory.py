"""`estimate_memory`: per-rank bytes of model state under ZeRO, and an activation estimate.

Model state follows the ZeRO paper: with Ψ params of b bytes and K optimizer bytes per
param, one replica holds Ψ·b (params) + Ψ·b (grads) + Ψ·K (optimizer state); stage 1
divides the optimizer state by N ranks, stage 2 also the grads, stage 3 also the
params. Here stage 1 reduce-scatters its grads as stage 2 does (its update reads only
its chunk: decision 39), so its grads are divided too. We count exactly what `shard_zero` allocates: each leaf's chunk is
ceil(numel / N) elements (rank 0's, the largest), so padding is included. The
activation figure is Korthikanti et al.'s 34·s·b·h bytes per transformer layer in
16-bit (attention scores not materialised, as with SDPA), scaled to the compute dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from sharded.swap import DEFAULT_HOST_BUFFER_GB

__all__ = ["MemoryEstimate", "estimate_memory", "OPTIMIZER_STATES"]

#: fp32 tensors of optimizer state per param.
OPTIMIZER_STATES = {"sgd": 0, "sgd_momentum": 1, "lion": 1, "adamw": 2}


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank: on the compute device (params, grads, optimizer, activations) and,
    under offload, in host memory (`host`: the state offload keeps there and its copies
    of this rank's grads and params)."""

    params: int
    grads: int
    optimizer: int
    activations: int | None = None
    host: int = 0
    disk: int = 0  # offload's nvme tier: this rank's swap file

    @property
    def model_state(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.model_state + (self.activations or 0)

    def __str__(self) -> str:
        rows = [("params", self.params), ("grads", self.grads), ("optimizer", self.optimizer)]
        if self.activations is not None:
            rows.append(("activations", self.activations))
        rows.append(("total", self.total))
        if self.host:
            rows.append(("host", self.host))
        if self.disk:
            rows.append(("disk", self.disk))
        return "\n".join(f"{name:<12}{n / 2**30:10.3f} GiB" for name, n in rows)


def estimate_memory(
    model: Any,
    stage: int = 0,
    world_size: int = 1,
    optimizer: str = "adamw",
    param_dtype: torch.dtype = torch.float32,
    batch_size: int | None = None,
    seq_len: int | None = None,
    offload: str | None = None,
    offload_params: bool = False,
    host_buffer_gb: float | None = None,
    tp: int = 1,
    offload_update: str = "host",
) -> MemoryEstimate:
    """Per-rank bytes for `model` (a `sharded.Model`) under `shard_zero(stage)` on
    `world_size` dp ranks (stage 0: plain data parallelism).

    `batch_size` (per rank, per micro-batch) and `seq_len` add the activation estimate
    for models with a GPT-style `cfg` (n_layers, d_model). `offload="cpu"` moves the
    optimizer state to `host`, with the host copies of this rank's grads and params that
    the update runs on. `offload_params=True` (stage 3 only) moves this rank's param
    chunks there too: the device keeps only the blocks gathered at the moment, which,
    as for stage 3 without it, are not counted, and the grads leave it group by group
    as backward reduces them (not under a loss scaler, which keeps them until the update). `offload="nvme"` puts the optimizer
    state in `disk` (this rank's swap file) and its staging buffers (`host_buffer_gb`,
    offload's default if None) in `host`; with `offload_params=True` the param chunks
    go to `disk` too, and the grads stay on the device until the update. With
    `offload_update="device"` (offload("cpu", params=True, update="device")) the update
    streams the state through the device: the grads stay there, with no host copies. `tp` divides
    the params `tensor_parallel`'s built-in plan slices (the rest, norms and position
    embeddings, stay whole on every tp rank) before ZeRO cuts them over dp.
    """
    if offload not in (None, "cpu", "nvme"):
        raise ValueError(f"estimate_memory(offload=...) is None, 'cpu' or 'nvme' (offload's tiers); got {offload!r}")
    if offload_params and (offload is None or stage != 3):
        raise ValueError("estimate_memory(offload_params=True) needs offload='cpu' or 'nvme' and stage=3 (the chunks ZeRO-3 fetches per block)")
    if offload_update not in ("host", "device") or (offload_update == "device" and not (offload == "cpu" and offload_params)):
        raise ValueError(f"estimate_memory(offload_update={offload_update!r}) is 'host', or 'device' with offload='cpu' and offload_params=True")
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"estimate_memory(stage=...) must be 0 (no ZeRO), 1, 2 or 3; got {stage!r}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZER_STATES)}")
    if not (isinstance(tp, int) and tp >= 1):
        raise ValueError(f"estimate_memory(tp=...) is the tensor-parallel size, an int >= 1; got {tp!r}")
    sliced = set()
    if tp > 1:
        from sharded.transforms.tensor_parallel import sliced_params

        sliced = sliced_params(model)
    numels = [p.numel() // (tp if name in sliced else 1) for name, p in model.params.items() if p.is_floating_point()]

    def elements(sharded: bool) -> int:
        return sum(-(-n // world_size) if sharded and world_size > 1 else n for n in numels)

    b = torch.empty((), dtype=param_dtype).element_size()
    master = 4 if b < 4 else 0  # fp32 master weights kept beside low-precision params
    activations = None
    cfg = getattr(model.module, "cfg", None)
    if batch_size is not None and seq_len is not None and cfg is not None:
        activations = int(cfg.n_layers * 34 * seq_len * batch_size * cfg.d_model * b / 2)
    optimizer_bytes = elements(stage >= 1) * (4 * OPTIMIZER_STATES[optimizer] + master)
    params_bytes = elements(stage >= 3) * b
    if offload == "nvme":
        buffers = int((host_buffer_gb or DEFAULT_HOST_BUFFER_GB) * 2**30) // 2 * 2  # two staging sets
        return MemoryEstimate(
            params=0 if offload_params else params_bytes, grads=elements(stage >= 1) * b, optimizer=0, activations=activations,
            host=buffers, disk=optimizer_bytes + (params_bytes if offload_params else 0),
        )
    streamed = offload_update == "device"
    copies = 0 if streamed else 1 if offload_params else 2  # the update's host copies of grads (and params, unless they live there)
    staging = copies * elements(stage >= 1) * b if offload else 0
    return MemoryEstimate(
        params=0 if offload_params else params_bytes,
        grads=0 if offload_params and not streamed else elements(stage >= 1) * b,  # host update: to the host as backward reduces them
        optimizer=0 if offload else optimizer_bytes,
        activations=activations,
        host=optimizer_bytes + staging + (params_bytes if offload_params else 0) if offload else 0,
    )
