"""The main job: train a GPT with a stack of transforms, using only the public API.

`sharded train` runs `main(TrainConfig(...))`; it is also the example to copy. On each
rank: build the model from a seed, trace it, compose the step, loop over the embedded
corpus with a progress bar, log loss / tokens/s / memory per rank, end with an eval of
held-out loss against the unigram baseline, and write a checkpoint (loadable under any
transforms) and the weights as safetensors.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import re
import resource
import sys
import time
import warnings
from typing import Any, Callable
from pathlib import Path

import torch
from tqdm import tqdm

import sharded
from sharded import distributed
from sharded.data import Corpus
from sharded.token_data import TokenData
from sharded.models import GPT, GPTConfig, flops_per_token, hf, loss_fn

__all__ = ["TrainConfig", "main", "run_rank"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    preset: str = "tiny"
    untied: bool = False  # the preset with its own head (not tied to the embedding), as the standard benchmarks run it
    nproc: int = 2
    device: str = "auto"
    steps: int = 300
    batch_size: int = 32  # global, in sequences
    seq_len: int | None = None  # default: the preset's
    accumulate: int = 2
    data_parallel: bool = True
    zero: int = 0  # shard_zero stage in place of data_parallel (0: off)
    pp: int = 1  # pipeline stages (the mesh is pp × dp × tp; micro-batches are --accumulate's)
    tp: int = 1  # tensor-parallel ranks: each holds a slice of every weight (Megatron's layout)
    loss_parallel: bool = False  # with tp > 1: the loss over logits sharded by vocabulary (no rank holds all of them)
    precision: str = "fp32"  # or "bf16" / "fp16": mixed_precision around the step
    remat: str = "none"  # or "full" / "selective": activation checkpointing per block
    compile: str = "none"  # or a torch.compile backend ("inductor"): the forward compiled (one graph on one GPU, else block by block)
    compress: str = "none"  # or "onebit": 1-bit Adam (compress_grads + onebit_adam)
    compress_warmup: float = 0.15  # the fraction of the steps before 1-bit Adam compresses
    offload: str = "none"  # "cpu": the optimizer state in host memory; "nvme": in files on local disk; the update on the host
    offload_params: bool = False  # with offload="cpu"|"nvme" and zero=3: the param chunks in host memory or the swap file too, fetched per block
    offload_path: str | None = None  # with offload="nvme": the directory for the swap files
    host_buffer_gb: float | None = None  # with offload="nvme": the host memory the update stages the state through
    offload_only: str | None = None  # with offload="cpu": a regex; only the params whose names it finds have their state moved
    offload_update: str = "host"  # or "device", with offload="cpu" and offload_params: each block's state streamed through the GPU for its update
    data: str | None = None  # a text file, or a token file (.bin uint16 / .npy), instead of the embedded corpus
    data_dtype: str = "uint16"  # a .bin token file's ids: "uint16" (nanoGPT's) or "uint32" (vocabularies past 65,536)
    tokenizer: str | None = None  # a local Hugging Face tokenizer for a text --data (default: bytes)
    model: str | None = None  # a Hugging Face causal LM's directory (config.json, + safetensors weights) instead of --preset
    config: str | None = None  # a DeepSpeed config (JSON): its batch sizes, precision, ZeRO, optimizer decide
    resume: str | None = None  # a checkpoint directory (a run's out/checkpoint): continue from its step to --steps
    stop_at: int | None = None  # end this run after this step, checkpointed (a job's time limit); the schedule is still --steps'
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # the global grad norm's limit (0: no clipping)
    log_every: int = 10
    eval_batches: int = 8
    eval_every: int | None = None  # also evaluate every N steps (the val loss goes in metrics.jsonl)
    progress: str = "auto"  # "bar" (a terminal, a notebook), "lines" (a log file: one per log step); auto: by stderr
    seed: int = 0  # the corpus, its batches and (unless init_seed) the model's init
    init_seed: int | None = None  # the model's init alone: same data, another init
    out: str = "runs/latest"


def make_step(model: sharded.Model, cfg: TrainConfig):
    """The user's step, then the transforms (any nesting is sorted into the canonical
    order; this one is it, innermost first):

    0. compile (if asked): the forward compiled, whole on one GPU, else each block's, inside everything else;
       mixed_precision (if asked): it only changes how each forward runs;
    1. remat (if asked): each block keeps only its inputs through the forward;
    2. accumulate: micro-batches inside each rank; with pp > 1, pipeline instead, whose
       schedule runs the micro-batches through the stages;
    3. tensor_parallel (if --tp > 1): each rank's slices of the weights;
       data_parallel, or shard_zero(stage=cfg.zero): outside them, so grads are
       reduced once per update, overlapped with the last micro-batch's backward;
    4. compress_grads (if asked): that reduction, compressed after the warmup;
    5. offload (if asked): the optimizer state on the host, the update run there.
    """

    kwargs = hf.training_kwargs(model.module)

    def loss(params, batch):
        inputs, targets = batch
        return loss_fn(hf.logits_of(model.apply(params, inputs, **kwargs)), targets)

    def train_step(state, batch):
        value, grads = sharded.value_and_grad(loss)(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    step = train_step
    if cfg.compile != "none":
        step = sharded.compile(backend=cfg.compile)(step)
    if cfg.config is not None:  # the DeepSpeed config decides the other transforms
        return _deepspeed_plan(cfg)(step)
    if cfg.precision != "fp32":
        step = sharded.mixed_precision(cfg.precision)(step)
    if cfg.remat != "none":
        step = sharded.remat(policy=cfg.remat)(step)
    if cfg.pp > 1:
        step = sharded.pipeline(stages=cfg.pp, microbatches=cfg.accumulate)(step)
    elif cfg.accumulate > 1:
        step = sharded.accumulate(steps=cfg.accumulate)(step)
    if cfg.tp > 1:
        step = sharded.tensor_parallel(loss_parallel=cfg.loss_parallel)(step)
    dp = sharded.Mesh.current().size("dp")
    if cfg.zero:
        step = sharded.shard_zero(stage=cfg.zero)(step)
    elif cfg.data_parallel and (dp > 1 or cfg.pp == 1):
        step = sharded.data_parallel(step)
    if cfg.compress == "onebit":
        step = sharded.compress_grads(method="onebit")(step)
    if cfg.offload != "none":
        disk = {"path": cfg.offload_path, "host_buffer_gb": cfg.host_buffer_gb} if cfg.offload == "nvme" else {}
        only = {"where": _matching(cfg.offload_only)} if cfg.offload_only else {}
        step = sharded.offload(tier=cfg.offload, params=cfg.offload_params, update=cfg.offload_update, **disk, **only)(step)
    return sharded.Step(step) if not isinstance(step, sharded.Step) else step


def _deepspeed_plan(cfg: TrainConfig) -> sharded.deepspeed.DeepSpeedPlan:
    """The config's plan, on this job's dp ranks, its "auto" values from the train flags."""
    auto = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "total_steps": cfg.steps, "warmup_steps": cfg.warmup, "max_grad_norm": 1.0}
    return sharded.from_deepspeed_config(cfg.config, world_size=sharded.Mesh.current().size("dp"), auto=auto)


def _memory_mb(state, device: torch.device) -> dict:
    mem = {"state_mb": sharded.tree.tree_bytes(state) / 2**20}
    if device.type == "cuda":
        mem["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        mem["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    return mem


@torch.no_grad()
def evaluate(model: sharded.Model, params, corpus: Corpus, cfg: TrainConfig, seq_len: int, device) -> float:
    """The mean loss over `eval_batches` val batches, in eval mode (no dropout, no RNG drawn)."""
    losses, training = [], model.module.training
    model.module.eval()
    with torch.no_grad():
        for i, (x, y) in enumerate(corpus.batches("val", cfg.batch_size, seq_len, seed=cfg.seed)):
            if i == cfg.eval_batches:
                break
            losses.append(loss_fn(hf.logits_of(model.apply(params, x.to(device), **hf.training_kwargs(model.module))), y.to(device)).item())
    model.module.train(training)
    return sum(losses) / len(losses)


def _save_rng(checkpoint: Path) -> None:
    """This rank's RNG states (dropout draws from them) beside the state, written
    atomically: `checkpoint/rng/rank<r>.pt`, one per rank."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    folder = checkpoint / "rng"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".rank{distributed.rank()}.pt.tmp"
    torch.save(states, tmp)
    os.replace(tmp, folder / f"rank{distributed.rank()}.pt")


