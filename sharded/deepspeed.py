"""DeepSpeed configs, read as what they mean in sharded: `from_deepspeed_config`.

    plan = sharded.from_deepspeed_config("ds_config.json", world_size=2)
    step = plan(train_step)                       # the transforms the config asks for
    state = step.init(sharded.TrainState.create(params, plan.optimizer))
    plan.micro_batch, plan.accumulate, plan.global_batch

Every key is one of: mapped (README's table says to what), engine-only (it tunes
DeepSpeed's own engine, which sharded does not need: accepted, with a one-line note in
`plan.notes`), or refused with a ValueError naming the key and what to use instead.
"auto" values (as Hugging Face's Trainer writes them) take what `auto` gives
(`auto={"lr": 3e-4, "micro_batch": 8, "total_steps": 1000, ...}`) or sharded's default,
with a note.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from sharded import optim
from sharded.step import Step, TransformSpec

__all__ = ["DeepSpeedPlan", "from_deepspeed_config"]

# Keys that only tune DeepSpeed's engine: what sharded always does, or has no use for.
_ENGINE_ONLY = {
    "steps_per_print": "progress is the train command's --log-every",
    "wall_clock_breakdown": "step.explain() and the benchmarks' profiles show where time goes",
    "dump_state": "print(step.explain()) shows the transforms and the layout",
    "prescale_gradients": "grads are pre-scaled by 1/N in the copy into each bucket",
    "gradient_predivide_factor": "grads are pre-scaled by 1/N in the copy into each bucket",
    "sparse_gradients": "grads are dense",
    "communication_data_type": "the reduction runs in the grads' dtype (mixed_precision's for ZeRO-3)",
    "zero_allow_untested_optimizer": "any sharded.optim optimizer runs under ZeRO",
    "memory_breakdown": "`sharded estimate` gives the per-rank memory",
    "flops_profiler": "the train command reports tokens/s and MFU",
    "tensorboard": "metrics go to metrics.jsonl",
    "wandb": "metrics go to metrics.jsonl",
    "csv_monitor": "metrics go to metrics.jsonl",
}
_ZERO_ENGINE_ONLY = {
    "overlap_comm": "sharded always overlaps the grads' reduction with backward",
    "contiguous_gradients": "grads are always copied into contiguous buckets",
    "reduce_scatter": "ZeRO-2/3 always reduce-scatter",
    "round_robin_gradients": "each rank's chunks are contiguous already",
    "allgather_partitions": "ZeRO always all-gathers the updated chunks",
    "allgather_bucket_size": "one bucket size serves both (reduce_bucket_size)",
    "load_from_fp32_weights": "checkpoints hold the fp32 masters",
    "elastic_checkpoint": "checkpoints load under any world size and stage",
    "stage3_max_live_parameters": "stage 3 holds one block (plus prefetch) at a time",
    "stage3_max_reuse_distance": "stage 3 frees each block after use",
    "stage3_prefetch_bucket_size": "stage 3 prefetches whole blocks (shard_zero(prefetch=...))",
    "stage3_param_persistence_threshold": "stage 3 gathers whole blocks",
    "stage3_gather_16bit_weights_on_model_save": "step.gather_params(state) gives the whole params",
    "sub_group_size": "the optimizer runs on each rank's chunks in one fused pass",
    "memory_efficient_linear": "stage 3 gathers per block, not per linear",
}


@dataclasses.dataclass(frozen=True)
class DeepSpeedPlan:
    """What a DeepSpeed config means: the transforms (outermost first), the optimizer
    (schedule and clipping included), the batch sizes, and notes on engine-only keys."""

    transforms: tuple[TransformSpec, ...]
    optimizer: optim.GradientTransformation
    micro_batch: int  # sequences per rank per micro-batch
    accumulate: int
    global_batch: int
    notes: tuple[str, ...] = ()
    schedule: Any = None  # the learning rate: a float or a schedule of the update count (what the optimizer applies)

    def __call__(self, train_step: Callable) -> Step:
        step = train_step
        for spec in reversed(self.transforms):
            step = spec(step)
        return step if isinstance(step, Step) else Step(step)


def _load(config: str | os.PathLike | Mapping) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"DeepSpeed config {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {path} is not JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None


class _Reader:
    """Reads keys off a config section, resolving "auto", and remembers what it read."""

    def __init__(self, section: Mapping, where: str, auto: Mapping, notes: list[str]):
        self.section, self.where, self.auto, self.notes, self.read = dict(section), where, auto, notes, set()

    def get(self, key: str, default: Any = None, auto_key: str | None = None) -> Any:
        self.read.add(key)
        value = self.section.get(key, default)
        if value == "auto":
            name = auto_key or key
            if name in self.auto:
                return self.auto[name]
            self.notes.append(f'{self.where}{key} is "auto": sharded\'s default {default!r} (pass auto={{"{name}": ...}} to choose)')
            return default
        return value

    def rest(self) -> list[str]:
        return [k for k in self.section if k not in self.read]


def from_deepspeed_config(config: str | os.PathLike | Mapping, world_size: int | None = None, auto: Mapping | None = None) -> DeepSpeedPlan:
    """The transforms, optimizer and batch sizes a DeepSpeed config means, on `world_size`
    data-parallel ranks (default: this job's). Raises ValueError on a key sharded does not
    support, naming it and what to use instead."""
    from sharded import distributed
    from sharded.transforms import accumulate, compress_grads, data_parallel, mixed_precision, offload, remat, shard_zero

    cfg, auto, notes = _load(config), dict(auto or {}), []
    world = world_size or distributed.world_size()
    top = _Reader(cfg, "", auto, notes)
    micro, accum, batch = _batch_sizes(top, world)
    transforms: list[TransformSpec] = []

    fp16, bf16 = _Reader(top.get("fp16", {}) or {}, "fp16.", auto, notes), _Reader(top.get("bf16", {}) or {}, "bf16.", auto, notes)
    top.get("amp")
    if "amp" in cfg and (cfg["amp"] or {}).get("enabled"):
        raise ValueError('DeepSpeed config: "amp" (NVIDIA Apex) is not supported; use "bf16": {"enabled": true} or "fp16": {"enabled": true}')
    if fp16.get("enabled", False, "fp16") and bf16.get("enabled", False, "bf16"):
        raise ValueError('DeepSpeed config: "fp16" and "bf16" are both enabled; enable one')
    if fp16.get("enabled", False, "fp16"):
        if fp16.get("loss_scale", 0):
            raise ValueError("DeepSpeed config: fp16.loss_scale (a static loss scale) is not supported; set it to 0 for dynamic loss scaling")
        transforms.append(mixed_precision(
            "fp16", init_scale=2.0 ** fp16.get("initial_scale_power", 16), growth_interval=fp16.get("loss_scale_window", 1000),
            hysteresis=fp16.get("hysteresis", 2), min_scale=float(fp16.get("min_loss_scale", 1)),
        ))
        if fp16.get("consecutive_hysteresis", False) is False:
            notes.append("fp16.hysteresis: sharded refills it after every clean step (DeepSpeed's consecutive_hysteresis: true)")
        if fp16.get("auto_cast", None) is not None:
            notes.append("fp16.auto_cast: mixed_precision always runs the forward under autocast")
    elif bf16.get("enabled", False, "bf16"):
        transforms.append(mixed_precision("bf16", autocast=False))  # DeepSpeed runs the model in bf16, no autocast (decision 41)
    for section in (fp16, bf16):
        if section.rest():
            raise ValueError(f"DeepSpeed config: {section.where}{section.rest()[0]} is not supported; remove it")

    zero = _Reader(top.get("zero_optimization", {}) or {}, "zero_optimization.", auto, notes)
    stage = int(zero.get("stage", 0))
    bucket = zero.get("reduce_bucket_size", None, "reduce_bucket_size")
    bucket_mb = {} if bucket is None else {"bucket_mb": max(float(bucket) * 4 / 2**20, 1e-6)}
    offloaded = {}  # offload_optimizer / offload_param -> its device
    nvme_path = None
    for key in ("offload_optimizer", "offload_param"):
        section = zero.get(key, {}) or {}
        device = section.get("device", "none")
        if device == "nvme":
            path = section.get("nvme_path")
            if path is None:
                raise ValueError(f'DeepSpeed config: zero_optimization.{key}.device "nvme" needs "nvme_path": a directory on local NVMe')
            if nvme_path is not None and path != nvme_path:
                notes.append(f"zero_optimization.{key}.nvme_path: the params go to offload_optimizer's nvme_path ({nvme_path}), in each rank's one swap file beside the moments")
            nvme_path = nvme_path or path
        if device in ("cpu", "nvme"):
            offloaded[key] = device
            for extra in sorted(set(section) - {"device", "nvme_path"}):
                notes.append(f"zero_optimization.{key}.{extra}: offload pins and stages host memory itself (host_buffer_gb for nvme); DeepSpeed's engine reads this key")
        elif device not in (None, "none"):
            raise ValueError(f'DeepSpeed config: zero_optimization.{key}.device "{device}" is not one offload has; use "cpu", "nvme" or "none"')
    if "offload_param" in offloaded and (stage != 3 or offloaded.get("offload_optimizer") != offloaded["offload_param"]):
        raise ValueError(
            'DeepSpeed config: zero_optimization.offload_param needs stage 3 and offload_optimizer on the same device ("cpu" or "nvme"): '
            "offload(params=True) keeps ZeRO-3's chunks beside the optimizer state; set both, or remove offload_param"
        )
    for key, why in _ZERO_ENGINE_ONLY.items():
        if key in zero.section:
            zero.get(key)
            notes.append(f"zero_optimization.{key}: {why}")
    if zero.rest():
        raise ValueError(f"DeepSpeed config: zero_optimization.{zero.rest()[0]} is not supported; remove it (README's DeepSpeed table lists what is)")
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"DeepSpeed config: zero_optimization.stage must be 0-3; got {stage!r}")

    optimizer, compressed, schedule = _optimizer(top, auto, notes)
    if compressed:
        transforms.insert(0, compress_grads(method="onebit"))
    transforms.insert(1 if compressed else 0, shard_zero(stage=stage, **bucket_mb) if stage else data_parallel(**bucket_mb))
    if nvme_path is not None:
        transforms.insert(0, offload(tier="nvme", path=nvme_path, **({"params": True} if "offload_param" in offloaded else {})))
    elif offloaded:
        transforms.insert(0, offload(tier="cpu", params="offload_param" in offloaded))
    if accum > 1:
        transforms.append(accumulate(steps=accum))
    checkpointing = top.get("activation_checkpointing", None)
    if checkpointing is not None:
        for key in ("cpu_checkpointing", "partition_activations"):
            if checkpointing.get(key):
                raise ValueError(f"DeepSpeed config: activation_checkpointing.{key} is not supported; remove it (remat keeps each block's inputs on the device)")
        transforms.append(remat("full"))
    for key, why in _ENGINE_ONLY.items():
        if key in cfg:
            top.get(key)
            notes.append(f"{key}: {why}")
    if top.rest():
        key = top.rest()[0]
        raise ValueError(f"DeepSpeed config: {key!r} is not supported by sharded (README's DeepSpeed table lists what is); remove it")
    return DeepSpeedPlan(tuple(transforms), optimizer, micro, accum, batch, tuple(notes), schedule)


def _batch_sizes(top: _Reader, world: int) -> tuple[int, int, int]:
    """DeepSpeed's rule: train_batch_size = micro_batch_per_gpu * gradient_accumulation_steps * world_size."""
    batch = top.get("train_batch_size", None, "global_batch")
    micro = top.get("train_micro_batch_size_per_gpu", None, "micro_batch")
    accum = top.get("gradient_accumulation_steps", None, "accumulate")
    if batch is None and micro is None:
        raise ValueError("DeepSpeed config: give train_batch_size or train_micro_batch_size_per_gpu")
    if batch is not None and micro is not None and accum is not None:
        if batch != micro * accum * world:
            raise ValueError(
                "Check batch related parameters. train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * "
                f"world_size {batch} != {micro} * {accum} * {world}"
            )
    elif batch is not None and micro is not None:
        accum = batch // (micro * world)
    elif batch is not None:
        accum = accum or 1
        micro = batch // (accum * world)
    else:
        accum = accum or 1
    batch = micro * accum * world if batch is None else batch
    if micro < 1 or accum < 1 or micro * accum * world != batch:
        raise ValueError(
            f"DeepSpeed config: train_batch_size {batch} does not split into micro_batch_per_gpu * gradient_acc_step * world_size "
            f"with {world} ranks (micro {micro}, accumulation {accum}); make it a multiple of {accum * world}"
        )
    return int(micro), int(accum), int(batch)


def _optimizer(top: _Reader, auto: Mapping, notes: list[str]) -> tuple[optim.GradientTransformation, bool, Any]:
    """The optimizer (schedule and clipping in it), whether it is 1-bit Adam, and its schedule."""
    spec = top.get("optimizer", {"type": "AdamW", "params": {}})
    kind = str(spec.get("type", "")).lower()
    p = _Reader(spec.get("params", {}) or {}, "optimizer.params.", auto, notes)
    lr = p.get("lr", 1e-3, "lr")
    b1, b2 = p.get("betas", (0.9, 0.999), "betas")
    eps, wd = p.get("eps", 1e-8, "eps"), p.get("weight_decay", 0.0, "weight_decay")
    schedule = _schedule(top, lr, auto, notes)
    if kind in ("adam", "adamw", "fusedadam"):
        if kind == "adam" and p.get("adam_w_mode", True) is False:
            raise ValueError("DeepSpeed config: optimizer Adam with adam_w_mode false (L2 in the grads) is not supported; use AdamW")
        if p.get("amsgrad", False):
            raise ValueError("DeepSpeed config: optimizer.params.amsgrad is not supported by sharded.optim.adamw; remove it")
        if p.get("torch_adam", None) is not None:
            notes.append("optimizer.params.torch_adam: sharded's AdamW is its own fused kernel")
        tx, compressed = optim.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd), False
    elif kind == "onebitadam":
        freeze = int(p.get("freeze_step", 100000))
        for key in ("cuda_aware", "comm_backend_name"):
            if p.get(key, None) is not None:
                notes.append(f"optimizer.params.{key}: the compressed exchange goes through torch.distributed's backend")
        clip = top.get("gradient_clipping", 0.0, "max_grad_norm")  # 1-bit Adam clips during its warmup only
        tx = optim.onebit_adam(schedule, warmup_steps=freeze, b1=b1, b2=b2, eps=eps, weight_decay=wd, max_grad_norm=float(clip) if clip else None)
        compressed = True
    elif kind == "zerooneadam":
        raise ValueError("DeepSpeed config: optimizer ZeroOneAdam (0/1 Adam) is not built (docs/decisions.md, decision 35); use OneBitAdam")
    elif kind in ("lamb", "onebitlamb"):
        raise ValueError(f"DeepSpeed config: optimizer {spec.get('type')} is not in sharded.optim; use AdamW (or OneBitAdam)")
    else:
        raise ValueError(f"DeepSpeed config: optimizer type {spec.get('type')!r} is not supported; use AdamW, Adam or OneBitAdam")
    if p.rest():
        raise ValueError(f"DeepSpeed config: optimizer.params.{p.rest()[0]} is not supported; remove it")
    clip = top.get("gradient_clipping", 0.0, "max_grad_norm")
    if clip and not compressed:
        tx = optim.chain(optim.clip_by_global_norm(float(clip)), tx)
    return tx, compressed, schedule


