"""`sharded plan`: configurations that fit, ranked by predicted tokens/s, from a
calibration of the model's width; the best as a `sharded train` line that runs."""
import dataclasses
import math
import shlex
import subprocess
import sys

import pytest
import torch

from sharded import plan
from sharded.cli import build_parser
from sharded.models import GPTConfig
from sharded.train import TrainConfig, check

GIB = 2**30


def _shape(preset, **overrides):
    return plan.ModelShape.gpt(GPTConfig.preset(preset, **overrides), preset)


def _calibration(shape, busbw=100e9):
    """A machine whose block costs 10 ms and 1 GiB per sequence (5 ms, 0.25 GiB under full remat)."""
    seconds = {"none": ((0.005, 0.002), (0.0, 0.010)), "selective": ((0.005, 0.002), (0.0, 0.011)), "full": ((0.005, 0.002), (0.0, 0.013))}
    nbytes = {"none": ((GIB, GIB), (0.0, GIB)), "selective": ((GIB, GIB), (0.0, 0.6 * GIB)), "full": ((GIB, GIB), (0.0, 0.25 * GIB))}
    return plan.Calibration(shape.width, "test GPU", seconds, nbytes, busbw)


def test_configurations_fit_and_are_ranked_by_predicted_speed():
    shape = _shape("1.3b", tied=False)
    cal = _calibration(shape)
    roomy = plan.rank_configurations(shape, cal, gpus=2, gpu_bytes=140 * GIB, global_batch=16)
    assert [c.tokens_per_s for c in roomy] == sorted((c.tokens_per_s for c in roomy), reverse=True)
    assert all(c.dp * c.pp == 2 and c.micro_batch * c.accumulate * c.dp == 16 and c.memory_bytes <= 140 * GIB for c in roomy)
    tight = plan.rank_configurations(shape, cal, gpus=2, gpu_bytes=30 * GIB, global_batch=16)
    assert tight and all(c.memory_bytes <= 30 * GIB for c in tight) and len(tight) < len(roomy)
    by_key = {(c.dp, c.pp, c.zero, c.micro_batch, c.remat): c for c in roomy}
    # ZeRO's formulas: each stage holds less; remat trades memory for time; stage 1 is stage 2's program, not planned twice
    assert by_key[2, 1, 0, 1, "none"].memory_bytes > by_key[2, 1, 2, 1, "none"].memory_bytes > by_key[2, 1, 3, 1, "none"].memory_bytes
    assert not any(c.zero == 1 for c in roomy)
    assert by_key[2, 1, 0, 2, "full"].memory_bytes < by_key[2, 1, 0, 2, "none"].memory_bytes and by_key[2, 1, 0, 2, "full"].step_seconds > by_key[2, 1, 0, 2, "none"].step_seconds
    # a pipeline pays its bubble: (m + pp - 1) micro-batches of a stage's half of the blocks
    c = by_key[1, 2, 0, 4, "none"]
    assert c.step_seconds == pytest.approx((0.005 + 0.002 * 4 + 12 * 0.010 * 4) * (4 + 1))
    # the params counted on the model itself: 24 blocks, an embedding and an untied head
    from sharded.models import GPT

    with torch.device("meta"):
        total = sum(p.numel() for p in GPT(GPTConfig.preset("1.3b", tied=False)).parameters())
    assert 24 * shape.block + shape.embed + shape.head == total and shape.head == 50304 * 2048


def test_the_best_command_is_a_sharded_train_line_that_checks(tmp_path):
    shape = _shape("350m")
    best = plan.rank_configurations(shape, _calibration(shape), gpus=2, gpu_bytes=80 * GIB, global_batch=16)[0]
    argv = shlex.split(best.command(shape, 16))
    assert argv[:2] == ["sharded", "train"]
    args = build_parser().parse_args(argv[1:])
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    check(TrainConfig(**{**{k: v for k, v in vars(args).items() if k in fields}, "device": "cpu"}))  # its GPUs are not here
    assert (args.nproc, args.batch_size, args.accumulate, args.zero, args.pp) == (best.dp * best.pp, 16, best.accumulate, best.zero, best.pp)


