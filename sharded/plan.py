"""`sharded plan`: the configurations of a job that fit a machine, ranked by predicted
tokens/s, each with its predicted memory per rank and the `sharded train` line to run.

    shape = ModelShape.gpt(GPTConfig.preset("1.3b", tied=False), "1.3b")   # or ModelShape.hugging_face(DIR)
    cal = calibrate(shape, gpus=2, device="cuda")                           # once, on the machine
    for c in rank_configurations(shape, cal, gpus=2, gpu_bytes=141e9, global_batch=16):
        print(c.command(shape, 16), c.tokens_per_s, c.memory_bytes)

The search space is what sharded runs today: dp × pp = the GPUs, ZeRO stage 0, 2 or 3
over dp (stage 1 runs stage 2's program), the micro-batch size (the rest of the global
batch is accumulation, or the pipeline's micro-batches), remat none/selective/full,
bf16 mixed precision with fp32 masters and AdamW. Tensor parallelism and offload are not searched yet: no calibration measures their costs.

[Note: what the predictions stand on] Measured once on the machine (`calibrate`): the
time and peak memory of a training step of the same model with 2 and 6 blocks, at
micro-batches of 2 and 8 sequences, under each remat policy, on one GPU; the
difference is one block's cost, the rest the embedding, head and loss; both are taken
as linear in the micro-batch. And the all-reduce bus bandwidth between the GPUs. From
them, with the ZeRO formulas for the model state (sharded.memory) and the bytes each
stage moves:

    memory  = model state (ZeRO formulas, this stage's params) + peak of the small
              runs beyond their own model state, with one block's activations times
              the blocks of the stage (times the micro-batches in flight under 1F1B)
    compute = (base + blocks · block) per micro-batch, times the micro-batches
              (a pipeline: (m + pp - 1) of them, its bubble)
    comm    = the bytes of the stage's collectives over the bus bandwidth; grads'
              reductions hide under backward (2/3 of compute), ZeRO-1/2's param
              all-gather after the update does not
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["Calibration", "Configuration", "ModelShape", "bus_bandwidth", "calibrate", "rank_configurations"]

REMATS = ("none", "selective", "full")
MICRO_BATCHES = (1, 2, 4, 8, 16)
CALIBRATION_LAYERS = (2, 6)  # enough blocks and sequences that a step is GPU-bound, and a block's cost stands out of the noise
CALIBRATION_MICRO_BATCHES = (2, 8)  # spanning the micro-batches a plan picks, so the fit interpolates


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What one GPU measured for a model's width (and the bus between the GPUs).

    `seconds[remat]` and `bytes[remat]` are (base, per block) pairs of linear fits
    a + b·micro_batch: seconds of a training step, and peak bytes beyond the model
    state."""

    model: dict  # the width measured (ModelShape.width: the config less its blocks, which the fits are per)
    device: str
    seconds: dict[str, tuple[tuple[float, float], tuple[float, float]]]
    bytes: dict[str, tuple[tuple[float, float], tuple[float, float]]]
    busbw: float  # all-reduce bus bandwidth, bytes/s (inf on one GPU)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # remat policies whose runs raised: not planned

    def step_seconds(self, remat: str, blocks: int, micro_batch: int) -> float:
        (a0, a1), (b0, b1) = self.seconds[remat]
        return (a0 + a1 * micro_batch) + blocks * (b0 + b1 * micro_batch)

    def activation_bytes(self, remat: str, blocks: int, micro_batch: int, in_flight: int = 1) -> float:
        """Peak bytes beyond the model state: the base's once, the blocks' per micro-batch in flight."""
        (a0, a1), (b0, b1) = self.bytes[remat]
        return (a0 + a1 * micro_batch) + in_flight * blocks * (b0 + b1 * micro_batch)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @staticmethod
    def load(path: str | Path) -> Calibration:
        data = json.loads(Path(path).read_text())
        fits = lambda d: {k: tuple(tuple(p) for p in v) for k, v in d.items()}  # noqa: E731
        return Calibration(data["model"], data["device"], fits(data["seconds"]), fits(data["bytes"]), data["busbw"], data.get("failed", {}))