def _schedule(top: _Reader, lr: float, auto: Mapping, notes: list[str]) -> Any:
    spec = top.get("scheduler", None)
    if spec is None:
        return lr
    kind = spec.get("type")
    p = _Reader(spec.get("params", {}) or {}, "scheduler.params.", auto, notes)
    low, high = p.get("warmup_min_lr", 0.0, "warmup_min_lr"), p.get("warmup_max_lr", lr, "lr")
    warmup = int(p.get("warmup_num_steps", 1000, "warmup_steps"))
    log = p.get("warmup_type", "log") == "log"
    if kind == "WarmupLR":
        out = _warmup(low, high, warmup, log, after=lambda c: torch.full_like(c, high))
    elif kind == "WarmupDecayLR":
        total = int(p.get("total_num_steps", None, "total_steps"))
        out = _warmup(low, high, warmup, log, after=lambda c: high * torch.clamp((total - c) / max(total - warmup, 1), min=0.0))
    elif kind == "WarmupCosineLR":
        total = int(p.get("total_num_steps", None, "total_steps"))
        start, end = p.get("warmup_min_ratio", 0.0) * lr, p.get("cos_min_ratio", 0.0001) * lr
        out = optim.schedules.warmup_cosine(lr, min(warmup, total), total, end=end, init=start)
    else:
        raise ValueError(f"DeepSpeed config: scheduler {kind!r} is not supported; use WarmupLR, WarmupDecayLR or WarmupCosineLR")
    if p.rest():
        raise ValueError(f"DeepSpeed config: scheduler.params.{p.rest()[0]} is not supported; remove it")
    return out


def _warmup(low: float, high: float, steps: int, log: bool, after: Callable) -> Any:
    """DeepSpeed's warmup: from `low` to `high` over `steps` (log-shaped by default), then `after`."""

    def schedule(count: torch.Tensor) -> torch.Tensor:
        c = count.float()
        frac = torch.log1p(c) / math.log(max(steps, 2)) if log else c / max(steps, 1)
        warm = low + (high - low) * torch.clamp(frac, max=1.0)
        return torch.where(c < steps, warm, after(c))

    return schedule