def _freeze_heap() -> None:
    """After the first step (compiled graphs, buckets, tables built), move every object
    alive to the collector's permanent generation: a full collection then scans only
    what later steps allocate. After an inductor compile a full collection of the heap
    stalled a step for 0.2-0.3 s every ~100 steps (CPU, 24-block GPT); a stall on one
    rank is a stall on all of them, at its next collective."""
    gc.collect()
    gc.freeze()


def _restore_rng(checkpoint: Path) -> None:
    """This rank's RNG states from `_save_rng`, when the checkpoint has one per rank of
    this job; otherwise (another world size, or an older checkpoint) a warning: dropout's
    draws then differ from the uninterrupted run's."""
    files = sorted((checkpoint / "rng").glob("rank*.pt"))
    if len(files) != distributed.world_size():
        if distributed.rank() == 0:
            warnings.warn(f"--resume {checkpoint}: RNG states of {len(files)} rank(s) for {distributed.world_size()}; not restored, so dropout draws differ from the uninterrupted run", stacklevel=2)
        return
    states = torch.load(checkpoint / "rng" / f"rank{distributed.rank()}.pt", weights_only=True)
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def run_rank(cfg: TrainConfig) -> dict:
    """One rank's training loop; returns the summary (rank 0's is what `main` prints)."""
    distributed.init()
    if cfg.pp > 1 or cfg.tp > 1:
        sharded.Mesh.set_current(sharded.Mesh(pp=cfg.pp, tp=cfg.tp))
    rank, device = distributed.rank(), distributed.device()
    corpus = _data(cfg)
    torch.manual_seed(cfg.seed if cfg.init_seed is None else cfg.init_seed)
    if cfg.model is not None:  # the user's Hugging Face model
        module = hf.load_causal_lm(cfg.model).to(device)
        seq_len = cfg.seq_len or min(128, hf.max_positions(module) or 128)
        flops = 6 * sum(p.numel() for p in module.parameters())
    else:
        vocab = -(-corpus.vocab_size // cfg.tp) * cfg.tp  # padded for --tp, as Megatron pads it; the extra ids never occur
        gcfg = GPTConfig.preset(cfg.preset, vocab_size=vocab, tied=not cfg.untied)
        seq_len = cfg.seq_len or gcfg.seq_len
        gcfg = dataclasses.replace(gcfg, seq_len=seq_len)
        module, flops = GPT(gcfg).to(device), flops_per_token(gcfg)
    model = sharded.trace(module)
    schedule = sharded.optim.schedules.warmup_cosine(cfg.lr, min(cfg.warmup, cfg.steps), cfg.steps, end=cfg.lr / 10)
    if cfg.config is not None:
        plan = _deepspeed_plan(cfg)
        cfg, tx, schedule = dataclasses.replace(cfg, batch_size=plan.global_batch), plan.optimizer, plan.schedule
        if rank == 0:
            print("\n".join([f"{cfg.config}: {', '.join(map(repr, plan.transforms))}; {plan.micro_batch} sequences per rank per micro-batch"] + [f"  note: {n}" for n in plan.notes]))
    elif cfg.compress == "onebit":
        warmup = max(1, round(cfg.compress_warmup * cfg.steps))
        tx = sharded.optim.onebit_adam(schedule, warmup_steps=warmup, weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip or None)
    else:
        tx = sharded.optim.adamw(schedule, weight_decay=cfg.weight_decay)
        tx = sharded.optim.chain(sharded.optim.clip_by_global_norm(cfg.grad_clip), tx) if cfg.grad_clip else tx
    step = make_step(model, cfg)
    on_host = cfg.offload != "none" and cfg.offload_only is None  # the optimizer state never lands on the device
    state = step.init(sharded.TrainState.create(model.params, tx, opt_device="cpu" if on_host else None))
    if rank == 0:
        print(step.explain(rank=0))

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = []
    tokens_per_step = cfg.batch_size * seq_len
    batches = corpus.batches("train", cfg.batch_size, seq_len, seed=cfg.seed)
    start = 0
    if cfg.resume is not None:  # the state, and the data's position (its step count: batches are a seeded sequence)
        state = sharded.checkpoint.load(cfg.resume, like=state)
        _restore_rng(Path(cfg.resume))
        start = int(state.step)
        for _ in range(start):
            next(batches)
    end = cfg.steps if cfg.stop_at is None else min(cfg.stop_at, cfg.steps)
    live = rank == 0 and cfg.progress == "bar"
    board = _tensorboard(out / "tensorboard") if rank == 0 else None
    bar = tqdm(range(start, end), disable=not live, desc="train", unit="step", mininterval=1.0)
    t0 = time.perf_counter()
    for i in bar:
        x, y = next(batches)
        state, metrics = step(state, (x.to(device), y.to(device)))
        if i == start:
            _freeze_heap()
        if (i + 1) % cfg.log_every == 0 or i + 1 == end:
            loss = metrics["loss"].item()  # syncs: only when logging
            dt = time.perf_counter() - t0
            mem = torch.tensor(list(_memory_mb(state, device).values()), dtype=torch.float64, device=device)
            per_rank = [mem.clone() for _ in range(distributed.world_size())]
            if distributed.world_size() > 1:
                torch.distributed.all_gather(per_rank, mem)
            tps = tokens_per_step * (i + 1 - start) / dt
            row = {
                "step": i + 1,
                "loss": loss,
                "tokens_per_s": tps,
                "mfu": tps * flops / peak_flops(device) if device.type == "cuda" else None,
                "lr": float(sharded.optim.transforms.learning_rate_at(schedule, torch.tensor(i))),
                "memory_mb_per_rank": [m.tolist() for m in per_rank],
                "memory_fields": list(_memory_mb(state, device)),
            }
            norm = _grad_norm(state)
            if norm is not None:
                row["grad_norm"] = norm
            if "loss_scale" in metrics:  # fp16's dynamic loss scale
                row["loss_scale"] = float(metrics["loss_scale"])
            if "swap_gbps" in metrics:  # offload's nvme tier: the last update's disk traffic
                row.update({k: metrics[k] for k in ("swap_read_gb", "swap_write_gb", "swap_gbps")})
            if cfg.eval_every is not None and (i + 1) % cfg.eval_every == 0:
                row["val_loss"] = evaluate(model, step.gather_params(state), corpus, cfg, seq_len, device)
            log.append(row)
            if board is not None:
                _write_scalars(board, row)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
            if rank == 0 and not live:
                val_text = f", val {row['val_loss']:.3f}" if "val_loss" in row else ""
                print(f"step {i + 1}/{end}: loss {loss:.3f}{val_text}, {tps:,.0f} tokens/s", flush=True)
    params = step.gather_params(state)  # the params only: the optimizer state stays sharded (decision 30)
    val = evaluate(model, params, corpus, cfg, seq_len, device)
    sharded.checkpoint.save(state, out / "checkpoint")  # resumable under any transforms
    _save_rng(out / "checkpoint")
    sharded.checkpoint.export_safetensors(params, out / "model.safetensors")
    if cfg.model is not None and rank == 0:  # a directory from_pretrained loads
        hf.export(model.module, params, out / "hf")
    baseline = corpus.unigram_entropy("val")
    summary = {
        "preset": cfg.preset,
        "params": model.num_params(),
        "world_size": distributed.world_size(),
        "val_loss": val,
        "unigram_entropy": baseline,
        "learned": val < baseline,
        "final_train_loss": log[-1]["loss"],
        "tokens_per_s": log[-1]["tokens_per_s"],
    }
    if rank == 0:
        _write_outputs(out, log, summary)
    if board is not None:
        board.close()
    return summary


def _grad_norm(state: Any) -> float | None:
    """The last update's global grad norm, as the optimizer's clipping measured it (over
    every rank's part under ZeRO and pipelines); None if the optimizer does not clip."""
    clips = sharded.optim.states_of(state.opt_state, sharded.optim.ClipState)
    return float(clips[0].norm) if clips else None


def _tensorboard(folder: Path) -> Any:
    """A TensorBoard writer into `folder` (OUT/tensorboard), or None with a note when the
    tensorboard package is not installed (`pip install sharded[tensorboard]`)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("note: no TensorBoard events (the tensorboard package is not installed: pip install 'sharded[tensorboard]'); metrics.jsonl has them all", flush=True)
        return None
    return SummaryWriter(str(folder))


def _write_scalars(board: Any, row: dict) -> None:
    """One log row as TensorBoard scalars at its step: loss, tokens/s, MFU, lr, grad
    norm, loss scale, val loss, and each rank's memory (MB) per field."""
    for key in ("loss", "val_loss", "tokens_per_s", "mfu", "lr", "grad_norm", "loss_scale"):
        if row.get(key) is not None:
            board.add_scalar(f"train/{key}", row[key], row["step"])
    for r, values in enumerate(row["memory_mb_per_rank"]):
        for field, value in zip(row["memory_fields"], values):
            board.add_scalar(f"memory_mb/{field}/rank{r}", value, row["step"])
    board.flush()


def peak_flops(device: torch.device) -> float:
    """Dense bf16 peak of the GPU (H100/H200 SXM: 989 TFLOP/s), for MFU."""
    name = torch.cuda.get_device_name(device)
    return 989e12 if ("H100" in name or "H200" in name) else float("nan")


def _write_outputs(out: Path, log: list[dict], summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "w") as f:
        for row in log:
            f.write(json.dumps(row) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], label="train loss")
    ax.axhline(summary["unigram_entropy"], ls="--", c="gray", label="unigram baseline")
    ax.axhline(summary["val_loss"], ls=":", c="C1", label=f"val loss {summary['val_loss']:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)


def _data(cfg: TrainConfig) -> Corpus | TokenData:
    """The embedded corpus, or the user's --data (its vocab: the model's, if --model)."""
    if cfg.data is None:
        return Corpus(seed=cfg.seed)
    vocab = hf.vocab_size(cfg.model) if cfg.model is not None else None
    return TokenData.from_path(cfg.data, tokenizer=cfg.tokenizer, vocab_size=vocab, dtype=cfg.data_dtype)


def _matching(pattern: str) -> Callable[[str, Any], bool]:
    """--offload-only's predicate: the params whose names the regex finds."""
    regex = re.compile(pattern)

    def matching(name: str, leaf: Any) -> bool:
        return regex.search(name) is not None

    matching.__name__ = f"matching({pattern!r})"
    return matching


def check(cfg: TrainConfig) -> None:
    """ValueError, in a line, for a configuration that cannot run: checked before any
    rank starts, so a mistake is one message rather than a traceback per rank."""
    world = int(os.environ.get("WORLD_SIZE", cfg.nproc))
    if cfg.offload == "nvme" and cfg.offload_path is None:
        raise ValueError("--offload nvme needs --offload-path DIR: a directory on local disk for the swap files")
    if cfg.offload_only is not None:
        if cfg.offload != "cpu" or cfg.offload_params:
            raise ValueError("--offload-only chooses which params' state --offload cpu moves (without --offload-params); add --offload cpu")
        try:
            re.compile(cfg.offload_only)
        except re.error as err:
            raise ValueError(f"--offload-only {cfg.offload_only!r} is not a regular expression: {err}") from None
    if cfg.offload_update == "device" and not (cfg.offload == "cpu" and cfg.offload_params and cfg.grad_clip == 0 and cfg.pp == 1 and cfg.precision != "fp16" and cfg.compress == "none"):
        raise ValueError(
            "--offload-update device streams the host's state through the GPU for each block's update as backward reduces it; "
            "it needs --offload cpu --offload-params --zero 3, --grad-clip 0, no --pp, no --compress and no fp16 loss scale"
        )
    if cfg.grad_clip < 0:
        raise ValueError(f"--grad-clip {cfg.grad_clip}: the global grad norm's limit is > 0, or 0 for none")
    if world % (cfg.pp * cfg.tp):
        raise ValueError(f"--pp {cfg.pp} x --tp {cfg.tp} does not divide the {world} ranks; use sizes whose product divides --nproc")
    if cfg.loss_parallel and cfg.tp == 1:
        raise ValueError("--loss-parallel shards the logits over --tp ranks; add --tp 2 (or more), or drop it")
    if cfg.tp > 1 and cfg.config is not None:
        raise ValueError("--tp with a DeepSpeed --config is not built yet (issue 16): its config has no tensor parallelism; drop --tp or --config")
    dp = world // (cfg.pp * cfg.tp)
    data = _data(cfg)  # reads the file: an empty one, or ids beyond the vocab, are named here
    if cfg.model is not None and hf.vocab_size(cfg.model) < data.vocab_size:
        raise ValueError(f"--model {cfg.model}: its vocab ({hf.vocab_size(cfg.model)}) is smaller than the data's {data.vocab_size} tokens")
    if cfg.resume is not None and not (Path(cfg.resume) / ".metadata").exists():
        raise ValueError(f"--resume {cfg.resume}: no checkpoint there (no .metadata); give a run's OUT/checkpoint directory")
    if cfg.config is not None:
        sharded.from_deepspeed_config(cfg.config, world_size=dp)
        return
    if cfg.batch_size % (dp * cfg.accumulate):
        raise ValueError(
            f"--batch-size {cfg.batch_size} does not split into {dp} data-parallel ranks x {cfg.accumulate} micro-batches; "
            f"use a multiple of {dp * cfg.accumulate}"
        )
    if cfg.device == "cuda" and torch.cuda.device_count() < (world if "RANK" not in os.environ else 1):
        raise ValueError(f"--device cuda --nproc {world} needs {world} GPUs; this machine has {torch.cuda.device_count()}")


def main(cfg: TrainConfig) -> dict:
    """Train on `cfg.nproc` local ranks (or on this rank, under torchrun) and report."""
    check(cfg)
    if cfg.progress == "auto":  # decided here, where the user's stderr is: ranks write into pipes
        cfg = dataclasses.replace(cfg, progress="bar" if sys.stderr.isatty() or "ipykernel" in sys.modules else "lines")
    if "RANK" in os.environ:
        summary = run_rank(cfg)
    else:
        summary = sharded.launch(run_rank, cfg, nprocs=cfg.nproc, device=cfg.device)
    print(
        f"val loss {summary['val_loss']:.3f} nats/char vs unigram baseline {summary['unigram_entropy']:.3f} "
        f"({'learned' if summary['learned'] else 'did NOT beat the baseline'}); "
        f"{summary['tokens_per_s']:,.0f} tokens/s on {summary['world_size']} rank(s); outputs in {cfg.out}/"
    )
    if not math.isfinite(summary["val_loss"]):
        raise RuntimeError("training diverged: val loss is not finite")
    return summary