@dataclasses.dataclass(frozen=True)
class Configuration:
    dp: int
    pp: int
    zero: int  # 0: data_parallel
    micro_batch: int  # sequences per rank per micro-batch
    accumulate: int  # micro-batches per update (a pipeline's micro-batches when pp > 1)
    remat: str
    tokens_per_s: float  # predicted
    memory_bytes: float  # predicted peak per rank
    step_seconds: float  # predicted

    def command(self, shape: ModelShape, global_batch: int) -> str:
        parts = [f"sharded train --device cuda --nproc {self.dp * self.pp} {shape.flags}", f"--batch-size {global_batch}", f"--seq-len {shape.seq_len}"]
        parts += [f"--accumulate {self.accumulate}", "--precision bf16"]
        if self.pp > 1:
            parts.append(f"--pp {self.pp}")
        if self.zero:
            parts.append(f"--zero {self.zero}")
        if self.remat != "none":
            parts.append(f"--remat {self.remat}")
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What a plan needs of a model: its blocks, the params of one block, of the
    embedding and of the head, the tokens of a sequence, how to build it with n blocks
    (the calibration's runs), what identifies its width (a calibration must match it),
    and how `sharded train` names it."""

    layers: int
    seq_len: int
    vocab_size: int
    block: int
    embed: int
    head: int
    width: dict
    flags: str
    build: Callable[[int], nn.Module] = dataclasses.field(compare=False, repr=False)

    @staticmethod
    def gpt(cfg: Any, preset: str) -> ModelShape:
        """A sharded.models.GPT preset (`cfg` its GPTConfig)."""
        from sharded.models import GPT

        width = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "n_layers"}
        flags = f"--preset {preset}" + ("" if cfg.tied else " --untied")
        build = lambda n: GPT(dataclasses.replace(cfg, n_layers=n))  # noqa: E731
        return ModelShape._counted(cfg.n_layers, cfg.seq_len, cfg.vocab_size, width, flags, build, lambda m: (m.wte.weight, m.head.weight))

    @staticmethod
    def hugging_face(path: str, seq_len: int | None = None) -> ModelShape:
        """A Hugging Face causal LM's directory (`--model DIR`), by its config."""
        from sharded.models import hf

        config = hf._config(Path(path))
        layers = config.num_hidden_layers
        seq = seq_len or min(2048, getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)
        width = {k: v for k, v in config.to_dict().items() if k not in ("num_hidden_layers", "n_layer", "_name_or_path", "transformers_version")}
        width = json.loads(json.dumps({**width, "seq_len": seq}, default=str))  # as a saved calibration holds it

        def build(n: int) -> nn.Module:
            import copy

            import transformers

            c = copy.deepcopy(config)
            c.num_hidden_layers = n
            return transformers.AutoModelForCausalLM.from_config(c, torch_dtype=torch.float32).train()

        embeddings = lambda m: (m.get_input_embeddings().weight, m.get_output_embeddings().weight)  # noqa: E731
        return ModelShape._counted(layers, seq, config.vocab_size, width, f"--model {path}", build, embeddings)

    @staticmethod
    def _counted(layers: int, seq_len: int, vocab: int, width: dict, flags: str, build: Callable, embeddings: Callable) -> ModelShape:
        """Params counted on meta models of 1 and 2 blocks: one block is the difference,
        the head its own output matrix unless tied to the input's, the embedding the rest."""
        with torch.device("meta"):
            one, two = build(1), build(2)
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        block = count(two) - count(one)
        inp, out = embeddings(one)
        head = 0 if out is inp else out.numel()
        return ModelShape(layers, seq_len, vocab, block, count(one) - block - head, head, width, flags, build)


def _model_state_bytes(params: int, zero: int, dp: int) -> float:
    """Per-rank bytes of fp32 params, grads and AdamW state (two fp32 moments) under
    ZeRO's formulas: stages 1 and 2 shard the grads and optimizer state (stage 1 runs
    stage 2's program: decision 39), 3 the params too."""
    shard = lambda n, on: n / dp if on else n  # noqa: E731
    return 4 * shard(params, zero >= 3) + 12 * shard(params, zero >= 1)


def _comm_seconds(params: int, zero: int, dp: int, busbw: float) -> tuple[float, float]:
    """(seconds that can hide under backward, seconds that cannot) of one update's
    collectives over dp: fp32 grads reduced, params gathered as each stage does."""
    if dp == 1:
        return 0.0, 0.0
    part = (dp - 1) / dp * params / busbw
    if zero == 0:
        return 2 * 4 * part, 0.0  # an all-reduce of fp32 grads
    if zero == 2:
        return 4 * part, 4 * part  # reduce-scatter, then the updated fp32 chunks all-gathered
    return 4 * part + 2 * 2 * part, 0.0  # reduce-scatter, and bf16 gathers in forward and backward (prefetched)


def rank_configurations(shape: ModelShape, cal: Calibration, gpus: int, gpu_bytes: float, global_batch: int) -> list[Configuration]:
    """Every configuration that fits `gpu_bytes` per GPU, fastest first (of two equally
    fast, the one that leaves more memory free)."""
    block, embed, head = shape.block, shape.embed, shape.head
    out = []
    for pp, zero, micro, remat in itertools.product(_divisors(gpus), (0, 2, 3), MICRO_BATCHES, tuple(cal.seconds)):  # stage 1 runs stage 2's program (decision 39)
        dp = gpus // pp
        if pp > shape.layers or (dp == 1 and zero) or global_batch % (dp * micro):
            continue
        m = global_batch // (dp * micro)
        if pp > 1 and m < pp:
            continue  # 1F1B needs at least as many micro-batches as stages
        blocks = -(-shape.layers // pp)
        stage_params = blocks * block + (embed + head if pp == 1 else max(embed, head))
        in_flight = pp if pp > 1 else 1  # 1F1B: stage 0 holds a micro-batch per stage
        gathered = 2 * 2 * block if zero == 3 else 0  # bf16 blocks gathered at once (this one and the prefetched)
        memory = _model_state_bytes(stage_params, zero, dp) + gathered + cal.activation_bytes(remat, blocks, micro, in_flight)
        if memory > gpu_bytes:
            continue
        per_micro = cal.step_seconds(remat, blocks, micro)
        compute = per_micro * (m + pp - 1) if pp > 1 else per_micro * m
        hidden, exposed = _comm_seconds(stage_params, zero, dp, cal.busbw)
        step = compute + max(0.0, hidden - 2 / 3 * compute) + exposed
        out.append(Configuration(dp, pp, zero, micro, m, remat, global_batch * shape.seq_len / step, memory, step))
    return sorted(out, key=lambda c: (-c.tokens_per_s, c.memory_bytes))


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


# -- calibration ----------------------------------------------------------------------


def _measure_step(shape: ModelShape, layers: int, remat: str, micro_batch: int, device: torch.device, steps: int = 10) -> tuple[float, float]:
    """(fastest seconds, peak bytes beyond the model state) of a bf16 training step of the
    model with `layers` blocks on one device (the fastest of `steps`: a small model's
    step is noisy, and its noise is the host's). Off CUDA the peak is not measured (nan)."""
    import sharded
    from sharded.models import hf, loss_fn

    torch.manual_seed(0)
    model = sharded.trace(shape.build(layers).to(device))
    kwargs = hf.training_kwargs(model.module)

    def train_step(state, batch):
        value, grads = sharded.value_and_grad(lambda p, b: loss_fn(hf.logits_of(model.apply(p, b[0], **kwargs)), b[1]))(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    step = sharded.mixed_precision("bf16")(train_step)
    if remat != "none":
        step = sharded.remat(policy=remat)(step)
    step = step if isinstance(step, sharded.Step) else sharded.Step(step)
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-4, weight_decay=0.1)))
    x = torch.randint(0, shape.vocab_size, (micro_batch, shape.seq_len), device=device)
    cuda = device.type == "cuda"
    state, _ = step(state, (x, x))  # the optimizer state exists from here
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resting = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, _ = step(state, (x, x))
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - resting if cuda else float("nan")
    return min(times), float(peak)


