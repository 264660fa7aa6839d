"""The main job: `sharded train` with a pipeline learns and writes its outputs."""
import json
import subprocess
import sys

import pytest
import torch

import sharded
from sharded.train import TrainConfig, main


def test_train_with_a_pipeline_learns_and_writes_outputs(tmp_path):
    out = tmp_path / "run"
    summary = main(TrainConfig(pp=2, nproc=2, steps=25, accumulate=2, batch_size=8, seq_len=32, log_every=5, out=str(out)))
    assert summary["final_train_loss"] < 2.6 and summary["learned"]  # the first steps sit near 4.3 nats
    assert json.loads((out / "summary.json").read_text())["val_loss"] == summary["val_loss"]
    assert (out / "model.safetensors").exists() and (out / "loss.png").exists()


@pytest.mark.parametrize("compile,offload", [("none", "cpu"), ("aot_eager", "none"), ("none", "nvme"), ("none", "cpu blocks")])
def test_train_with_zero3_and_remat_learns(tmp_path, compile, offload):
    offload, _, only = offload.partition(" ")
    disk = dict(offload_path=str(tmp_path)) if offload == "nvme" else dict(offload_only=r"^blocks\.") if only else {}
    cfg = TrainConfig(zero=3, remat="full", compile=compile, offload=offload, nproc=2, steps=25, batch_size=8, seq_len=32, log_every=5, out=str(tmp_path / "run"), **disk)
    summary = main(cfg)
    assert summary["final_train_loss"] < 2.6 and summary["learned"]


def test_tensor_parallel_training_learns_and_checkpoints(tmp_path):
    """`--tp 2 --loss-parallel`: the vocabulary padded to a multiple of 2, each rank's
    slices of the weights, the loss over vocab-sharded logits (the evals' gathered), a
    checkpoint and the exported whole model at the end."""
    cfg = TrainConfig(tp=2, loss_parallel=True, nproc=2, steps=25, batch_size=8, accumulate=1, seq_len=32, log_every=5, eval_every=10, out=str(tmp_path / "run"))
    summary = main(cfg)
    assert summary["final_train_loss"] < 2.6 and summary["learned"]
    assert _final_params(tmp_path / "run")["wte.weight"].shape[0] % 2 == 0