def test_calibration_measures_steps_and_round_trips(tmp_path):
    """On CPU the step times are measured (peak memory needs CUDA: nan), and a saved
    calibration plans like the one measured."""
    shape = plan.ModelShape.gpt(dataclasses.replace(GPTConfig.preset("tiny"), vocab_size=64, seq_len=32), "tiny")
    cal = plan.calibrate(shape, gpus=1, device="cpu")
    assert all(math.isfinite(a) and math.isfinite(b) for fits in cal.seconds.values() for pair in fits for a, b in [pair])
    cal.save(tmp_path / "cal.json")
    again = plan.Calibration.load(tmp_path / "cal.json")
    assert again.seconds == cal.seconds and again.device == "cpu"
    ranked = plan.rank_configurations(shape, again, gpus=1, gpu_bytes=math.inf, global_batch=8)
    assert ranked and {c.remat for c in ranked} == set(plan.REMATS)


def test_the_cli_prints_the_table_and_the_best_line(tmp_path):
    from sharded.data import Corpus

    _calibration(_shape("350m", vocab_size=Corpus(seed=0).vocab_size)).save(tmp_path / "cal.json")
    args = ["plan", "--preset", "350m", "--gpus", "2", "--gpu-memory", "80", "--calibration", str(tmp_path / "cal.json"), "--top", "3"]
    done = subprocess.run([sys.executable, "-m", "sharded", *args], capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert "tokens/s" in lines[1] and len(lines) == 6 and lines[-1].startswith("best: sharded train --device cuda --nproc ")
    other = subprocess.run([sys.executable, "-m", "sharded", *args[:-2], "--untied"], capture_output=True, text=True)
    assert other.returncode == 2 and "measured another model width" in other.stderr


def test_of_two_equally_fast_the_leaner_ranks_first():
    """On a fast bus ZeRO-3's collectives hide under backward as data_parallel's do: the
    same predicted speed, and ZeRO-3 leaves more memory free (on 2 H200s, GPT-1.3B, it
    measured 3% faster; benchmarks/results/plan_vs_measured_1.3b_2xh200_4c06fc8.json)."""
    shape = _shape("1.3b", tied=False)
    ranked = plan.rank_configurations(shape, _calibration(shape, busbw=1e15), gpus=2, gpu_bytes=140 * GIB, global_batch=16)
    ties = [c for c in ranked if c.tokens_per_s == ranked[0].tokens_per_s]
    assert len(ties) > 1 and [c.memory_bytes for c in ties] == sorted(c.memory_bytes for c in ties) and ties[0].zero == 3


def test_a_hugging_face_directory_is_planned_by_its_config(tmp_path):
    """`--model DIR`: blocks and params from the config, the calibration runs built with
    fewer blocks, the command naming the directory."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    module = transformers.LlamaForCausalLM(config)
    module.save_pretrained(tmp_path / "llama")
    shape = plan.ModelShape.hugging_face(str(tmp_path / "llama"))
    assert (shape.layers, shape.seq_len, shape.vocab_size) == (6, 32, 64)
    assert 6 * shape.block + shape.embed + shape.head == sum(p.numel() for p in module.parameters()) and shape.head == 64 * 32
    assert shape.build(2).config.num_hidden_layers == 2
    cal = plan.calibrate(shape, gpus=1, device="cpu")
    ranked = plan.rank_configurations(shape, cal, gpus=1, gpu_bytes=math.inf, global_batch=4)
    assert f"--model {tmp_path / 'llama'}" in ranked[0].command(shape, 4)
    assert not cal.failed and {c.remat for c in ranked} == set(plan.REMATS)  # every policy runs (the KV cache off)


def test_a_remat_policy_the_model_fails_under_is_left_out_with_the_reason(monkeypatch):
    shape = plan.ModelShape.gpt(dataclasses.replace(GPTConfig.preset("tiny"), vocab_size=64, seq_len=32), "tiny")
    real = plan._measure_step

    def measure(shape, layers, remat, *args, **kwargs):
        if remat == "selective":
            raise RuntimeError("this model's forward changes state between forward and recompute")
        return real(shape, layers, remat, *args, **kwargs)

    monkeypatch.setattr(plan, "_measure_step", measure)
    cal = plan.calibrate(shape, gpus=1, device="cpu")
    assert set(cal.failed) == {"selective"} and "recompute" in cal.failed["selective"]
    ranked = plan.rank_configurations(shape, cal, gpus=1, gpu_bytes=math.inf, global_batch=8)
    assert {c.remat for c in ranked} == {"none", "full"}