def bus_bandwidth(megabytes: int = 256) -> float:
    """All-reduce bus bandwidth (bytes/s) between this job's GPUs, as nccl-tests counts
    it: 2(n-1)/n · bytes / seconds. Run on every rank."""
    from sharded import distributed

    x = torch.ones(megabytes * 2**20 // 4, device=distributed.device())
    n = distributed.world_size()
    for _ in range(2):
        torch.distributed.all_reduce(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        torch.distributed.all_reduce(x)
    torch.cuda.synchronize()
    return 2 * (n - 1) / n * x.numel() * 4 / ((time.perf_counter() - start) / 5)


def calibrate(shape: ModelShape, gpus: int = 1, device: str = "cuda") -> Calibration:
    """Measure the model's width on this machine ([Note: what the predictions stand on])."""
    import sharded

    dev = torch.device(device if device != "cuda" else "cuda:0")
    block, embed, head = shape.block, shape.embed, shape.head
    seconds, nbytes = {}, {}
    layers, micro = CALIBRATION_LAYERS, CALIBRATION_MICRO_BATCHES
    failed, runs = {}, {}
    for n, b in itertools.product(layers, micro):  # the policies back to back at each size: the machine's drift falls on all alike
        for remat in (r for r in REMATS if r not in failed):
            try:
                runs[remat, n, b] = _measure_step(shape, n, remat, b, dev)
            except RuntimeError as e:  # the model does not run under this policy: plan without it, and say why
                failed[remat] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    for remat in (r for r in REMATS if r not in failed):
        per_block = {b: tuple((runs[remat, layers[1], b][k] - runs[remat, layers[0], b][k]) / (layers[1] - layers[0]) for k in (0, 1)) for b in micro}
        base = {b: tuple(runs[remat, layers[0], b][k] - layers[0] * per_block[b][k] for k in (0, 1)) for b in micro}

        def fit(values: dict[int, float], less: float = 0.0) -> tuple[float, float]:
            """a + b·micro through the two micro-batches measured (`less` off the intercept)."""
            (m1, v1), (m2, v2) = sorted(values.items())
            slope = (v2 - v1) / (m2 - m1)
            return v1 - slope * m1 - less, slope

        seconds[remat] = (fit({b: base[b][0] for b in micro}), fit({b: per_block[b][0] for b in micro}))
        # the runs' peaks include their whole fp32 grads, which the ZeRO formulas count (sharded as the stage shards them)
        nbytes[remat] = (fit({b: base[b][1] for b in micro}, 4 * (embed + head)), fit({b: per_block[b][1] for b in micro}, 4 * block))
    busbw = float("inf")
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # what the runs cached goes back before other processes use this GPU
    if gpus > 1 and dev.type == "cuda":
        busbw = sharded.launch(bus_bandwidth, nprocs=gpus, device="cuda")
    return Calibration(shape.width, torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", seconds, nbytes, busbw, failed)