def test_train_help_names_the_pipeline_flag():
    text = subprocess.run([sys.executable, "-m", "sharded", "train", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--pp" in text and "--tp" in text and "--zero" in text and "--remat" in text


@pytest.mark.parametrize("args, words", [
    (["--accumulate", "0"], "argument --accumulate: 0 must be at least 1"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--pp", "3", "--nproc", "2"], "--pp 3 x --tp 1 does not divide the 2 ranks"),
    (["--tp", "2", "--config", "ds.json"], "--tp with a DeepSpeed --config is not built yet"),
    (["--loss-parallel"], "--loss-parallel shards the logits over --tp ranks; add --tp 2"),
    (["--batch-size", "30", "--accumulate", "4"], "--batch-size 30 does not split into 2 data-parallel ranks x 4 micro-batches"),
    (["--offload", "nvme"], "--offload nvme needs --offload-path DIR"),
    (["--offload-only", "blocks"], "--offload-only chooses which params' state --offload cpu moves"),
    (["--offload", "cpu", "--offload-only", "blocks.(["], "--offload-only 'blocks.([' is not a regular expression"),
    (["--grad-clip", "-1"], "--grad-clip -1.0: the global grad norm's limit is > 0, or 0 for none"),
    (["--offload", "cpu", "--offload-params", "--offload-update", "device"], "it needs --offload cpu --offload-params --zero 3, --grad-clip 0, no --pp"),
])
def test_a_users_mistake_is_one_line_and_exit_status_2(args, words):
    done = subprocess.run([sys.executable, "-m", "sharded", "train", *args], capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines[-1].startswith("sharded train: error: ") and words in lines[-1], done.stderr
    assert "Traceback" not in done.stderr


def _final_params(out):
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("second", [dict(), dict(zero=3, nproc=1)])
def test_resume_continues_as_if_never_stopped(tmp_path, second):
    """20 steps straight == 10 (--stop-at), then --resume and 10 more: bitwise under the
    same transforms and ranks. Under ZeRO-3 on one rank instead the grads are summed in
    another order, and Adam's normalized step magnifies float32 rounding where the
    variance is small: the params agree within 1e-4 absolute after 10 more steps (one
    step moves a param by up to the lr, 3e-3)."""
    common = dict(steps=20, batch_size=8, accumulate=1, seq_len=16, log_every=5)
    main(TrainConfig(**common, nproc=2, out=str(tmp_path / "straight")))
    main(TrainConfig(**common, stop_at=10, nproc=2, out=str(tmp_path / "first")))
    main(TrainConfig(**{**common, "nproc": 2, **second}, resume=str(tmp_path / "first" / "checkpoint"), out=str(tmp_path / "resumed")))
    straight, resumed = _final_params(tmp_path / "straight"), _final_params(tmp_path / "resumed")
    for name, p in straight.items():
        if second:
            torch.testing.assert_close(resumed[name], p, rtol=0, atol=1e-4)
        else:
            assert torch.equal(resumed[name], p), name


def test_a_redirected_run_logs_a_line_per_log_step_with_its_evals(tmp_path):
    """No carriage-return progress bar in a log file: one line every --log-every steps,
    the val loss every --eval-every (also in metrics.jsonl)."""
    out = tmp_path / "run"
    args = ["--steps", "8", "--log-every", "2", "--eval-every", "4", "--batch-size", "8", "--seq-len", "16", "--out", str(out)]
    done = subprocess.run([sys.executable, "-m", "sharded", "train", *args], capture_output=True, text=True, check=True)
    text = done.stdout + done.stderr
    assert "\r" not in text
    lines = [line for line in text.splitlines() if "step " in line and "tokens/s" in line]
    assert len(lines) == 4 and "val " in lines[1] and "val " in lines[3] and "val " not in lines[0], lines
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [("val_loss" in r) for r in rows] == [False, True, False, True]


def test_metrics_go_to_tensorboard_with_the_learning_rate(tmp_path):
    """OUT/tensorboard holds the logged rows as scalars (loss, tokens/s, lr, each rank's
    memory), the same values as metrics.jsonl; the lr follows the warmup schedule."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    main(TrainConfig(steps=6, batch_size=8, accumulate=1, seq_len=16, log_every=2, warmup=4, lr=1e-3, nproc=1, out=str(out)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/tokens_per_s", "train/lr"} <= set(tags) and any(t.startswith("memory_mb/") and t.endswith("/rank0") for t in tags)
    for key in ("loss", "lr"):
        logged = events.Scalars(f"train/{key}")
        assert [e.step for e in logged] == [r["step"] for r in rows] == [2, 4, 6]
        assert [e.value for e in logged] == pytest.approx([r[key] for r in rows], rel=1e-6)
    schedule = sharded.optim.schedules.warmup_cosine(1e-3, 4, 6, end=1e-4)
    assert [r["lr"] for r in rows] == pytest.approx([float(schedule(torch.tensor(s - 1))) for s in (2, 4, 6)], rel=1e-6)  # the update's own


def _grad_norms(tmp_path, name, **flags):
    out = tmp_path / name
    main(TrainConfig(steps=4, batch_size=8, accumulate=2, seq_len=16, log_every=2, out=str(out), **flags))
    return [json.loads(line)["grad_norm"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_grad_norm_is_the_whole_models_under_every_layout(tmp_path):
    """The logged grad norm is the clipping's, over every rank's part: ZeRO-2's chunks and
    a pipeline's stages give the norm of one process (float32 sums in another order)."""
    one = _grad_norms(tmp_path, "one", nproc=1)
    assert len(one) == 2 and all(n > 0 for n in one)
    for name, flags in (("zero2", dict(nproc=2, zero=2)), ("pp2", dict(nproc=2, pp=2))):
        torch.testing.assert_close(torch.tensor(_grad_norms(tmp_path, name, **flags)), torch.tensor(one), rtol=1e-4, atol=0)
